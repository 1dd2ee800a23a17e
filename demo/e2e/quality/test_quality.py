def test_fresh_database_has_exactly_the_seeded_checks(inspector, default_seed):
    assert (
        inspector.get_json("/api/quality-checks?limit=1")["total"] == default_seed["quality_checks"]
    )
    assert (
        inspector.get_json("/api/quality-checks?result=fail&limit=1")["total"]
        == default_seed["quality_fail"]
    )
    page = inspector.get_json("/api/quality-checks?result=fail&limit=5")
    assert all(c["result"] == "fail" and c["defects"] for c in page["items"])


def test_new_work_order_has_no_checks(inspector, work_order):
    page = inspector.get_json(f"/api/quality-checks?work_order_id={work_order['id']}")
    assert page == {"items": [], "total": 0, "limit": 50, "offset": 0}


def test_record_a_passing_check(inspector, work_order, sql_scalar):
    check = inspector.post_json(
        "/api/quality-checks",
        {"work_order_id": work_order["id"], "result": "pass", "measured_value": 100.1},
        expected=201,
    )
    assert check["result"] == "pass"
    assert check["inspector"] == "inspector"
    assert check["measured_value"] == 100.1
    row = sql_scalar("SELECT result FROM quality_checks WHERE id = %s", (check["id"],))
    assert row == "pass"


def test_record_a_failing_check_with_defects(inspector, work_order, db):
    check = inspector.post_json(
        "/api/quality-checks",
        {
            "work_order_id": work_order["id"],
            "result": "fail",
            "measured_value": 101.3,
            "notes": "out of tolerance",
            "defects": [{"code": "DIM_OUT", "quantity": 3}, {"code": "SCRATCH"}],
        },
        expected=201,
    )
    rows = db.execute(
        "SELECT defect_code, quantity FROM defects WHERE quality_check_id = %s ORDER BY id",
        (check["id"],),
    ).fetchall()
    assert rows == [("DIM_OUT", 3), ("SCRATCH", 1)]


def test_operators_may_not_record_checks(operator, work_order):
    resp = operator.post(
        "/api/quality-checks", {"work_order_id": work_order["id"], "result": "pass"}
    )
    assert resp.status == 403
    assert resp.json()["error"] == "forbidden"


def test_validation_and_missing_work_orders(inspector, work_order, admin, project_name):
    wid = work_order["id"]
    bad = [
        {"work_order_id": wid, "result": "maybe"},
        {"work_order_id": wid},
        {"work_order_id": "x", "result": "pass"},
        {"work_order_id": wid, "result": "fail", "defects": [{"code": "NOT_A_CODE"}]},
        {"work_order_id": wid, "result": "pass", "defects": [{"code": "DENT"}]},
        {"work_order_id": wid, "result": "pass", "measured_value": "big"},
    ]
    for body in bad:
        assert inspector.post("/api/quality-checks", body).status == 400, body
    missing = inspector.post("/api/quality-checks", {"work_order_id": 999999999, "result": "pass"})
    assert missing.status == 404
    planned = admin.post_json(
        "/api/work-orders",
        {"sku": "FG-011", "quantity": 1, "notes": f"e2e quality {project_name}"},
        expected=201,
    )
    resp = inspector.post("/api/quality-checks", {"work_order_id": planned["id"], "result": "pass"})
    assert resp.status == 409  # nothing to inspect on a planned order


def test_checks_are_listed_per_work_order(inspector, work_order):
    page = inspector.get_json(f"/api/quality-checks?work_order_id={work_order['id']}")
    assert page["total"] == 2
    assert [c["result"] for c in page["items"]] == ["pass", "fail"]
    assert page["items"][1]["defects"] == [
        {"code": "DIM_OUT", "quantity": 3},
        {"code": "SCRATCH", "quantity": 1},
    ]


def test_stats_count_exactly_this_suites_checks(inspector, default_seed, sql_scalar):
    quality = inspector.get_json("/api/stats")["quality"]
    assert quality == {
        "checks": default_seed["quality_checks"] + 2,
        "pass": default_seed["quality_pass"] + 1,
        "fail": default_seed["quality_fail"] + 1,
        "defects": default_seed["defects"] + 2,
    }
    assert sql_scalar("SELECT count(*) FROM work_orders") == default_seed["work_orders"] + 2
