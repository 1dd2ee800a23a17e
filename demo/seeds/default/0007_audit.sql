-- 500 audit entries so the audit table is not empty in reports.

INSERT INTO audit_log (user_id, action, entity, entity_id, details, created_at)
SELECT u.id,
       (ARRAY['create', 'update', 'status_change', 'login'])[1 + n % 4],
       'work_order',
       w.id,
       jsonb_build_object('seeded', true, 'n', n),
       timestamptz '2025-06-01 00:00+00' + make_interval(mins => n * 11)
FROM generate_series(1, 500) AS n
JOIN (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM work_orders) AS w
  ON w.rn = 1 + (n - 1) % (SELECT count(*) FROM work_orders)
JOIN users u ON u.username = (ARRAY['admin', 'operator', 'inspector'])[1 + n % 3];
