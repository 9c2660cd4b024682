"""One async-shaped interface over every unit of work, for the contract suite.

The contract tests are written once, with ``async with uow:`` and ``await``.
Async units of work run as they are; sync ones are wrapped in
:class:`SyncAsAsync`, which calls them directly. The committed state is read
back without the unit of work under test: through a separate connection with
plain SQL on a database, from the committed tables on the fake.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from sqlalchemy import Engine, inspect, select, text

from uow import FakeUnitOfWork
from uow._memory import InMemoryDatabase
from uow._repository import _RepositoryBase

from .uows import OUTBOX


class _SyncRepositoryAsAsync:
    def __init__(self, repo: Any) -> None:
        self._repo = repo

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._repo, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call


class _SyncBlockAsAsync:
    """A sync scope (``uow.transaction()``, ``uow.savepoint()``) entered with ``async with``."""

    def __init__(self, block: Any, owner: SyncAsAsync) -> None:
        self._block = block
        self._owner = owner

    async def __aenter__(self) -> SyncAsAsync:
        self._block.__enter__()
        return self._owner

    async def __aexit__(self, *exc_info: Any) -> None:
        self._block.__exit__(*exc_info)


class SyncAsAsync:
    """Drives a sync unit of work through the async interface."""

    def __init__(self, uow: Any) -> None:
        self.wrapped = uow

    async def __aenter__(self) -> SyncAsAsync:
        self.wrapped.__enter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.wrapped.__exit__(*exc_info)

    async def commit(self) -> None:
        self.wrapped.commit()

    async def receive(self, message_id: str, **kwargs: Any) -> bool:
        return bool(self.wrapped.receive(message_id, **kwargs))

    async def rollback(self) -> None:
        self.wrapped.rollback()

    def transaction(self, **kwargs: Any) -> _SyncBlockAsAsync:
        return _SyncBlockAsAsync(self.wrapped.transaction(**kwargs), self)

    def savepoint(self) -> _SyncBlockAsAsync:
        return _SyncBlockAsAsync(self.wrapped.savepoint(), self)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.wrapped, name)
        if isinstance(attr, _RepositoryBase):
            return _SyncRepositoryAsAsync(attr)
        return attr


@attrs.define
class Shop:
    """How a contract test builds units of work and reads what they committed."""

    name: str
    new: Callable[..., Any]
    read: Callable[[type[Any], tuple[str, ...]], list[tuple[Any, ...]]]
    is_async: bool
    #: The committed outbox, oldest first: (topic, key, payload as JSON read back, headers) of each message.
    messages: Callable[[], list[tuple[str, str | None, Any, dict[str, str]]]] = attrs.field(kw_only=True)

    def uow(self, **kwargs: Any) -> Any:
        """A new unit of work with the async interface."""
        built = self.new(**kwargs)
        return built if self.is_async else SyncAsAsync(built)

    def committed(self, model: type[Any], *fields: str) -> list[tuple[Any, ...]]:
        """The committed rows of *model*, as tuples of *fields*, sorted."""
        return sorted(self.read(model, fields), key=repr)


def sql_reader(engine: Engine) -> Callable[[type[Any], tuple[str, ...]], list[tuple[Any, ...]]]:
    """Read committed rows through a separate connection with plain SQL."""

    def read(model: type[Any], fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        mapper = inspect(model)
        table = mapper.local_table
        columns = ", ".join(mapper.columns[field].name for field in fields)
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(f"SELECT {columns} FROM {table.name}"))]

    return read


def sql_messages(engine: Engine) -> Callable[[], list[tuple[str, str | None, Any, dict[str, str]]]]:
    """Read the committed outbox through a separate connection, in its order."""

    def read() -> list[tuple[str, str | None, Any, dict[str, str]]]:
        table = OUTBOX.table
        with engine.connect() as conn:
            rows = conn.execute(select(table).order_by(table.c.position)).mappings().all()
        return [(row["topic"], row["key"], json.loads(bytes(row["payload"])), row["headers"]) for row in rows]

    return read


def fake_messages(database: InMemoryDatabase) -> Callable[[], list[tuple[str, str | None, Any, dict[str, str]]]]:
    """The fake's committed outbox, each payload written as the real outbox writes it."""

    def read() -> list[tuple[str, str | None, Any, dict[str, str]]]:
        return [
            (message.topic, message.key, json.loads(OUTBOX.body(message)), dict(message.headers))
            for message in database.published
        ]

    return read


def fake_reader(database: InMemoryDatabase) -> Callable[[type[Any], tuple[str, ...]], list[tuple[Any, ...]]]:
    """Read the fake's committed tables directly."""

    def read(model: type[Any], fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return [tuple(row[field] for field in fields) for row in database.rows(model)]

    return read


def fake_shop(uow_class: type[Any], *, is_async: bool) -> Shop:
    """A shop whose units of work share one in-memory database, as they would share a real one."""
    database = InMemoryDatabase()

    def new(**kwargs: Any) -> Any:
        built = uow_class(**kwargs)
        built.database = database
        return built

    name = "fake-async" if is_async else "fake"
    assert issubclass(uow_class, FakeUnitOfWork) != is_async
    return Shop(name, new, fake_reader(database), is_async, messages=fake_messages(database))
