"""Tests run in file order; the counts are exact, so a database shared with another
project (or left over from an earlier run) makes them fail."""

import datetime as dt

TAG = "e2e work_orders"


def create(admin, created, project_name, **fields):
    body = {"sku": "FG-001", "quantity": 10, "notes": f"{TAG} {project_name}", **fields}
    wo = admin.post_json("/api/work-orders", body, expected=201)
    created.append(wo["id"])
    return wo


def test_fresh_database_has_exactly_the_seeded_work_orders(admin, default_seed, sql_scalar):
    page = admin.get_json("/api/work-orders?limit=5")
    assert page["total"] == default_seed["work_orders"], "database is not a fresh default seed"
    assert len(page["items"]) == 5
    assert sql_scalar("SELECT count(*) FROM work_orders") == default_seed["work_orders"]
    for status, count in default_seed["work_orders_by_status"].items():
        assert admin.get_json(f"/api/work-orders?status={status}&limit=1")["total"] == count


def test_list_paginates_and_validates_filters(admin):
    first = admin.get_json("/api/work-orders?limit=10&offset=0")["items"]
    second = admin.get_json("/api/work-orders?limit=10&offset=10")["items"]
    assert len(first) == len(second) == 10
    assert {w["id"] for w in first}.isdisjoint(w["id"] for w in second)
    assert admin.get("/api/work-orders?status=exploded").status == 400
    assert admin.get("/api/work-orders?limit=0").status == 400
    assert admin.get("/api/work-orders?limit=abc").status == 400


def test_get_one_and_404(admin):
    some = admin.get_json("/api/work-orders?limit=1")["items"][0]
    wo = admin.get_json(f"/api/work-orders/{some['id']}")
    assert wo["number"] == some["number"]
    assert [s["step_no"] for s in wo["steps"]] == [1, 2, 3, 4]
    missing = admin.get("/api/work-orders/999999999")
    assert missing.status == 404
    assert missing.json()["error"] == "not_found"


def test_create_work_order_is_written_to_the_project_database(
    admin, created, project_name, db, default_seed
):
    due = (dt.date.today() + dt.timedelta(days=14)).isoformat()
    wo = create(admin, created, project_name, sku="FG-007", quantity=25, priority=1, due_date=due)
    assert wo["status"] == "planned"
    assert wo["sku"] == "FG-007"
    assert wo["quantity"] == 25
    assert wo["due_date"] == due
    assert wo["number"].startswith("WO-")
    row = db.execute(
        "SELECT w.number, p.sku, w.quantity, w.status FROM work_orders w"
        " JOIN products p ON p.id = w.product_id WHERE w.id = %s",
        (wo["id"],),
    ).fetchone()
    assert row == (wo["number"], "FG-007", 25, "planned")
    steps = db.execute(
        "SELECT count(*) FROM work_order_steps WHERE work_order_id = %s", (wo["id"],)
    )
    assert steps.fetchone() == (4,)
    assert admin.get_json("/api/work-orders?limit=1")["total"] == default_seed["work_orders"] + 1


def test_create_validates_input(admin):
    cases = [
        ({"quantity": 5}, 400),  # no product
        ({"sku": "FG-001", "quantity": 0}, 400),
        ({"sku": "FG-001", "quantity": "5"}, 400),
        ({"sku": "FG-001", "quantity": 5, "priority": 9}, 400),
        ({"sku": "FG-001", "quantity": 5, "due_date": "next week"}, 400),
        ({"sku": "NOPE-1", "quantity": 5}, 404),
    ]
    for body, status in cases:
        resp = admin.post("/api/work-orders", body)
        assert resp.status == status, (body, resp.text)
    assert admin.post("/api/work-orders", data=b"{oops").status == 400


def test_status_transitions(admin, created, project_name, sql_scalar):
    wo = create(admin, created, project_name)
    path = f"/api/work-orders/{wo['id']}/status"
    for status in ("released", "in_progress", "on_hold", "in_progress", "completed"):
        assert admin.post_json(path, {"status": status})["status"] == status
    done = admin.get_json(f"/api/work-orders/{wo['id']}")
    assert done["quantity_done"] == done["quantity"]
    history = "SELECT count(*) FROM work_order_status_history WHERE work_order_id = %s"
    assert sql_scalar(history, (wo["id"],)) == 6  # created + 5 changes


def test_invalid_transitions_are_conflicts(admin, created, project_name):
    wo = create(admin, created, project_name)
    path = f"/api/work-orders/{wo['id']}/status"
    resp = admin.post(path, {"status": "completed"})  # planned -> completed is not allowed
    assert resp.status == 409
    assert "planned" in resp.json()["message"]
    assert admin.post(path, {"status": "teleported"}).status == 400
    assert admin.post_json(path, {"status": "cancelled"})["status"] == "cancelled"
    assert admin.post(path, {"status": "released"}).status == 409  # cancelled is final
    assert admin.post("/api/work-orders/999999999/status", {"status": "released"}).status == 404


def test_operators_can_create_and_anonymous_users_cannot(operator, backend, created, project_name):
    wo = create(operator, created, project_name, sku="FG-002", quantity=3)
    assert wo["sku"] == "FG-002"
    assert backend.post("/api/work-orders", {"sku": "FG-001", "quantity": 1}).status == 401


def test_exact_counts_after_this_suites_writes(admin, created, default_seed, project_name, db):
    # Isolation: only this project's writes are in this database.
    assert len(created) == 4
    total = admin.get_json("/api/work-orders?limit=1")["total"]
    assert total == default_seed["work_orders"] + len(created)
    rows = db.execute("SELECT id FROM work_orders WHERE notes LIKE %s ORDER BY id", (f"{TAG} %",))
    ids = [r[0] for r in rows.fetchall()]
    assert ids == sorted(created)
    notes = db.execute("SELECT DISTINCT notes FROM work_orders WHERE id = ANY(%s)", (created,))
    assert [r[0] for r in notes.fetchall()] == [f"{TAG} {project_name}"]
    planned = default_seed["work_orders_by_status"]["planned"] + 2  # FG-007 and FG-002 orders
    assert admin.get_json("/api/work-orders?status=planned&limit=1")["total"] == planned
