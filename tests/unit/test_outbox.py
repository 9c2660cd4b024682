"""The outbox's own rules: its table, its serializers, its routing, and its refusals; on the fake and SQLite."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from typing import Any

import attrs
import cattrs.preconf.json
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine
from sqlalchemy.pool import StaticPool

import uow
from tests.support.models import Item, metadata
from tests.support.uows import FakeAuditUnitOfWork, FakeShopUnitOfWork, SqlAlchemyAuditUnitOfWork


@attrs.frozen
class Allocated:
    orderid: str
    when: datetime.datetime


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int


def test_the_default_serializer_writes_attrs_dataclasses_and_common_values_as_json() -> None:
    """attrs and dataclass instances become objects; dates, UUIDs, decimals, enums and sets become JSON values."""
    outbox = uow.Outbox(MetaData())
    when = datetime.datetime(2026, 12, 6, 1, 2, 3, tzinfo=datetime.timezone.utc)
    payload = {
        "event": Allocated("o1", when),
        "point": Point(3),
        "id": uuid.UUID(int=1),
        "price": decimal.Decimal("1.50"),
        "colour": Colour.RED,
        "tags": frozenset({"a"}),
        "day": when.date(),
    }
    _, body = outbox.message("t", payload, None, None)
    assert {
        "event": {"orderid": "o1", "when": "2026-12-06T01:02:03+00:00"},
        "point": {"x": 3},
        "id": "00000000-0000-0000-0000-000000000001",
        "price": "1.50",
        "colour": "red",
        "tags": ["a"],
        "day": "2026-12-06",
    } == json.loads(body)


def test_a_cattrs_converter_can_write_the_payloads() -> None:
    """serializer= takes a function returning text, such as a cattrs JSON converter's dumps."""
    converter = cattrs.preconf.json.make_converter()
    outbox = uow.Outbox(MetaData(), serializer=converter.dumps)
    when = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc)
    _, body = outbox.message("t", Allocated("o1", when), "o1", None)
    assert Allocated("o1", when) == converter.loads(body, Allocated)


def test_a_serializer_that_returns_neither_bytes_nor_text_is_refused() -> None:
    """A serializer's result other than bytes or str raises OutboxError naming what it returned."""
    outbox = uow.Outbox(MetaData(), serializer=lambda payload: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(uow.errors.OutboxError, match="returned 42"):
        outbox.message("t", {}, None, None)


def test_outboxes_of_one_metadata_share_its_table_and_another_table_of_that_name_is_refused() -> None:
    """A second Outbox of the same metadata uses the same table; a table of that name that is not one raises."""
    shared = MetaData()
    assert uow.Outbox(shared).table is uow.Outbox(shared, events=lambda event: None).table
    Table("uow_outbox", other := MetaData(), Column("id", Integer, primary_key=True))
    with pytest.raises(uow.errors.OutboxError, match="not an outbox"):
        uow.Outbox(other)
    with pytest.raises(uow.errors.OutboxError, match="MetaData"):
        uow.Outbox("metadata")  # type: ignore[arg-type]
    with pytest.raises(uow.errors.OutboxError, match="callables"):
        uow.Outbox(MetaData(), events="all")  # type: ignore[arg-type]


def test_publishing_without_an_outbox_is_refused_on_the_fake_and_the_database() -> None:
    """A unit of work class that declares no outbox raises OutboxError from publish(), fake and real alike."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    for unit in (FakeAuditUnitOfWork(), SqlAlchemyAuditUnitOfWork(engine)):
        with unit, pytest.raises(uow.errors.OutboxError, match="declare `outbox = uow.Outbox"):
            unit.publish("t", 1)


def _route_badly(event: Any) -> Any:
    return ("topic", event)


class BadlyRoutedUnitOfWork(FakeShopUnitOfWork):
    outbox = uow.Outbox(metadata, events=_route_badly)


def test_a_routing_function_that_returns_no_message_fails_the_commit_and_keeps_nothing() -> None:
    """events= returning something else than a Message raises OutboxError from commit(), which rolls back."""
    fake = BadlyRoutedUnitOfWork()
    with fake:
        item = Item("lamp")
        item.events.append("added")
        fake.items.add(item)
        with pytest.raises(uow.errors.OutboxError, match="returns a uow.Message"):
            fake.commit()
    assert ([], []) == (fake.database.rows(Item), fake.published)


def test_the_outbox_table_is_on_the_metadata_for_migrations() -> None:
    """The outbox's table is part of the application's metadata, so create_all() and Alembic see it."""
    assert FakeShopUnitOfWork.outbox is not None
    assert metadata.tables["uow_outbox"] is FakeShopUnitOfWork.outbox.table
    assert {"position", "message_id", "topic", "key", "payload", "headers", "published_at"} <= set(
        FakeShopUnitOfWork.outbox.table.c.keys()
    )


def test_the_fake_refuses_a_second_open_transaction_receiving_a_message_another_holds() -> None:
    """Where a database makes a second receive() wait for the first transaction, the fake raises at once."""
    from sqlalchemy.exc import OperationalError

    from tests.support.harness import fake_shop

    shop = fake_shop(FakeShopUnitOfWork, is_async=False)
    first, second = shop.new(), shop.new()
    with first:
        assert first.receive("m1")
        with second, pytest.raises(OperationalError, match="locked by another open transaction"):
            second.receive("m1")
        first.commit()
    with second:
        assert not second.receive("m1")
