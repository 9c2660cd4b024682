"""The transactional outbox: messages written in the same commit as the data they announce.

A unit of work class declares its :class:`Outbox` as it declares its
repositories. ``uow.publish()`` stages a message in the transaction; the
owner's real commit writes the staged messages, and those routed from the
domain events of the objects it saw, to the outbox table in the same
transaction. A rollback drops them, and a savepoint that rolls back drops
its own. A relay reads the table afterwards and hands the messages to a
broker; nothing is sent before the data is committed.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
)
from sqlalchemy import insert as core_insert
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .errors import OutboxError, _shown

__all__ = ["Inbox", "Message", "Outbox"]

#: The longest topic and key the table holds.
_NAME_LENGTH = 255


def _new_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class Message:
    """One message for a broker: where it goes, what it says, and the key that orders it.

    Messages of one *key* reach the broker in the order they were committed;
    messages without a key have no order among themselves. *id* is unique:
    the relay sends it with the message so that consumers can drop a copy
    they already handled.
    """

    topic: str
    payload: Any
    key: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    id: str = attrs.field(factory=_new_id)


def _to_json(value: object) -> Any:
    """What :func:`json_serializer` writes for a value ``json`` does not know."""
    if attrs.has(type(value)):
        return attrs.asdict(value, recurse=False)  # type: ignore[arg-type]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    msg = (
        f"the default serializer writes JSON, and cannot write {_shown(value)}: publish plain data, attrs or "
        "dataclass instances, or give the outbox a serializer, such as a cattrs converter's dumps"
    )
    raise TypeError(msg)


def json_serializer(payload: object) -> bytes:
    """The default: JSON, with attrs and dataclass instances as objects, and dates, UUIDs and decimals as text."""
    return json.dumps(payload, default=_to_json, separators=(",", ":"), ensure_ascii=False).encode()


def notify_ddl(table: Table) -> list[str]:
    """PostgreSQL: the function and trigger that NOTIFY the table's channel (its name) after each INSERT into it.

    The notification goes out when the inserting transaction commits, and a
    relay that LISTENs starts its next pass at once instead of at its next
    poll. ``metadata.create_all()`` runs these statements; a migration runs
    them with ``op.execute()``.
    """
    name = table.name
    function = f"{name}_notify"
    qualified = f"{table.schema}.{name}" if table.schema else name
    return [
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{name}', ''); RETURN NULL; END $$",
        f"CREATE TRIGGER {function} AFTER INSERT ON {qualified} FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
    ]


def outbox_table(metadata: MetaData, name: str = "uow_outbox") -> Table:
    """The outbox table, on *metadata*, so that the application's migrations create it with its own tables."""
    table = Table(
        name,
        metadata,
        # The order of the outbox: messages of one key are sent in this order.
        Column("position", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("message_id", String(32), nullable=False, unique=True),
        Column("topic", String(_NAME_LENGTH), nullable=False),
        Column("key", String(_NAME_LENGTH), nullable=True),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        # The relay's progress: how often sending failed, when to try again, and when it was sent or given up.
        Column("attempts", Integer, nullable=False, default=0),
        Column("not_before", DateTime(timezone=True), nullable=True),
        Column("published_at", DateTime(timezone=True), nullable=True),
        Column("dead_at", DateTime(timezone=True), nullable=True),
        Column("last_error", Text, nullable=True),
        Index(f"ix_{name}_pending", "published_at", "dead_at", "position"),
        Index(f"ix_{name}_key", "key", "position"),
    )
    for statement in notify_ddl(table):
        event.listen(table, "after_create", DDL(statement).execute_if(dialect="postgresql"))  # type: ignore[no-untyped-call]
    return table


#: The columns of an outbox table, by name.
_COLUMNS = frozenset(column.name for column in outbox_table(MetaData()).columns)


class Outbox:
    """The outbox of a unit of work class: its table, how payloads are written, and which events it publishes.

    Declare it on the abstract unit of work, beside the repositories, so
    that the real unit of work and the fake share it::

        class ShopUnitOfWork(uow.UnitOfWork):
            batches = uow.repository(Batch)
            outbox = uow.Outbox(metadata, events=route)

    The table (``uow_outbox`` unless *table* names another) is added to
    *metadata*. *serializer* turns a payload into bytes (or text, written
    as UTF-8); JSON by default. *events*, if given, is called with every
    domain event that a committing transaction's objects raised, and
    returns the :class:`Message` to publish for it, or None.
    """

    def __init__(
        self,
        metadata: MetaData,
        *,
        table: str = "uow_outbox",
        serializer: Callable[[Any], bytes | str] = json_serializer,
        events: Callable[[Any], Message | None] | None = None,
    ) -> None:
        if not isinstance(metadata, MetaData):
            msg = f"Outbox() takes the MetaData of the application's tables, not {_shown(metadata)}"
            raise OutboxError(msg)
        if not callable(serializer) or (events is not None and not callable(events)):
            msg = "serializer= and events= take callables: one of a payload, one of a domain event"
            raise OutboxError(msg)
        existing = metadata.tables.get(table)
        if existing is None:
            self.table = outbox_table(metadata, table)
        elif {column.name for column in existing.columns} == _COLUMNS:
            self.table = existing  # another outbox of the same metadata: one table, as one database has
        else:
            msg = (
                f"the metadata has a table {table!r} that is not an outbox; give the outbox another name, "
                "Outbox(metadata, table=...)"
            )
            raise OutboxError(msg)
        self.serializer = serializer
        self.events = events
        #: The statement that writes messages: one object, so that SQLAlchemy works out its cache key once;
        #: inline, so that the database does not send the generated positions back.
        self._insert = core_insert(self.table).inline()

    def message(self, topic: object, payload: object, key: object, headers: object) -> tuple[Message, bytes]:
        """A checked message and its payload's bytes, serialized now: a payload that cannot be is refused here."""
        if not isinstance(topic, str) or not topic or len(topic) > _NAME_LENGTH:
            msg = f"a message's topic is a non-empty string of at most {_NAME_LENGTH} characters, not {_shown(topic)}"
            raise OutboxError(msg)
        if key is not None and (not isinstance(key, str) or len(key) > _NAME_LENGTH):
            msg = (
                f"a message's key is a string of at most {_NAME_LENGTH} characters, or None, not {_shown(key)}; "
                "for a numeric id, pass str(id)"
            )
            raise OutboxError(msg)
        shown_headers: dict[str, str] = {}
        if headers is not None:
            if not isinstance(headers, Mapping) or not all(
                isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
            ):
                msg = f"a message's headers are a mapping of strings to strings, not {_shown(headers)}"
                raise OutboxError(msg)
            shown_headers = dict(headers)
        message = Message(topic, payload, key, shown_headers)
        return message, self.body(message)

    def body(self, message: Message) -> bytes:
        """The bytes the outbox stores for *message*'s payload."""
        try:
            written = self.serializer(message.payload)
        except Exception as error:
            msg = f"the payload of a message to {message.topic!r} cannot be serialized: {error}"
            raise OutboxError(msg) from error
        if isinstance(written, str):
            return written.encode()
        if not isinstance(written, bytes):
            msg = f"the outbox's serializer returned {_shown(written)}; it must return bytes or str"
            raise OutboxError(msg)
        return written

    def routed(self, event: object) -> Message | None:
        """The message the outbox publishes for a domain event, if any."""
        route = self.events
        if route is None:
            return None
        found = route(event)
        if found is not None and not isinstance(found, Message):
            msg = (
                f"the outbox's events= function returned {_shown(found)} for {_shown(event)}; it returns a "
                "uow.Message, or None to publish nothing"
            )
            raise OutboxError(msg)
        return found

    def rows(self, messages: list[tuple[Message, bytes]]) -> list[dict[str, Any]]:
        """The outbox rows of *messages*, with their payloads' bytes, in order."""
        now = datetime.datetime.now(datetime.timezone.utc)
        return [
            {
                "message_id": message.id,
                "topic": message.topic,
                "key": message.key,
                "payload": body,
                "headers": dict(message.headers),
                "created_at": now,
                "attempts": 0,
            }
            for message, body in messages
        ]

    def notify_statements(self) -> list[str]:
        """PostgreSQL: the statements that make each commit to the outbox NOTIFY the relays (a trigger).

        ``metadata.create_all()`` runs them with the table. Alembic's
        autogenerate sees the table but not the trigger: add
        ``for statement in outbox.notify_statements(): op.execute(statement)``
        to the migration that creates the table.
        """
        return notify_ddl(self.table)

    def __repr__(self) -> str:
        return f"<Outbox {self.table.name}>"


class Inbox:
    """The inbox of a unit of work class: the ids of the messages its consumers have handled, one row each.

    Declare it beside the outbox (``inbox = uow.Inbox(metadata)``); its
    table (``uow_inbox`` unless *table* names another) goes on *metadata*.
    ``uow.receive(message_id)`` records a message in the same transaction
    as the work it causes, so that a message delivered again is recognised
    and its work is done once.
    """

    def __init__(self, metadata: MetaData, *, table: str = "uow_inbox") -> None:
        if not isinstance(metadata, MetaData):
            msg = f"Inbox() takes the MetaData of the application's tables, not {_shown(metadata)}"
            raise OutboxError(msg)
        existing = metadata.tables.get(table)
        if existing is not None:
            if {column.name for column in existing.columns} != {"consumer", "message_id", "received_at"}:
                msg = f"the metadata has a table {table!r} that is not an inbox; name the inbox Inbox(..., table=...)"
                raise OutboxError(msg)
            self.table = existing
            return
        self.table = Table(
            table,
            metadata,
            Column("consumer", String(_NAME_LENGTH), primary_key=True),
            Column("message_id", String(_NAME_LENGTH), primary_key=True),
            Column("received_at", DateTime(timezone=True), nullable=False),
        )

    def receipt(self, consumer: str, message_id: str, dialect: str) -> Any:
        """The INSERT of a receipt that does nothing if the message was received already (by this consumer)."""
        values = {
            "consumer": consumer,
            "message_id": message_id,
            "received_at": datetime.datetime.now(datetime.timezone.utc),
        }
        if dialect in ("mysql", "mariadb"):
            return mysql_insert(self.table).values(values).prefix_with("IGNORE")
        insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        statement = insert(self.table).values(values).on_conflict_do_nothing(index_elements=["consumer", "message_id"])
        return statement.returning(self.table.c.message_id)  # a row if inserted: psycopg's rowcount may be -1

    @staticmethod
    def inserted(result: Any) -> bool:
        """Whether the result of a :meth:`receipt` inserted the receipt."""
        if result.returns_rows:
            return result.first() is not None
        return bool(result.rowcount == 1)

    @staticmethod
    def check(message_id: object, consumer: object) -> None:
        """Refuse an id or consumer name that the table cannot hold."""
        for name, value in (("message_id", message_id), ("consumer", consumer)):
            if not isinstance(value, str) or not value or len(value) > _NAME_LENGTH:
                msg = f"receive() takes a {name} of 1 to {_NAME_LENGTH} characters, not {_shown(value)}"
                raise OutboxError(msg)

    def __repr__(self) -> str:
        return f"<Inbox {self.table.name}>"
