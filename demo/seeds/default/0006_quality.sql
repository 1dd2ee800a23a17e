-- Quality: 8 defect codes, 400 checks on in-progress/completed/on-hold orders
-- (every 8th one fails: 50 fail, 350 pass) and one defect per failed check.

INSERT INTO defect_codes (code, description, severity) VALUES
    ('SCRATCH', 'Surface scratch', 'minor'),
    ('DENT', 'Dent', 'minor'),
    ('DIM_OUT', 'Dimension out of tolerance', 'major'),
    ('MISSING_PART', 'Missing part', 'major'),
    ('WRONG_LABEL', 'Wrong label', 'minor'),
    ('CRACK', 'Crack', 'critical'),
    ('CONTAMINATION', 'Contamination', 'major'),
    ('LEAK', 'Leak', 'critical');

WITH candidates AS MATERIALIZED (
    SELECT w.id, w.product_id, row_number() OVER (ORDER BY w.id) AS rn
    FROM work_orders w
    WHERE w.status IN ('in_progress', 'completed', 'on_hold')
)
INSERT INTO quality_checks (work_order_id, plan_id, lot_id, inspector_id, result,
                            measured_value, notes, checked_at)
SELECT c.id,
       qp.id,
       lt.id,
       (SELECT u.id FROM users u WHERE u.username = 'inspector'),
       CASE WHEN n % 8 = 0 THEN 'fail' ELSE 'pass' END,
       CASE WHEN n % 8 = 0 THEN 101.25 ELSE 100 + (n % 9 - 4) * 0.1 END,
       'seeded',
       timestamptz '2025-06-10 00:00+00' + make_interval(mins => n * 37)
FROM generate_series(1, 400) AS n
JOIN candidates c ON c.rn = 1 + (n - 1) % (SELECT count(*) FROM candidates)
LEFT JOIN quality_plans qp ON qp.product_id = c.product_id AND qp.name = 'Final inspection'
LEFT JOIN lots lt ON lt.product_id = c.product_id AND lt.lot_number LIKE '%-1';

INSERT INTO defects (quality_check_id, defect_code, quantity, notes)
SELECT q.id,
       (ARRAY['SCRATCH', 'DENT', 'DIM_OUT', 'MISSING_PART', 'WRONG_LABEL', 'CRACK',
              'CONTAMINATION', 'LEAK'])[1 + q.id % 8],
       1 + q.id % 3,
       'seeded'
FROM quality_checks q
WHERE q.result = 'fail';
