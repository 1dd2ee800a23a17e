-- Reporting: application settings and the views behind GET /api/stats.

CREATE TABLE app_settings (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO app_settings (key, value) VALUES
    ('session_ttl_hours', '8'::jsonb),
    ('company_name', '"Demo Manufacturing"'::jsonb);

CREATE VIEW work_order_status_counts AS
SELECT s.status, count(w.id)::integer AS count
FROM (VALUES ('planned'), ('released'), ('in_progress'),
             ('on_hold'), ('completed'), ('cancelled')) AS s (status)
LEFT JOIN work_orders w ON w.status = s.status
GROUP BY s.status;

CREATE VIEW low_stock_items AS
SELECT i.id, p.sku, l.code AS location, i.quantity, i.reorder_point
FROM inventory_items i
JOIN products p ON p.id = i.product_id
JOIN inventory_locations l ON l.id = i.location_id
WHERE i.quantity < i.reorder_point;
