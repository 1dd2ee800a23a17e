from concurrent.futures import ThreadPoolExecutor


def movement_sum(sql_scalar, item_id):
    return sql_scalar(
        "SELECT coalesce(sum(delta), 0) FROM stock_movements WHERE inventory_item_id = %s",
        (item_id,),
    )


def test_fresh_database_has_exactly_the_seeded_inventory(admin, default_seed, sql_scalar):
    page = admin.get_json("/api/inventory?limit=500")
    assert page["total"] == default_seed["inventory_items"]
    assert len(page["items"]) == default_seed["inventory_items"]
    assert sql_scalar("SELECT count(*) FROM stock_movements") == default_seed["stock_movements"]
    # Every seeded on-hand quantity equals the sum of its movements.
    mismatched = sql_scalar(
        "SELECT count(*) FROM inventory_items i WHERE i.quantity <>"
        " (SELECT coalesce(sum(delta), 0) FROM stock_movements m"
        "  WHERE m.inventory_item_id = i.id)"
    )
    assert mismatched == 0


def test_filters(admin, sql_scalar):
    low = admin.get_json("/api/inventory?low_stock=true&limit=500")
    assert low["total"] == sql_scalar(
        "SELECT count(*) FROM inventory_items WHERE quantity < reorder_point"
    )
    assert all(i["low_stock"] for i in low["items"])
    wh1 = admin.get_json("/api/inventory?location=PLANT-A-WH1&limit=500")
    assert wh1["total"] == 60  # every product is stocked once per location
    assert admin.get("/api/inventory?low_stock=maybe").status == 400


def test_adjust_up_records_a_movement(operator, item, sql_scalar):
    before = operator.get_json(f"/api/inventory/{item['id']}")["quantity"]
    result = operator.post_json(
        f"/api/inventory/{item['id']}/adjust", {"delta": 12.5, "reason": "receipt", "note": "e2e"}
    )
    assert result["item"]["quantity"] == before + 12.5
    assert result["movement"]["delta"] == 12.5
    assert result["movement"]["reason"] == "receipt"
    row = sql_scalar("SELECT quantity FROM inventory_items WHERE id = %s", (item["id"],))
    assert float(row) == before + 12.5
    assert float(movement_sum(sql_scalar, item["id"])) == before + 12.5
    movements = operator.get_json(f"/api/inventory/{item['id']}/movements")["items"]
    assert movements[-1]["id"] == result["movement"]["id"]


def test_negative_stock_is_refused_with_409(operator, item, sql_scalar):
    current = operator.get_json(f"/api/inventory/{item['id']}")["quantity"]
    movements_before = sql_scalar("SELECT count(*) FROM stock_movements")
    resp = operator.post(f"/api/inventory/{item['id']}/adjust", {"delta": -(current + 1)})
    assert resp.status == 409, resp.text
    assert resp.json()["error"] == "conflict"
    assert operator.get_json(f"/api/inventory/{item['id']}")["quantity"] == current
    assert sql_scalar("SELECT count(*) FROM stock_movements") == movements_before


def test_adjust_down_to_exactly_zero(operator, item):
    current = operator.get_json(f"/api/inventory/{item['id']}")["quantity"]
    result = operator.post_json(
        f"/api/inventory/{item['id']}/adjust", {"delta": -current, "reason": "scrap"}
    )
    assert result["item"]["quantity"] == 0
    assert result["item"]["low_stock"] is True
    assert operator.post(f"/api/inventory/{item['id']}/adjust", {"delta": -0.001}).status == 409


def test_concurrent_adjustments_never_oversell(admin, operator, item, sql_scalar):
    admin.post_json(f"/api/inventory/{item['id']}/adjust", {"delta": 5, "reason": "receipt"})
    path = f"/api/inventory/{item['id']}/adjust"
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: operator.post(path, {"delta": -1}).status, range(8)))
    assert sorted(statuses) == [200] * 5 + [409] * 3
    assert operator.get_json(f"/api/inventory/{item['id']}")["quantity"] == 0
    assert movement_sum(sql_scalar, item["id"]) == 0


def test_adjust_validates_input(operator, item):
    path = f"/api/inventory/{item['id']}/adjust"
    for body in (
        {},
        {"delta": 0},
        {"delta": "3"},
        {"delta": True},
        {"delta": 0.0001},
        {"delta": 1, "reason": "theft"},
    ):
        assert operator.post(path, body).status == 400, body
    assert operator.post(path, data=b"not json").status == 400
    assert operator.post("/api/inventory/999999999/adjust", {"delta": 1}).status == 404
    assert operator.get("/api/inventory/999999999").status == 404


def test_only_this_suites_movements_were_added(admin, item, default_seed, sql_scalar, db):
    # 1 receipt + 1 scrap + 1 receipt + 5 concurrent issues = 8 new movements,
    # all on this suite's item: nothing else wrote to this project's database.
    added = sql_scalar("SELECT count(*) FROM stock_movements") - default_seed["stock_movements"]
    assert added == 8
    per_item = db.execute(
        "SELECT inventory_item_id, count(*) FROM"
        " (SELECT inventory_item_id FROM stock_movements ORDER BY id DESC LIMIT 8) AS s"
        " GROUP BY 1"
    ).fetchall()
    assert per_item == [(item["id"], 8)]
    assert (
        admin.get_json("/api/stats")["inventory"]["movements"]
        == default_seed["stock_movements"] + 8
    )
