import hashlib


def test_health(backend):
    resp = backend.get("/health")
    assert resp.status == 200
    assert resp.json() == {"status": "ok"}


def test_login_returns_a_token_stored_only_as_a_hash(backend, sql_scalar):
    resp = backend.post("/api/login", {"username": "operator", "password": "operator-pass"})
    assert resp.status == 200, resp.text
    body = resp.json()
    token = body["token"]
    assert body["user"]["username"] == "operator"
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    assert sql_scalar("SELECT count(*) FROM sessions WHERE token_hash = %s", (token_hash,)) == 1
    assert sql_scalar("SELECT count(*) FROM sessions WHERE token_hash = %s", (token,)) == 0


def test_wrong_password_and_unknown_user_are_rejected(backend):
    for username, password in [("admin", "operator-pass"), ("admin", ""), ("nobody", "x")]:
        resp = backend.post("/api/login", {"username": username, "password": password})
        expected = 400 if password == "" else 401
        assert resp.status == expected, (username, password, resp.text)
        assert "token" not in resp.json()


def test_login_validates_its_body(backend):
    assert backend.post("/api/login", data=b"{not json").status == 400
    assert backend.post("/api/login", data=b"[1, 2]").status == 400
    assert backend.post("/api/login", {"username": "admin"}).status == 400


def test_me_returns_the_user_and_roles(backend, login):
    me = backend.get("/api/me", token=login("inspector"))
    assert me.status == 200
    assert me.json()["username"] == "inspector"
    assert me.json()["roles"] == ["inspector"]
    admin_roles = backend.get("/api/me", token=login("admin")).json()["roles"]
    assert "admin" in admin_roles


def test_protected_routes_need_a_valid_token(backend):
    for path in ("/api/me", "/api/work-orders", "/api/inventory", "/api/stats"):
        assert backend.get(path).status == 401, path
        assert backend.get(path, token="not-a-real-token").status == 401, path
    resp = backend.get("/api/me", headers={"Authorization": "Basic YWRtaW46YWRtaW4tcGFzcw=="})
    assert resp.status == 401
    assert resp.json()["error"] == "unauthorized"


def test_logout_revokes_only_that_token(backend, login, sql_scalar):
    first, second = login("admin"), login("admin")
    assert first != second
    assert backend.post("/api/logout", {}, token=first).status == 200
    assert backend.get("/api/me", token=first).status == 401
    assert backend.get("/api/me", token=second).status == 200
    first_hash = hashlib.sha256(first.encode()).hexdigest()
    revoked = "SELECT revoked_at IS NOT NULL FROM sessions WHERE token_hash = %s"
    assert sql_scalar(revoked, (first_hash,)) is True


def test_passwords_are_salted_sha256(sql_scalar):
    # The hash scheme the seeds use: hex(sha256(salt || password)).
    salt = sql_scalar("SELECT password_salt FROM users WHERE username = 'admin'")
    stored = sql_scalar("SELECT password_hash FROM users WHERE username = 'admin'")
    assert stored == hashlib.sha256((salt + "admin-pass").encode()).hexdigest()
    assert sql_scalar("SELECT count(DISTINCT password_salt) FROM users") == 3


def test_database_has_the_auth_only_seed(admin, sql_scalar):
    # auth_only: roles and three users, and no MES data at all.
    assert sql_scalar("SELECT count(*) FROM users") == 3
    assert sql_scalar("SELECT count(*) FROM roles") == 4
    for table in ("work_orders", "products", "inventory_items", "quality_checks"):
        assert sql_scalar(f"SELECT count(*) FROM {table}") == 0, table
    page = admin.get_json("/api/work-orders")
    assert page["total"] == 0
    assert page["items"] == []


def test_backend_uses_this_projects_database(backend, sql_scalar):
    # The session created through the API must be visible in DATABASE_URL's database.
    before = sql_scalar("SELECT count(*) FROM sessions")
    backend.post_json("/api/login", {"username": "inspector", "password": "inspector-pass"})
    assert sql_scalar("SELECT count(*) FROM sessions") == before + 1
    apps = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'demo-backend'"
    assert sql_scalar(apps + " AND datname = current_database()") >= 1
