import re
from urllib.parse import urlsplit

PAGES = ("/", "/index.html", "/login.html", "/work_orders.html")


def test_backend_and_frontend_are_up(backend, frontend):
    assert backend.get_json("/health") == {"status": "ok"}
    resp = frontend.get("/")
    assert resp.status == 200
    assert resp.header("Content-Type").startswith("text/html")


def test_pages_point_at_this_projects_backend(frontend, backend_url):
    for path in PAGES:
        resp = frontend.get(path)
        assert resp.status == 200, path
        assert f'window.BACKEND_URL = "{backend_url}";' in resp.text, path
        assert "%%BACKEND_URL%%" not in resp.text, path
    config = frontend.get("/config.js")
    assert config.text.strip() == f'window.BACKEND_URL = "{backend_url}";'


def test_every_api_path_used_by_app_js_exists(frontend, admin):
    app_js = frontend.get("/app.js")
    assert app_js.status == 200
    paths = set(re.findall(r'"(/api/[a-z-]+)', app_js.text))
    assert {"/api/login", "/api/me", "/api/stats", "/api/work-orders"} <= paths
    for path in sorted(paths - {"/api/login", "/api/logout"}):  # the GET endpoints
        assert admin.get(path).status == 200, path


def test_backend_allows_calls_from_the_frontend_origin(backend, frontend_url):
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(frontend_url))
    preflight = backend.request(
        "OPTIONS",
        "/api/stats",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status in (200, 204)
    assert preflight.header("Access-Control-Allow-Origin") in ("*", origin)
    assert "authorization" in preflight.header("Access-Control-Allow-Headers").lower()


def test_login_flow_used_by_the_login_page(backend, frontend):
    page = frontend.get("/login.html").text
    assert 'id="login-form"' in page
    body = backend.post_json("/api/login", {"username": "admin", "password": "admin-pass"})
    me = backend.get("/api/me", token=body["token"])
    assert me.status == 200 and me.json()["username"] == "admin"


def test_dashboard_cards_map_to_stats(frontend, admin):
    html = frontend.get("/").text
    keys = re.findall(r'data-stat="([a-z_.]+)"', html)
    assert len(keys) >= 5
    stats = admin.get_json("/api/stats")
    for key in keys:
        value = stats
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, int), key


def test_stats_are_exactly_the_seed(admin, default_seed, sql_scalar):
    # Only reads in this project: the numbers must be exactly the default seed, whatever
    # the other projects running in parallel do to their own databases.
    stats = admin.get_json("/api/stats")
    assert stats["work_orders"]["total"] == default_seed["work_orders"]
    assert stats["work_orders"]["by_status"] == default_seed["work_orders_by_status"]
    assert stats["inventory"]["items"] == default_seed["inventory_items"]
    assert stats["inventory"]["movements"] == default_seed["stock_movements"]
    assert stats["quality"]["checks"] == default_seed["quality_checks"]
    assert stats["products"] == default_seed["products"]
    assert stats["users"] == default_seed["users"]
    assert stats["inventory"]["low_stock"] == sql_scalar(
        "SELECT count(*) FROM inventory_items WHERE quantity < reorder_point"
    )
    assert stats["machines"]["down"] == sql_scalar(
        "SELECT count(*) FROM machines WHERE status = 'down'"
    )


def test_work_orders_page_data(frontend, admin, default_seed):
    html = frontend.get("/work_orders.html").text
    assert 'id="work-orders"' in html
    page = admin.get_json("/api/work-orders?limit=100")
    assert page["total"] == default_seed["work_orders"]
    assert len(page["items"]) == 100
    assert {"number", "sku", "quantity", "status", "priority", "due_date"} <= set(page["items"][0])
