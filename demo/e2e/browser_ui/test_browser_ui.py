"""Log in through the real frontend in Chromium, read seeded data, change it, check it in SQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from playwright.sync_api import Locator, Page, expect

PASSWORDS = {"admin": "admin-pass"}  # demo/seeds/default/0001_users.sql
# WO-000001 is the seed's first work order (n = 1): planned, FG-002, quantity 15.
SEEDED_NUMBER = "WO-000001"
STATUS_COLUMN = 3  # Number, Product, Qty, Status, ...


def log_in(page: Page, frontend_url: str, username: str) -> None:
    page.goto(f"{frontend_url}/login.html")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORDS[username])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{frontend_url}/")
    expect(page.locator("#whoami")).to_have_text(f"logged in as {username}")


def work_order_row(page: Page, number: str) -> Locator:
    return page.locator("#work-orders tbody tr").filter(has=page.locator("td", has_text=number))


def test_login_shows_the_dashboard_of_the_seeded_database(
    page: Page, frontend_url: str, default_seed: dict[str, Any]
) -> None:
    log_in(page, frontend_url, "admin")
    expect(page.locator('[data-stat="work_orders.total"]')).to_have_text(
        str(default_seed["work_orders"])
    )
    expect(page.locator('[data-stat="work_orders.by_status.in_progress"]')).to_have_text(
        str(default_seed["work_orders_by_status"]["in_progress"])
    )


def test_a_bad_password_shows_the_error_and_stays_logged_out(page: Page, frontend_url: str) -> None:
    page.goto(f"{frontend_url}/login.html")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#error")).to_be_visible()
    assert page.evaluate("window.localStorage.getItem('demo-mes-token')") is None


def test_releasing_a_seeded_work_order_in_the_page_writes_the_database(
    page: Page, frontend_url: str, sql_scalar: Callable[..., Any]
) -> None:
    log_in(page, frontend_url, "admin")
    page.get_by_role("link", name="Work orders").click()
    row = work_order_row(page, SEEDED_NUMBER)
    expect(row.locator("td").nth(1)).to_have_text("FG-002")
    expect(row.locator("td").nth(STATUS_COLUMN)).to_have_text("planned")

    row.get_by_role("button", name="released").click()

    expect(row.locator("td").nth(STATUS_COLUMN)).to_have_text("released")
    assert sql_scalar("SELECT status FROM work_orders WHERE number = %s", (SEEDED_NUMBER,)) == (
        "released"
    )
    changed_by = sql_scalar(
        """
        SELECT u.username FROM work_order_status_history h
        JOIN work_orders w ON w.id = h.work_order_id JOIN users u ON u.id = h.changed_by
        WHERE w.number = %s AND h.from_status = 'planned' AND h.to_status = 'released'
        """,
        (SEEDED_NUMBER,),
    )
    assert changed_by == "admin"
