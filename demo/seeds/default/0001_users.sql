-- Roles and the three well-known demo users (password = "<username>-pass").
-- Passwords are stored as hex(sha256(salt || password)), computed with the
-- built-in sha256() (PostgreSQL 11+), so no extension is needed.

INSERT INTO roles (code, name, description) VALUES
    ('admin', 'Administrator', 'Full access'),
    ('planner', 'Production planner', 'Creates and schedules work orders'),
    ('operator', 'Operator', 'Runs work orders and moves stock'),
    ('inspector', 'Quality inspector', 'Records quality checks');

INSERT INTO users (username, full_name, email, password_salt, password_hash)
SELECT u.username, u.full_name, u.username || '@demo.invalid', s.salt,
       encode(sha256(convert_to(s.salt || u.password, 'UTF8')), 'hex')
FROM (VALUES ('admin', 'Ada Admin', 'admin-pass'),
             ('operator', 'Otto Operator', 'operator-pass'),
             ('inspector', 'Ines Inspector', 'inspector-pass')) AS u (username, full_name, password)
CROSS JOIN LATERAL (SELECT md5(u.username || clock_timestamp()::text || random()::text) AS salt) AS s;

INSERT INTO user_roles (user_id, role_id)
SELECT u.id, r.id
FROM (VALUES ('admin', 'admin'), ('admin', 'planner'),
             ('operator', 'operator'),
             ('inspector', 'inspector')) AS g (username, role_code)
JOIN users u ON u.username = g.username
JOIN roles r ON r.code = g.role_code;
