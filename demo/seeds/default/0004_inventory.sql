-- Inventory: 5 locations per site, each of the 60 products stocked in the 4
-- non-quarantine locations of PLANT-A (240 items), 2 lots per product,
-- 4 movements per item (the on-hand quantity is their sum) and 7 daily snapshots.

INSERT INTO inventory_locations (site_id, code, name, kind)
SELECT s.id, s.code || '-' || l.suffix, l.name || ' (' || s.code || ')', l.kind
FROM sites s
CROSS JOIN (VALUES ('WH1', 'Main warehouse', 'warehouse'),
                   ('WH2', 'Overflow warehouse', 'warehouse'),
                   ('LINE', 'Line side', 'line_side'),
                   ('SHIP', 'Shipping', 'shipping'),
                   ('QUAR', 'Quarantine', 'quarantine')) AS l (suffix, name, kind);

INSERT INTO inventory_items (product_id, location_id, quantity, reorder_point)
SELECT p.id, l.id, 0, 40
FROM products p
CROSS JOIN inventory_locations l
JOIN sites s ON s.id = l.site_id
WHERE s.code = 'PLANT-A' AND l.kind <> 'quarantine';

INSERT INTO lots (product_id, lot_number, produced_on, expires_on, status)
SELECT p.id, 'LOT-' || p.sku || '-' || k,
       date '2025-01-01' + (k * 30),
       date '2026-01-01' + (k * 30),
       CASE WHEN k = 2 AND p.id % 10 = 0 THEN 'quarantine' ELSE 'released' END
FROM products p CROSS JOIN generate_series(1, 2) AS k;

INSERT INTO stock_movements (inventory_item_id, lot_id, delta, reason, user_id, created_at)
SELECT i.id,
       lt.id,
       CASE k WHEN 1 THEN 50 + i.id % 50
              WHEN 2 THEN -(1 + i.id % 25)
              WHEN 3 THEN 20
              ELSE -(10 + i.id % 30) END,
       CASE WHEN k IN (1, 3) THEN 'receipt' ELSE 'issue' END,
       op.id,
       timestamptz '2025-06-01 08:00+00' + make_interval(days => k)
FROM inventory_items i
CROSS JOIN generate_series(1, 4) AS k
JOIN products p ON p.id = i.product_id
LEFT JOIN lots lt ON lt.lot_number = 'LOT-' || p.sku || '-1'
LEFT JOIN users op ON op.username = 'operator';

UPDATE inventory_items i
SET quantity = m.total, updated_at = timestamptz '2025-06-05 08:00+00'
FROM (SELECT inventory_item_id, sum(delta) AS total
      FROM stock_movements GROUP BY inventory_item_id) AS m
WHERE m.inventory_item_id = i.id;

INSERT INTO stock_levels (inventory_item_id, snapshot_date, quantity)
SELECT i.id, date '2025-06-01' + d, i.quantity + (6 - d) * 2
FROM inventory_items i CROSS JOIN generate_series(0, 6) AS d;
