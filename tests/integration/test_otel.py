"""OpenTelemetry on real databases: statement spans nest under the transaction's, and its attributes and events."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import propagate
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.trace import SpanKind
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner
from tests.support.models import OUTBOX, Item, Sku
from tests.support.otel import Recorded, events
from tests.support.uows import AsyncSqlAlchemyShopUnitOfWork, SqlAlchemyShopUnitOfWork
from uow.relay import InMemoryBroker, Relay

UNIT = "SqlAlchemyShopUnitOfWork"
ROOT = Path(__file__).resolve().parents[2]

#: The code a duplicate key's IntegrityError carries on each backend: SQLSTATE, MySQL's error number, none.
DUPLICATE_CODE = {"postgresql": "23505", "mariadb": "1062", "sqlite": None}


@pytest.fixture
def statements(engine: Engine, otel: Recorded) -> Iterator[None]:
    """OpenTelemetry's SQLAlchemy instrumentation on *engine*, with the same tracer provider as uow's.

    Its releases up to 0.66b1 declare SQLAlchemy below 2.1 and instrument nothing on 2.1 unless told to
    skip that check; the instrumentation itself works on 2.1.
    """
    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(engine=engine, tracer_provider=otel.tracer_provider, skip_dep_check=True)
    try:
        yield
    finally:
        instrumentor.uninstrument()


def test_statement_spans_nest_under_the_transaction_span(engine: Engine, otel: Recorded, statements: None) -> None:
    """Every statement the transaction runs is a child span of the transaction's span."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        unit.skus.add(Sku("LAMP"))
        assert [] == unit.items.list(name="none")
        unit.commit()
    tree = otel.tree()
    assert (UNIT, None) == tree[-1]
    children = tree[:-1]
    assert len(children) >= 2  # the SELECT and the INSERT, and what the dialect adds (BEGIN, COMMIT, connect)
    assert all(parent == UNIT for _, parent in children), tree
    assert [("LAMP",)] == rows(engine, "SELECT code FROM uow_skus")


def test_flushed_objects_are_counted_per_model(engine: Engine, otel: Recorded) -> None:
    """uow.flushed.<Model> counts the objects the transaction's flushes inserted, updated and deleted."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        unit.items.add(Item("box", 1))
        unit.commit()
    with unit:
        [box] = unit.items.list()
        box.qty = 2
        unit.skus.add_all([Sku("A"), Sku("B")])
        unit.session.flush()
        first_sku = unit.skus.get("A")
        assert first_sku is not None
        unit.skus.remove(first_sku)
        unit.commit()
    first, second = otel.spans()
    assert 1 == (first.attributes or {})["uow.flushed.Item"]
    attributes = second.attributes or {}
    assert (1, 3) == (attributes["uow.flushed.Item"], attributes["uow.flushed.Sku"])
    assert [("B",)] == rows(engine, "SELECT code FROM uow_skus")


def test_a_failed_commit_names_the_database_error(engine: Engine, database: Database, otel: Recorded) -> None:
    """A duplicate key: outcome failed_commit, and the rollback event carries the database's error code."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        unit.skus.add(Sku("DUP"))
        unit.commit()
    with unit:
        unit.skus.add(Sku("DUP"))
        with pytest.raises(IntegrityError):
            unit.commit()
    span = otel.spans()[-1]
    assert "failed_commit" == (span.attributes or {})["uow.outcome"]
    assert ["uow.rollback"] == events(span)
    rollback = span.events[0].attributes or {}
    assert "IntegrityError" == rollback["error.type"]
    assert DUPLICATE_CODE[database.backend] == rollback.get("db.response.status_code")
    assert [("DUP",)] == rows(engine, "SELECT code FROM uow_skus")


async def test_async_transactions_count_their_flushes(
    engine: Engine, database: Database, provisioner: Provisioner, otel: Recorded
) -> None:
    """An async unit of work on each backend's async driver: one span, committed, its flushes counted."""
    eng = create_async_engine(database.async_url)
    provisioner.track(eng.sync_engine)
    try:
        unit = AsyncSqlAlchemyShopUnitOfWork(eng)
        async with unit:
            await unit.skus.add(Sku("ASYNC"))
            await unit.commit()
    finally:
        await eng.dispose()
    span = otel.span("AsyncSqlAlchemyShopUnitOfWork")
    assert ("committed", 1) == ((span.attributes or {})["uow.outcome"], (span.attributes or {})["uow.flushed.Sku"])
    assert [("ASYNC",)] == rows(engine, "SELECT code FROM uow_skus")


async def test_a_relayed_message_continues_the_trace_of_its_transaction(
    engine: Engine, database: Database, provisioner: Provisioner, otel: Recorded
) -> None:
    """publish() stores the trace in the message; the relay's send span continues it; a consumer's block nests."""
    tracer = otel.tracer_provider.get_tracer("test")
    unit = SqlAlchemyShopUnitOfWork(engine)
    with tracer.start_as_current_span("POST /orders"), unit:
        unit.publish("orders", {"order": 1}, key="a")
        unit.commit()
    [stored] = rows(engine, "SELECT headers FROM uow_outbox")
    assert "traceparent" in str(stored[0])  # kept with the message, read back without uow
    built = create_async_engine(database.async_url)
    provisioner.track(built.sync_engine)
    broker = InMemoryBroker()
    try:
        assert 1 == await Relay(built, OUTBOX, broker).relay_once()
    finally:
        await built.dispose()
    [record] = broker.received
    with (
        tracer.start_as_current_span(
            "process orders", context=propagate.extract(record.headers), kind=SpanKind.CONSUMER
        ),
        unit,
    ):
        assert unit.receive(record.id, consumer="orders-view")
        unit.commit()
    assert [
        (UNIT, "POST /orders"),
        ("POST /orders", None),
        ("send orders", UNIT),
        (UNIT, "process orders"),
        ("process orders", "send orders"),
    ] == otel.tree()
    send = otel.span("send orders")
    assert ("memory", "orders", record.id) == tuple(
        (send.attributes or {})[name]
        for name in ("messaging.system", "messaging.destination.name", "messaging.message.id")
    )
    assert 1 == len({span.context.trace_id for span in otel.spans()})  # one trace, from the request to the consumer


def test_the_time_to_get_a_connection_is_recorded(engine: Engine, otel: Recorded) -> None:
    """With OpenTelemetry on, each transaction's wait for its connection goes to db.client.connection.wait_time."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    for code in ("A", "B"):
        with unit:
            unit.skus.add(Sku(code))
            unit.commit()
    assert [({"uow.unit_of_work": UNIT}, 2)] == otel.points("db.client.connection.wait_time")
    assert [("A",), ("B",)] == rows(engine, "SELECT code FROM uow_skus ORDER BY code")


#: A service run under `opentelemetry-instrument`: no call to the instrumentor in the program itself.
AUTO_INSTRUMENTED = """
import sys

from sqlalchemy import create_engine

from tests.support.models import Sku, metadata
from tests.support.uows import SqlAlchemyShopUnitOfWork

engine = create_engine(sys.argv[1])
metadata.create_all(engine)
unit = SqlAlchemyShopUnitOfWork(engine)
with unit:
    unit.skus.add(Sku("AUTO"))
    unit.commit()
"""


def test_opentelemetry_instrument_switches_it_on(tmp_path: Path) -> None:
    """A program run under opentelemetry-instrument gets its transaction spans through uow's entry point."""
    script = tmp_path / "service.py"
    script.write_text(AUTO_INSTRUMENTED)
    url = f"sqlite:///{tmp_path / 'service.sqlite3'}"
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "sqlalchemy,flask,asgi",
    }
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    done = subprocess.run(
        [str(instrument), sys.executable, str(script), url],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    spans = [json.loads(chunk) for chunk in re.findall(r"^\{\n.*?^\}$", done.stdout, flags=re.MULTILINE | re.DOTALL)]
    [span] = [span for span in spans if span["name"] == UNIT]
    assert ("committed", 1) == (span["attributes"]["uow.outcome"], span["attributes"]["uow.flushed.Sku"])
    reader = create_engine(url)
    try:
        assert [("AUTO",)] == rows(reader, "SELECT code FROM uow_skus")
    finally:
        reader.dispose()


async def test_the_relay_counts_what_it_sent_and_measures_the_lag(
    engine: Engine, database: Database, provisioner: Provisioner, otel: Recorded
) -> None:
    """uow.relay.messages counts published, refused and dead messages; uow.relay.lag records each published one."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        for payload, key in (("bad", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")):
            unit.publish("orders", payload, key=key)
        unit.commit()
    built = create_async_engine(database.async_url)
    provisioner.track(built.sync_engine)
    broker = InMemoryBroker(refuse=lambda record: ValueError("no") if b"bad" in record.payload else None)
    try:
        relay = Relay(built, OUTBOX, broker, max_attempts=2, backoff=lambda attempts: 0.0)
        assert 2 == await relay.relay_once()  # b1 and b2; "bad" refused once, a2 waits behind it
        assert 0 == await relay.relay_once()  # "bad" refused again: dead
        assert 1 == await relay.relay_once()  # a2 goes on without it
    finally:
        await built.dispose()
    counted = {point["uow.relay.result"]: value for point, value in otel.points("uow.relay.messages")}
    assert {"published": 3, "refused": 1, "dead": 1} == counted
    [(attributes, lagged)] = otel.points("uow.relay.lag")
    assert ({"messaging.system": "memory", "messaging.destination.name": "orders"}, 3) == (attributes, lagged)
    published, dead = rows(engine, "SELECT COUNT(published_at), COUNT(dead_at) FROM uow_outbox")[
        0
    ]  # read back without the relay: three sent, one parked
    assert (3, 1) == (published, dead)
