"""The allocation service's FastAPI entry point end to end, through httpx's ASGI client, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import date
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, inspect, text

from allocation import orm, services
from allocation.domain import OrderLine, Product
from allocation.fastapi_app import create_app
from allocation.repository import SqlAlchemyProductRepository

from .conftest import ALLOCATIONS, checked_out, timeline_of

if TYPE_CHECKING:
    from .conftest import Rows

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


def app_engine(app: FastAPI) -> Engine:
    """The engine that *app* built."""
    engine = app.state.engine
    assert isinstance(engine, Engine)
    return engine


@pytest.fixture(name="app")
async def _app(engine: Engine) -> AsyncIterator[FastAPI]:
    """The app, started, on the test's fresh tables; at the end, its engine must have every connection back."""
    app = create_app(engine.url.render_as_string(hide_password=False))
    async with app.router.lifespan_context(app):  # what a server does at startup and shutdown
        yield app
        leaked = checked_out(app_engine(app))
    assert 0 == leaked, f"{leaked} connection(s) of the app's engine were still checked out"


@pytest.fixture(name="client")
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of *app*; an error in the application comes back as the 500 a client would get."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture(name="timeline")
def _timeline(app: FastAPI) -> Iterator[list[str]]:
    """What happens, in order: "COMMIT" for each commit on the app's engine, and what the allocation logger logs."""
    with timeline_of(app_engine(app)) as entries:
        yield entries


async def post(client: httpx.AsyncClient, path: str, **body: Any) -> httpx.Response:
    return await client.post(path, json=body)


async def add_batch(client: httpx.AsyncClient, ref: str, sku: str, qty: int, eta: str | None = None) -> None:
    assert 201 == (await post(client, "/add_batch", ref=ref, sku=sku, qty=qty, eta=eta)).status_code


async def test_add_batch_commits_the_product_and_its_batch(client: httpx.AsyncClient, rows: Rows) -> None:
    """POST /add_batch answers 201, and the product and its batch are in the database."""
    response = await post(client, "/add_batch", ref="b1", sku="CRUNCHY-ARMCHAIR", qty=100, eta="2030-01-31")

    assert (201, {"ref": "b1"}) == (response.status_code, response.json())
    assert [("CRUNCHY-ARMCHAIR", 0)] == rows("SELECT sku, version_number FROM products")
    assert [("b1", "CRUNCHY-ARMCHAIR", 100, date(2030, 1, 31))] == [
        (ref, sku, qty, date.fromisoformat(str(eta)))
        for ref, sku, qty, eta in rows("SELECT reference, sku, purchased_quantity, eta FROM batches")
    ]


async def test_allocate_returns_the_batch_and_commits_once(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows
) -> None:
    """POST /allocate answers 201 with the preferred batch, which the allocate service committed in one commit."""
    await add_batch(client, "shipment-batch", "RETRO-CLOCK", 100, "2030-01-01")
    await add_batch(client, "in-stock-batch", "RETRO-CLOCK", 100)
    timeline.clear()

    response = await post(client, "/allocate", orderid="o1", sku="RETRO-CLOCK", qty=10)

    assert (201, {"batchref": "in-stock-batch"}) == (response.status_code, response.json())
    assert ["COMMIT"] == timeline
    assert [("in-stock-batch", "o1", 10)] == rows(ALLOCATIONS)
    assert [(1,)] == rows("SELECT version_number FROM products")


async def test_allocate_of_an_unknown_sku_is_a_400_and_commits_nothing(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows
) -> None:
    """POST /allocate of an unknown SKU answers 400 with the message, and commits nothing."""
    await add_batch(client, "b1", "AREALSKU", 100)
    timeline.clear()

    response = await post(client, "/allocate", orderid="o1", sku="NONEXISTENTSKU", qty=10)

    assert (400, {"message": "Invalid sku NONEXISTENTSKU"}) == (response.status_code, response.json())
    assert [] == timeline
    assert [(0,)] == rows("SELECT COUNT(*) FROM order_lines")
    assert [("AREALSKU", 0)] == rows("SELECT sku, version_number FROM products")


async def test_allocate_out_of_stock_allocates_nothing_and_reports_it_after_the_commit(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows
) -> None:
    """An order line that fits no batch gets a null batchref; the bus handles OutOfStock after the commit."""
    await add_batch(client, "b1", "POP-ART-VASE", 5)
    timeline.clear()

    response = await post(client, "/allocate", orderid="o1", sku="POP-ART-VASE", qty=10)

    assert (201, {"batchref": None}) == (response.status_code, response.json())
    assert ["COMMIT", "out of stock: POP-ART-VASE"] == timeline
    assert [] == rows(ALLOCATIONS)
    assert [(0,)] == rows("SELECT version_number FROM products")


async def test_change_batch_quantity_reallocates_after_the_commit(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows
) -> None:
    """Shrinking a batch commits the change, then the bus moves the line that came off it to the next batch."""
    await add_batch(client, "batch1", "INDIFFERENT-TABLE", 50)
    await add_batch(client, "batch2", "INDIFFERENT-TABLE", 50, "2030-01-01")
    for orderid in ("order1", "order2"):
        response = await post(client, "/allocate", orderid=orderid, sku="INDIFFERENT-TABLE", qty=20)
        assert {"batchref": "batch1"} == response.json()
    timeline.clear()

    response = await post(client, "/change_batch_quantity", ref="batch1", qty=25)

    assert (200, {"ref": "batch1", "qty": 25}) == (response.status_code, response.json())
    assert ["COMMIT", "COMMIT"] == timeline  # the change's, then the reallocation's
    assert [("batch1", "order1", 20), ("batch2", "order2", 20)] == rows(ALLOCATIONS)
    assert [("order1",), ("order2",)] == rows("SELECT orderid FROM order_lines ORDER BY orderid")  # no orphan
    assert [("batch1", 25), ("batch2", 50)] == rows(
        "SELECT reference, purchased_quantity FROM batches ORDER BY reference"
    )
    # two allocations, the change, the reallocation
    assert [(4,)] == rows("SELECT version_number FROM products")


async def test_change_quantity_of_an_unknown_batch_is_a_404_and_commits_nothing(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows
) -> None:
    """POST /change_batch_quantity of an unknown batch answers 404 with the message, and commits nothing."""
    await add_batch(client, "b1", "LONELY-STOOL", 10)
    timeline.clear()

    response = await post(client, "/change_batch_quantity", ref="nope", qty=5)

    assert (404, {"message": "Unknown batch nope"}) == (response.status_code, response.json())
    assert [] == timeline
    assert [("b1", 10)] == rows("SELECT reference, purchased_quantity FROM batches")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"orderid": "o1", "sku": "SCANDI-PEN"}, ["body", "qty"]),
        ({"orderid": 1, "sku": "SCANDI-PEN", "qty": 1}, ["body", "orderid"]),
        (["o1", "SCANDI-PEN", 1], ["body"]),
    ],
    ids=["missing", "number", "list"],
)
async def test_a_malformed_body_is_a_422_and_commits_nothing(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows, body: object, where: list[str]
) -> None:
    """A body that lacks a field or gives it the wrong type answers FastAPI's 422, and commits nothing."""
    await add_batch(client, "b1", "SCANDI-PEN", 10)
    timeline.clear()

    response = await client.post("/allocate", json=body)

    assert (422, [where]) == (response.status_code, [error["loc"] for error in response.json()["detail"]])
    assert [] == timeline
    assert [(0,)] == rows("SELECT COUNT(*) FROM order_lines")


async def test_a_malformed_eta_is_a_422_and_commits_nothing(client: httpx.AsyncClient, rows: Rows) -> None:
    """POST /add_batch with an eta that is not a date answers FastAPI's 422, and commits nothing."""
    response = await post(client, "/add_batch", ref="b1", sku="SCANDI-PEN", qty=10, eta="next week")

    assert (422, [["body", "eta"]]) == (response.status_code, [error["loc"] for error in response.json()["detail"]])
    assert [(0,)] == rows("SELECT COUNT(*) FROM products")


async def test_a_taken_batch_reference_is_a_409_and_commits_nothing(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows
) -> None:
    """POST /add_batch of a reference that exists answers 409 with the message, and commits nothing."""
    await add_batch(client, "b1", "GARISH-RUG", 100)
    timeline.clear()

    response = await post(client, "/add_batch", ref="b1", sku="OTHER-RUG", qty=5)

    assert (409, {"message": "Batch b1 already exists"}) == (response.status_code, response.json())
    assert [] == timeline
    assert [("b1", "GARISH-RUG", 100)] == rows("SELECT reference, sku, purchased_quantity FROM batches")


async def test_a_batch_added_concurrently_makes_the_commit_fail_with_a_409(
    client: httpx.AsyncClient, engine: Engine, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that another transaction commits after the duplicate check fails the service's commit: 409, JSON."""
    await add_batch(client, "b1", "GARISH-RUG", 100)
    check = SqlAlchemyProductRepository.get_by_batchref

    def check_then_lose_the_race(self: SqlAlchemyProductRepository, ref: str) -> Any:
        found = check(self, ref)
        with engine.begin() as connection:  # the concurrent request, committed first
            connection.execute(
                text("INSERT INTO batches (reference, sku, purchased_quantity) VALUES (:ref, 'GARISH-RUG', 7)"),
                {"ref": ref},
            )
        return found

    monkeypatch.setattr(SqlAlchemyProductRepository, "get_by_batchref", check_then_lose_the_race)

    response = await post(client, "/add_batch", ref="b2", sku="GARISH-RUG", qty=5)

    assert (409, {"message": "the request conflicts with a concurrent change; try again"}) == (
        response.status_code,
        response.json(),
    )
    assert [("b1", 100), ("b2", 7)] == rows("SELECT reference, purchased_quantity FROM batches ORDER BY reference")


async def test_an_allocation_that_loses_the_version_race_is_a_409(
    client: httpx.AsyncClient, engine: Engine, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A product that another transaction changed after it was loaded fails the commit (StaleDataError): 409, JSON."""
    await add_batch(client, "b1", "RACY-LAMP", 100)
    allocate = Product.allocate

    def allocate_then_lose_the_race(self: Product, line: OrderLine) -> str | None:
        batchref = allocate(self, line)
        with engine.begin() as connection:  # the concurrent request, committed first
            connection.execute(text("UPDATE products SET version_number = version_number + 1"))
        return batchref

    monkeypatch.setattr(Product, "allocate", allocate_then_lose_the_race)

    response = await post(client, "/allocate", orderid="o1", sku="RACY-LAMP", qty=10)

    assert (409, {"message": "the request conflicts with a concurrent change; try again"}) == (
        response.status_code,
        response.json(),
    )
    assert [] == rows(ALLOCATIONS)
    assert [(1,)] == rows("SELECT version_number FROM products")


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/add_batch", {"ref": "b2", "sku": "SCANDI-PEN", "qty": -1}, "batch b2 must be at least 1, not -1"),
        ("/allocate", {"orderid": "o1", "sku": "SCANDI-PEN", "qty": 0}, "order line o1 must be at least 1, not 0"),
        ("/change_batch_quantity", {"ref": "b1", "qty": -2}, "batch b1 must be at least 0, not -2"),
    ],
    ids=["add_batch", "allocate", "change_batch_quantity"],
)
async def test_a_refused_quantity_is_a_400_and_commits_nothing(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows, path: str, body: dict[str, object], message: str
) -> None:
    """A quantity under 1 (under 0 for a batch's new quantity) answers 400 with the message, and commits nothing."""
    await add_batch(client, "b1", "SCANDI-PEN", 10)
    assert 201 == (await post(client, "/allocate", orderid="o0", sku="SCANDI-PEN", qty=3)).status_code
    timeline.clear()

    response = await client.post(path, json=body)

    assert (400, {"message": f"the quantity of {message}"}) == (response.status_code, response.json())
    assert [] == timeline
    assert [("b1", 10)] == rows("SELECT reference, purchased_quantity FROM batches")
    assert [("b1", "o0", 3)] == rows(ALLOCATIONS)


async def test_fastapi_errors_come_as_json_messages(client: httpx.AsyncClient) -> None:
    """An unknown path and a wrong method answer {"message": ...}, with the Allow header of a 405."""
    missing, wrong_method = await client.get("/no-such-endpoint"), await client.get("/allocate")

    assert (404, {"message": "Not Found"}) == (missing.status_code, missing.json())
    assert (405, {"message": "Method Not Allowed"}, "POST") == (
        wrong_method.status_code,
        wrong_method.json(),
        wrong_method.headers["allow"],
    )


async def test_an_unexpected_error_is_a_json_500_that_hides_the_error(
    client: httpx.AsyncClient, timeline: list[str], rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that the app does not expect answers 500 {"message": "internal server error"}, and commits nothing."""
    await add_batch(client, "b1", "SCANDI-PEN", 10)
    timeline.clear()

    def fail(*args: object) -> None:
        raise RuntimeError("a detail for the log only")

    monkeypatch.setattr(services, "allocate", fail)

    response = await post(client, "/allocate", orderid="o1", sku="SCANDI-PEN", qty=1)

    assert (500, {"message": "internal server error"}) == (response.status_code, response.json())
    assert [] == timeline
    assert [(0,)] == rows("SELECT COUNT(*) FROM order_lines")


async def test_requests_leave_no_connection_checked_out(app: FastAPI, client: httpx.AsyncClient, rows: Rows) -> None:
    """After requests that commit, are refused and fail, every connection of the app's engine is back in its pool."""
    statuses = []
    for n in range(10):
        for path, body in [
            ("/add_batch", {"ref": f"b{n}", "sku": f"SKU-{n}", "qty": 10}),
            ("/add_batch", {"ref": f"b{n}", "sku": f"SKU-{n}", "qty": 10}),  # taken: 409
            ("/allocate", {"orderid": f"o{n}", "sku": f"SKU-{n}", "qty": 4}),
            ("/allocate", {"orderid": f"o{n}-big", "sku": f"SKU-{n}", "qty": 40}),
            ("/allocate", {"orderid": f"o{n}", "sku": "NO-SUCH-SKU", "qty": 4}),
            ("/change_batch_quantity", {"ref": f"b{n}", "qty": 2}),
        ]:
            statuses.append((await client.post(path, json=body)).status_code)

    assert [201, 409, 201, 201, 400, 200] * 10 == statuses
    assert 0 == checked_out(app_engine(app))
    assert [(10,)] == rows("SELECT COUNT(*) FROM batches WHERE purchased_quantity = 2")
    assert [(0,)] == rows("SELECT COUNT(*) FROM allocations")  # each line came off, and fits nowhere


async def test_create_app_takes_the_environment_database_and_creates_missing_tables(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_app() without a URL uses $DATABASE_URL; its startup creates the allocation tables if missing."""
    orm.metadata.drop_all(engine)
    url = engine.url.render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)

    app = create_app()
    async with app.router.lifespan_context(app):
        leaked = checked_out(app_engine(app))

    assert (url, 0) == (app_engine(app).url.render_as_string(hide_password=False), leaked)
    assert {"allocations", "batches", "order_lines", "products"} <= set(inspect(engine).get_table_names())


async def test_batches_lists_a_sku_a_page_at_a_time(client: httpx.AsyncClient, rows: Rows) -> None:
    """GET /batches pages a SKU's batches in allocation order with the total, and a wrong cursor is a JSON 400."""
    for ref, eta in (("late", "2027-03-01"), ("soon", "2027-01-01"), ("shelf", None)):
        await add_batch(client, ref, "LAMP", 10, eta)
    first = await client.get("/batches", params={"sku": "LAMP", "limit": 2})
    assert 200 == first.status_code
    body = first.json()
    assert (["shelf", "soon"], 3) == ([item["ref"] for item in body["items"]], body["total"])
    rest = (await client.get("/batches", params={"sku": "LAMP", "limit": 2, "after": body["next"]})).json()
    assert ([{"ref": "late", "sku": "LAMP", "qty": 10, "eta": "2027-03-01"}], None) == (rest["items"], rest["next"])
    wrong = await client.get("/batches", params={"sku": "LAMP", "after": "forged"})
    assert (400, True) == (wrong.status_code, "cursor" in wrong.json()["message"])
