-- 600 work orders with a fixed status mix (by n % 10):
--   planned 180, released 120, in_progress 120, on_hold 60, completed 60, cancelled 60
-- 4 steps each (from the product's routing) and one history row per non-planned order.

INSERT INTO work_orders (product_id, routing_id, work_center_id, quantity, quantity_done,
                         status, priority, due_date, notes, created_by, created_at, updated_at)
SELECT fg.id,
       r.id,
       rs.work_center_id,
       10 + (n % 7) * 5,
       CASE WHEN n % 10 = 8 THEN 10 + (n % 7) * 5 WHEN n % 10 IN (5, 6) THEN 5 ELSE 0 END,
       (ARRAY['planned', 'planned', 'planned', 'released', 'released',
              'in_progress', 'in_progress', 'on_hold', 'completed', 'cancelled'])[1 + n % 10],
       1 + n % 5,
       date '2025-07-01' + (n % 90),
       'seeded',
       (SELECT u.id FROM users u WHERE u.username = 'admin'),
       timestamptz '2025-06-01 00:00+00' + make_interval(hours => n),
       timestamptz '2025-06-01 00:00+00' + make_interval(hours => n)
FROM generate_series(1, 600) AS n
JOIN products fg ON fg.sku = 'FG-' || lpad((1 + n % 20)::text, 3, '0')
JOIN routings r ON r.product_id = fg.id AND r.version = 1
JOIN routing_steps rs ON rs.routing_id = r.id AND rs.step_no = 1
ORDER BY n;

INSERT INTO work_order_steps (work_order_id, step_no, routing_step_id, machine_id, status,
                              started_at, finished_at)
SELECT w.id, rs.step_no, rs.id,
       m.id,
       CASE WHEN w.status = 'completed' THEN 'done'
            WHEN w.status = 'cancelled' THEN 'skipped'
            WHEN w.status = 'in_progress' AND rs.step_no = 1 THEN 'done'
            WHEN w.status = 'in_progress' AND rs.step_no = 2 THEN 'running'
            ELSE 'pending' END,
       CASE WHEN w.status IN ('completed', 'in_progress') AND rs.step_no <= 2
            THEN w.created_at + make_interval(hours => rs.step_no) END,
       CASE WHEN w.status = 'completed' OR (w.status = 'in_progress' AND rs.step_no = 1)
            THEN w.created_at + make_interval(hours => rs.step_no, mins => 45) END
FROM work_orders w
JOIN routing_steps rs ON rs.routing_id = w.routing_id
JOIN (SELECT id, work_center_id,
             row_number() OVER (PARTITION BY work_center_id ORDER BY code) AS rn
      FROM machines) AS m
  ON m.work_center_id = rs.work_center_id AND m.rn = 1 + w.id % 3;

INSERT INTO work_order_status_history (work_order_id, from_status, to_status, changed_by, changed_at)
SELECT w.id, 'planned', w.status,
       (SELECT u.id FROM users u WHERE u.username = 'admin'),
       w.created_at + interval '1 hour'
FROM work_orders w
WHERE w.status <> 'planned';
