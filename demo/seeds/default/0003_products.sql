-- Products: 20 finished goods (FG-001..FG-020) and 40 components (CMP-001..CMP-040),
-- one BOM (4 components) and one routing (4 steps) per finished good,
-- and one quality plan per finished good.

INSERT INTO uoms (code, name) VALUES
    ('pcs', 'Pieces'), ('kg', 'Kilogram'), ('m', 'Metre'), ('l', 'Litre');

INSERT INTO products (sku, name, kind, uom)
SELECT 'FG-' || lpad(g::text, 3, '0'), 'Finished good ' || g, 'finished', 'pcs'
FROM generate_series(1, 20) AS g;

INSERT INTO products (sku, name, kind, uom)
SELECT 'CMP-' || lpad(g::text, 3, '0'), 'Component ' || g,
       CASE WHEN g % 4 = 0 THEN 'raw' ELSE 'component' END,
       (ARRAY['pcs', 'pcs', 'kg', 'm'])[1 + g % 4]
FROM generate_series(1, 40) AS g;

INSERT INTO boms (product_id, version)
SELECT id, 1 FROM products WHERE kind = 'finished';

INSERT INTO bom_items (bom_id, component_id, quantity)
SELECT b.id, c.id, 1 + k
FROM boms b
JOIN products fg ON fg.id = b.product_id
CROSS JOIN generate_series(0, 3) AS k
JOIN products c
  ON c.sku = 'CMP-' || lpad((1 + (substr(fg.sku, 4)::integer * 2 + k * 5) % 40)::text, 3, '0');

INSERT INTO routings (product_id, version)
SELECT id, 1 FROM products WHERE kind = 'finished';

INSERT INTO routing_steps (routing_id, step_no, work_center_id, description,
                           setup_minutes, run_minutes_per_unit)
SELECT r.id, k,
       (SELECT wc.id FROM work_centers wc ORDER BY wc.code
        LIMIT 1 OFFSET (r.id + k) % 8),
       (ARRAY['Cut', 'Machine', 'Assemble', 'Pack'])[k],
       10 * k, 0.5 * k
FROM routings r CROSS JOIN generate_series(1, 4) AS k;

INSERT INTO quality_plans (product_id, name, characteristic, lower_limit, upper_limit, unit)
SELECT id, 'Final inspection', 'length', 99.5, 100.5, 'mm'
FROM products WHERE kind = 'finished';
