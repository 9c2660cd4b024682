"""Mapped classes used across the test suite.

Plain attrs classes, mapped imperatively, as a cosmicpython domain would be.
``Item`` has a database-generated integer key, ``Sku`` a natural string key,
``Pair`` a composite key, and ``Order`` owns ``Line`` objects through a
relationship, to exercise save-update cascades.
"""

from __future__ import annotations

from typing import Any

import attrs
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, registry, relationship

import uow

metadata = MetaData()
mapper_registry = registry(metadata=metadata)


@attrs.define(eq=False, slots=False)
class Item:
    name: str
    qty: int = 0
    id: int | None = None
    events: list[object] = attrs.Factory(list)


@attrs.define(eq=False, slots=False)
class Sku:
    code: str
    description: str = ""
    stock: int = 0


@attrs.define(eq=False, slots=False)
class Pair:
    kind: str
    number: int
    label: str = ""


@attrs.define(eq=False, slots=False)
class Line:
    sku: str
    qty: int
    id: int | None = None


@attrs.define(eq=False, slots=False)
class Order:
    ref: str
    lines: list[Line] = attrs.Factory(list)


items = Table(
    "uow_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(50), nullable=False),
    Column("qty", Integer, nullable=False),
)
skus = Table(
    "uow_skus",
    metadata,
    Column("code", String(50), primary_key=True),
    Column("description", String(200), nullable=False),
    Column("stock", Integer, nullable=False),
)
pairs = Table(
    "uow_pairs",
    metadata,
    Column("kind", String(50), primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("label", String(50), nullable=False),
)
orders = Table("uow_orders", metadata, Column("ref", String(50), primary_key=True))
lines = Table(
    "uow_lines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", ForeignKey("uow_orders.ref"), nullable=False),
    Column("sku", String(50), nullable=False),
    Column("qty", Integer, nullable=False),
)

mapper_registry.map_imperatively(Item, items)
mapper_registry.map_imperatively(Sku, skus)
mapper_registry.map_imperatively(Pair, pairs)
mapper_registry.map_imperatively(Line, lines)
mapper_registry.map_imperatively(
    Order, orders, properties={"lines": relationship(Line, order_by=lines.c.id, lazy="selectin")}
)


class Base(DeclarativeBase):
    metadata = metadata


class Note(Base):
    """A declarative model, to show repositories work the same with both mapping styles."""

    __tablename__ = "uow_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100))
    pinned: Mapped[bool] = mapped_column(default=False)
    #: Nullable columns, for queries that meet NULL.
    rank: Mapped[int | None] = mapped_column(default=None)
    tag: Mapped[str | None] = mapped_column(String(20), default=None)
    #: A unique key beside the generated primary key, for upserts.
    slug: Mapped[str | None] = mapped_column(String(30), unique=True, default=None)


def route(event: Any) -> uow.Message | None:
    """The outbox's routing of domain events: a dict event with a topic is published; others are not."""
    if isinstance(event, dict) and "topic" in event:
        return uow.Message(event["topic"], event.get("payload"), key=event.get("key"))
    return None


#: The outbox of the shop's units of work, sync and async: one table on the models' metadata.
OUTBOX = uow.Outbox(metadata, events=route)


#: The inbox of the shop's units of work.
INBOX = uow.Inbox(metadata)


TABLES = (lines, orders, items, skus, pairs, Note.__table__, OUTBOX.table, INBOX.table)
