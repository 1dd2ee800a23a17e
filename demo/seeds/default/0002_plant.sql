-- Plant: 2 sites, 3 shifts each, 4 work centers each, 3 machines per work center,
-- 20 shop-floor staff (password "staff-pass") and ~150 downtime events.

INSERT INTO sites (code, name, timezone) VALUES
    ('PLANT-A', 'Plant A - Assembly', 'Europe/Berlin'),
    ('PLANT-B', 'Plant B - Machining', 'America/Chicago');

INSERT INTO shifts (site_id, name, starts_at, ends_at)
SELECT s.id, sh.name, sh.starts_at, sh.ends_at
FROM sites s
CROSS JOIN (VALUES ('early', time '06:00', time '14:00'),
                   ('late', time '14:00', time '22:00'),
                   ('night', time '22:00', time '06:00')) AS sh (name, starts_at, ends_at);

INSERT INTO work_centers (site_id, code, name, capacity_per_hour)
SELECT s.id, s.code || '-WC' || g, 'Work center ' || g || ' (' || s.code || ')', 10 + g * 5
FROM sites s CROSS JOIN generate_series(1, 4) AS g;

INSERT INTO machines (work_center_id, code, name, status, installed_on)
SELECT wc.id, wc.code || '-M' || g, 'Machine ' || g || ' of ' || wc.code,
       (ARRAY['running', 'running', 'idle', 'down', 'maintenance'])[1 + (wc.id + g) % 5],
       date '2015-01-01' + (g * 97 + wc.id * 31)::integer
FROM work_centers wc CROSS JOIN generate_series(1, 3) AS g;

INSERT INTO users (username, full_name, email, password_salt, password_hash)
SELECT 'staff' || lpad(g::text, 2, '0'), 'Staff member ' || g,
       'staff' || g || '@demo.invalid', md5('staff' || g),
       encode(sha256(convert_to(md5('staff' || g) || 'staff-pass', 'UTF8')), 'hex')
FROM generate_series(1, 20) AS g;

INSERT INTO user_roles (user_id, role_id)
SELECT u.id, r.id
FROM users u JOIN roles r ON r.code = 'operator'
WHERE u.username LIKE 'staff%';

-- 6 per machine; the newest event of every 'down' machine is still open.
INSERT INTO downtime_events (machine_id, shift_id, reason, started_at, ended_at, notes)
SELECT m.id,
       (SELECT sh.id FROM shifts sh JOIN work_centers wc ON wc.site_id = sh.site_id
        WHERE wc.id = m.work_center_id ORDER BY sh.name LIMIT 1 OFFSET g % 3),
       (ARRAY['breakdown', 'changeover', 'maintenance', 'no_material', 'no_operator', 'other'])
           [1 + (m.id + g) % 6],
       timestamptz '2025-01-01 00:00+00' + make_interval(days => g * 9, hours => m.id::integer % 24),
       CASE WHEN m.status = 'down' AND g = 6 THEN NULL
            ELSE timestamptz '2025-01-01 00:00+00'
                 + make_interval(days => g * 9, hours => m.id::integer % 24, mins => 15 + g * 7)
       END,
       ''
FROM machines m CROSS JOIN generate_series(1, 6) AS g;
