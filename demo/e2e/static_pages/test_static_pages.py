"""The frontend must serve its pages with no backend and no database behind it."""

import os

import pytest

PAGES = {
    "/": "Dashboard",
    "/index.html": "Dashboard",
    "/login.html": "Log in",
    "/work_orders.html": "Work orders",
}


def test_project_has_no_database():
    # e2e-infra runs this project with `database = false`: it gets no DATABASE_URL.
    assert "DATABASE_URL" not in os.environ, (
        "static_pages is configured with database = false, yet DATABASE_URL is set"
    )


@pytest.mark.parametrize("path", sorted(PAGES))
def test_page_is_served_with_the_injected_backend_url(frontend, expected_backend_url, path):
    resp = frontend.get(path)
    assert resp.status == 200
    assert resp.header("Content-Type") == "text/html; charset=utf-8"
    assert f"<title>Demo MES - {PAGES[path]}</title>" in resp.text
    assert f'window.BACKEND_URL = "{expected_backend_url}";' in resp.text
    assert f'<meta name="backend-url" content="{expected_backend_url}">' in resp.text
    assert "%%BACKEND_URL%%" not in resp.text


def test_config_js(frontend, expected_backend_url):
    resp = frontend.get("/config.js")
    assert resp.status == 200
    assert resp.header("Content-Type").startswith("text/javascript")
    assert resp.text == f'window.BACKEND_URL = "{expected_backend_url}";\n'


def test_assets(frontend):
    js = frontend.get("/app.js")
    assert js.status == 200
    assert js.header("Content-Type").startswith("text/javascript")
    assert "window.BACKEND_URL" in js.text
    css = frontend.get("/style.css")
    assert css.status == 200
    assert css.header("Content-Type").startswith("text/css")
    assert ".card" in css.text


def test_clean_urls_and_missing_files(frontend):
    assert frontend.get("/login").status == 200  # /login -> login.html
    assert frontend.get("/does-not-exist.html").status == 404
    assert frontend.get("/static/app.js").status == 404


def test_no_path_traversal(frontend):
    for path in (
        "/../server.py",
        "/%2e%2e/server.py",
        "/..%2fserver.py",
        "/%2e%2e/%2e%2e/README.md",
    ):
        resp = frontend.get(path)
        assert resp.status == 404, path
        assert b"BACKEND_URL" not in resp.body, path


def test_head_requests(frontend):
    resp = frontend.request("HEAD", "/")
    assert resp.status == 200
    assert resp.body == b""
    assert int(resp.header("Content-Length")) > 0
