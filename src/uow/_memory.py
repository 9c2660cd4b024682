"""The in-memory database behind the fakes, and the in-memory repositories.

The fake behaves like a database with a session in front of it:

* :class:`InMemoryDatabase` holds committed objects. Nobody outside holds a
  reference to them: every block works on a deep copy, taken lazily, with one
  shared memo so that object graphs keep their identities.
* :class:`InMemorySession` is one block's view. Like a SQLAlchemy session it
  keeps new objects pending until a flush (any query, or the commit), assigns
  generated integer keys at that flush, follows ``save-update`` cascades, and
  raises ``sqlalchemy.exc.IntegrityError`` for a duplicate or missing primary
  key. After such an error it refuses work until rolled back, as SQLAlchemy
  does. Rolling back throws the working copy away, so uncommitted changes,
  including changes to the attributes of loaded objects, disappear.
"""

from __future__ import annotations

import builtins
import copy
import datetime
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import attrs
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import set_committed_value

from ._model import model_info
from ._repository import AsyncRepository, Repository, _RepositoryBase
from .errors import NotInRepositoryError

__all__ = ["AsyncInMemoryRepository", "InMemoryRepository"]

T = TypeVar("T")

Tables = dict[type[Any], dict[Any, Any]]


class _DuplicateKey(Exception):
    """The ``orig`` of the IntegrityError the fake raises, as a DBAPI error would be."""


def _integrity_error(model: type[Any], message: str) -> sa_exc.IntegrityError:
    return sa_exc.IntegrityError(f"INSERT INTO {model.__name__} (in-memory fake)", None, _DuplicateKey(message))


def _table_key(cls: type[Any]) -> type[Any]:
    """Objects of a mapped inheritance hierarchy share their base class's table."""
    mapper: Mapper[Any] = inspect(cls)
    return mapper.base_mapper.class_


#: Values that a copy of an object shares with the original: they never change in place.
_ATOMIC = frozenset({int, float, bool, str, bytes, type(None), complex, frozenset, Decimal, uuid.UUID})
_ATOMIC |= {datetime.datetime, datetime.date, datetime.time, datetime.timedelta}


def _copy_tables(tables: Tables) -> Tables:
    """A deep copy of *tables*, with one memo, so that object graphs keep their identities.

    Mapped objects are copied attribute by attribute into a new instance that
    SQLAlchemy set up (``ClassManager.new_instance()``), which is several
    times faster than ``copy.deepcopy`` of their instance state; anything
    else goes through ``copy.deepcopy`` with the same memo.
    """
    memo: dict[int, Any] = {}
    return {table: {key: _copy_object(obj, memo) for key, obj in rows.items()} for table, rows in tables.items()}


def _copy_columns(obj: Any) -> Any:
    """A new instance of *obj*'s class with a copy of its column attributes only, as a row loaded back."""
    manager = inspect(obj).manager
    copied = manager.new_instance()
    values, given = copied.__dict__, obj.__dict__
    for prop in manager.mapper.column_attrs:
        if prop.key in given:
            value = given[prop.key]
            values[prop.key] = value if type(value) in _ATOMIC else copy.deepcopy(value)
    return copied


def _copy_object(obj: Any, memo: dict[int, Any]) -> Any:
    copied = memo.get(id(obj))
    if copied is not None:
        return copied
    state = obj.__dict__.get("_sa_instance_state") if hasattr(obj, "__dict__") else None
    if state is None:
        return copy.deepcopy(obj, memo)
    manager = state.manager
    copied = manager.new_instance()
    memo[id(obj)] = copied
    relationships = manager.mapper.relationships
    values = copied.__dict__
    for key, value in obj.__dict__.items():
        if key == "_sa_instance_state":
            continue
        if type(value) in _ATOMIC:
            values[key] = value
        elif key in relationships:
            if relationships[key].uselist:
                members = [_copy_object(member, memo) for member in value]
                set_committed_value(copied, key, type(value)(members) if isinstance(value, set) else members)
            else:
                values[key] = _copy_object(value, memo)
        else:
            values[key] = copy.deepcopy(value, memo)
    return copied


class InMemoryDatabase:
    """Committed state of a fake unit of work: tables of objects by primary key."""

    def __init__(self) -> None:
        self.tables: Tables = {}
        self.sequences: dict[type[Any], int] = {}
        #: Incremented by every commit, so a session can tell whether another one committed since it looked.
        self.version = 0

    def snapshot(self) -> tuple[Tables, dict[type[Any], int]]:
        return _copy_tables(self.tables), dict(self.sequences)

    def store(self, tables: Tables, sequences: dict[type[Any], int]) -> None:
        self.tables = _copy_tables(tables)
        self.sequences = {
            table: max(sequences.get(table, 0), self.sequences.get(table, 0)) for table in {*sequences, *self.sequences}
        }
        self.version += 1
        # Domain events are not stored in a database: objects loaded later start without them.
        for table in self.tables.values():
            for obj in table.values():
                events = getattr(obj, "events", None)
                if isinstance(events, list):
                    events.clear()


class InMemorySession:
    """One block's working copy of an :class:`InMemoryDatabase`."""

    def __init__(self, database: InMemoryDatabase) -> None:
        self._database = database
        self._tables: Tables | None = None
        self._sequences: dict[type[Any], int] = {}
        self._pending: dict[int, Any] = {}
        self._deleted: dict[int, Any] = {}
        self._failed: BaseException | None = None
        # Like a session's identity map: the keys of the objects this block
        # has loaded or flushed. A rollback forgets the keys inserted since
        # the last commit and keeps the others, as SQLAlchemy keeps (expired)
        # persistent objects in the identity map.
        self._identity: set[tuple[type[Any], Any]] = set()
        self._inserted: set[tuple[type[Any], Any]] = set()
        # Rows this session deleted since it took its working copy.
        self._removed: set[tuple[type[Any], Any]] = set()
        self._base_version = 0
        # The committed tables as this session last saw them; the database never changes them in place.
        self._baseline: Tables = {}
        #: Called before a flush that writes, with what is pending; raises if writes are forbidden.
        self.check_write: Callable[[str], None] | None = None
        # While a read-only scope runs inside a read-write one: the state of every object when it began.
        self._watched: dict[int, tuple[Any, dict[str, Any]]] | None = None

    # -- transaction ---------------------------------------------------------

    @property
    def _working(self) -> Tables:
        if self._failed is not None:
            msg = (
                "This in-memory session's transaction has been rolled back due to a previous "
                f"exception during flush. Roll back before going on. Original exception: {self._failed!r}"
            )
            raise sa_exc.PendingRollbackError(msg)
        return self._view

    @property
    def _view(self) -> Tables:
        """The working copy, even after a failed flush: add() and remove() still work then."""
        if self._tables is None:
            self._baseline = self._database.tables
            self._tables, self._sequences = self._database.snapshot()
            self._base_version = self._database.version
            self._removed.clear()
        return self._tables

    def commit(self) -> None:
        self.flush()
        tables = self._working
        database = self._database
        if database.version == self._base_version:
            database.store(tables, self._sequences)
        else:
            self._merge(tables)
        self._base_version = database.version
        self._baseline = database.tables
        self._removed.clear()
        self._inserted.clear()

    def _merge(self, tables: Tables) -> None:
        """Commit over a database that another session changed since this one looked.

        As a database would, keep the other session's rows, except those this
        session loaded, wrote or deleted; then let the working copy see them.
        """
        touched = self._identity | self._inserted
        merged: Tables = {}
        for table in {*tables, *self._database.tables}:
            mine = tables.get(table, {})
            theirs = self._database.tables.get(table, {})
            rows = {key: obj for key, obj in mine.items() if (table, key) in touched}
            rows.update(
                (key, obj)
                for key, obj in theirs.items()
                if (table, key) not in touched and (table, key) not in self._removed
            )
            merged[table] = rows
        self._database.store(merged, self._sequences)
        fresh, _ = self._database.snapshot()
        for table, rows in fresh.items():
            mine = tables.setdefault(table, {})
            for key in [key for key in mine if (table, key) not in touched and key not in rows]:
                del mine[key]
            mine.update((key, obj) for key, obj in rows.items() if (table, key) not in touched)

    def rollback(self) -> None:
        self._tables = None
        self._pending.clear()
        self._deleted.clear()
        self._failed = None
        self._identity -= self._inserted
        self._inserted.clear()

    def watch_changes(self, *, starts: bool) -> None:
        """Start or stop noticing attributes changed on loaded objects, for a read-only scope."""
        if not starts:
            self._watched = None
            return
        tables = self._working
        self._watched = {id(obj): (obj, _object_state(obj)) for table in tables.values() for obj in table.values()}

    def _changed_since_watch(self) -> int:
        if self._watched is None:
            return 0
        return sum(1 for obj, state in self._watched.values() if _object_state(obj) != state)

    def has_changes(self) -> bool:
        """Whether this session holds work not yet committed, changed attributes of loaded objects included.

        It compares the working copy with the committed state as this session
        last saw it, so a commit by another session meanwhile is not taken
        for a change of this one.
        """
        if self._pending or self._deleted:
            return True
        if self._tables is None:
            return False
        tables = self._tables
        if self._cascade(tables):
            return True
        for table, rows in tables.items():
            seen = self._baseline.get(table, {})
            if rows.keys() != seen.keys():
                return True
            fields = model_info(table).fields
            for key, obj in rows.items():
                other = seen[key]
                if any(getattr(obj, name, None) != getattr(other, name, None) for name in fields):
                    return True
        return False

    def begin_nested(self) -> _Savepoint:
        """Flush, then remember this session's state, as SAVEPOINT does."""
        self.flush()
        tables = self._working
        states = {id(obj): (obj, _object_state(obj)) for table in tables.values() for obj in table.values()}
        return _Savepoint(
            session=self,
            tables={table: dict(rows) for table, rows in tables.items()},
            sequences=dict(self._sequences),
            states=states,
            identity=set(self._identity),
            inserted=set(self._inserted),
            removed=set(self._removed),
        )

    def end_nested(self, savepoint: _Savepoint, *, release: bool) -> None:
        """Release *savepoint* (flushing first), or roll back to it; a failed release rolls back and raises."""
        if release:
            try:
                self.flush()
            except Exception:
                self._restore(savepoint)
                raise
            return
        self._restore(savepoint)

    def _restore(self, savepoint: _Savepoint) -> None:
        # Objects the savepoint knew get their attributes back in place, as a
        # reload of expired objects would; objects added since are dropped.
        self._tables = {table: dict(rows) for table, rows in savepoint.tables.items()}
        self._sequences = dict(savepoint.sequences)
        for obj, state in savepoint.states.values():
            _restore_object(obj, state)
        self._identity = set(savepoint.identity)
        self._inserted = set(savepoint.inserted)
        self._removed = set(savepoint.removed)
        self._pending.clear()
        self._deleted.clear()
        self._failed = None

    # -- unit of work --------------------------------------------------------

    def _holds(self, obj: object) -> bool:
        table = self._view.get(_table_key(type(obj)), {})
        key = model_info(_table_key(type(obj))).key_of(obj)
        try:
            return table.get(key) is obj
        except TypeError:  # an unhashable key cannot be stored
            return False

    def add(self, obj: object) -> None:
        self._deleted.pop(id(obj), None)
        if not self._holds(obj):
            self._pending[id(obj)] = obj

    def insert_now(self, objs: builtins.list[Any]) -> None:
        """A bulk INSERT: flush, then write copies of *objs*, which stay unattached, as the database would."""
        self.flush()  # leaves nothing pending but the copies below
        for obj in objs:
            row = _copy_columns(obj)  # a bulk INSERT writes the object's columns, nothing it refers to
            self._pending[id(row)] = row
        self.flush()

    def delete(self, obj: object) -> None:
        if self._pending.pop(id(obj), None) is not None:
            return
        if not self._holds(obj):
            msg = (
                f"remove() was given a {type(obj).__name__} that this unit of work neither returned "
                "nor was given in this block; load it through the repository first"
            )
            raise NotInRepositoryError(msg)
        self._deleted[id(obj)] = obj

    def flush(self) -> None:
        tables = self._working
        inserts = self._cascade(tables)
        changed = self._changed_since_watch()
        if changed and self.check_write is not None:
            self.check_write(f"{len(inserts)} new, {changed} changed and {len(self._deleted)} deleted objects")
        if not inserts and not self._deleted:
            return
        if self.check_write is not None:
            self.check_write(f"{len(inserts)} new and {len(self._deleted)} deleted objects")
        try:
            planned = self._plan(tables, inserts)
        except sa_exc.IntegrityError as error:
            self._failed = error
            raise
        for obj in self._deleted.values():
            cls = _table_key(type(obj))
            key = model_info(cls).key_of(obj)
            tables[cls].pop(key, None)
            self._identity.discard((cls, key))
            self._removed.add((cls, key))
        for table, key, obj in planned:
            tables.setdefault(table, {})[key] = obj
            self._identity.add((table, key))
            self._inserted.add((table, key))
        self._pending.clear()
        self._deleted.clear()

    def _cascade(self, tables: Tables) -> list[Any]:
        """Pending objects, plus new objects reachable from any object in the session."""
        known = {id(obj) for table in tables.values() for obj in table.values()}
        found: dict[int, Any] = {}
        roots = [*self._pending.values(), *(obj for t in tables.values() for obj in t.values())]
        for root in roots:
            if id(root) in self._deleted:
                continue
            if id(root) not in known:
                found.setdefault(id(root), root)
            state = inspect(root)
            if not state.mapper.relationships:  # nothing to cascade to
                continue
            for related, *_ in state.mapper.cascade_iterator("save-update", state):
                if id(related) not in known and id(related) not in self._deleted:
                    found.setdefault(id(related), related)
        return list(found.values())

    def _plan(self, tables: Tables, inserts: list[Any]) -> list[tuple[type[Any], Any, Any]]:
        planned: list[tuple[type[Any], Any, Any]] = []
        claimed: set[tuple[type[Any], Any]] = set()
        freed = {
            (_table_key(type(obj)), model_info(_table_key(type(obj))).key_of(obj)) for obj in self._deleted.values()
        }
        for obj in inserts:
            table = _table_key(type(obj))
            info = model_info(table)
            if info.generated_key is not None and getattr(obj, info.generated_key) is None:
                existing = [k for k in tables.get(table, {}) if isinstance(k, int)]
                last = max([self._sequences.get(table, 0), *existing])
                self._sequences[table] = last + 1
                setattr(obj, info.generated_key, last + 1)
            _apply_defaults(info.mapper, obj)
            key = info.key_of(obj)
            parts = key if isinstance(key, tuple) else (key,)
            if any(part is None for part in parts):
                msg = f"NOT NULL constraint failed: primary key of {table.__name__} is None"
                raise _integrity_error(table, msg)
            taken = key in tables.get(table, {}) and (table, key) not in freed
            if (table, key) in claimed or taken:
                msg = f"UNIQUE constraint failed: {table.__name__} with primary key {key!r} exists"
                raise _integrity_error(table, msg)
            claimed.add((table, key))
            planned.append((table, key, obj))
        return planned

    # -- queries -------------------------------------------------------------

    def get(self, model: type[Any], key: Any) -> Any:
        # As Session.get(): an object already in the identity map is returned
        # without a flush; anything else is looked up after one.
        table = _table_key(model)
        obj = self._working.get(table, {}).get(key)
        if obj is None or (table, key) not in self._identity:
            self.flush()
            obj = self._working.get(table, {}).get(key)
        if not isinstance(obj, model) or id(obj) in self._deleted:  # a removed object is gone for get() too
            return None
        self._identity.add((table, key))
        return obj

    def query(self, model: type[Any], filters: dict[str, Any], limit: int | None) -> list[Any]:
        self.flush()
        table = self._working.get(_table_key(model), {})
        found: list[Any] = [
            obj
            for key, obj in sorted(table.items(), key=lambda item: _sort_key(item[0]))
            if isinstance(obj, model) and all(getattr(obj, name) == value for name, value in filters.items())
        ]
        found = found if limit is None else found[:limit]
        info = model_info(table_key := _table_key(model))
        self._identity.update((table_key, info.key_of(obj)) for obj in found)
        return found


@attrs.frozen
class _Savepoint:
    session: InMemorySession
    tables: Tables
    sequences: dict[type[Any], int]
    #: Every object of the working copy, with its attribute values, by id.
    states: dict[int, tuple[Any, dict[str, Any]]]
    identity: set[tuple[type[Any], Any]]
    inserted: set[tuple[type[Any], Any]]
    removed: set[tuple[type[Any], Any]]


_MISSING = object()


class _Members:
    """The saved members of a collection attribute."""

    __slots__ = ("members",)

    def __init__(self, collection: Any) -> None:
        self.members: Any = dict(collection) if isinstance(collection, dict) else builtins.list(collection)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Members) and self.members == other.members

    __hash__ = None  # type: ignore[assignment]


def _object_state(obj: object) -> dict[str, Any]:
    """The mapped attribute values of *obj*, with the members of its collections."""
    mapper: Mapper[Any] = inspect(type(obj))
    state: dict[str, Any] = {}
    for prop in mapper.attrs:
        value = obj.__dict__.get(prop.key, _MISSING)
        if value is not _MISSING and value is not None and getattr(prop, "uselist", False):
            value = _Members(value)
        state[prop.key] = value
    return state


def _restore_object(obj: object, state: dict[str, Any]) -> None:
    """Put back the values :func:`_object_state` saved, changing collections in place."""
    for key, value in state.items():
        if value is _MISSING:
            obj.__dict__.pop(key, None)
        elif isinstance(value, _Members):
            collection = getattr(obj, key)
            collection.clear()
            if isinstance(collection, dict):
                collection.update(value.members)
            elif isinstance(collection, builtins.list):
                collection.extend(value.members)
            else:
                collection.update(value.members)
        elif obj.__dict__.get(key, _MISSING) is not value:
            setattr(obj, key, value)


def _apply_defaults(mapper: Mapper[Any], obj: object) -> None:
    """Fill unset attributes from Python-side column defaults, as an INSERT does.

    Server-side defaults are the database's business: the fake leaves those
    attributes as they are.
    """
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        default = getattr(column, "default", None)
        if default is None or getattr(obj, prop.key, None) is not None:
            continue
        if default.is_scalar:
            setattr(obj, prop.key, default.arg)
        elif default.is_callable:
            setattr(obj, prop.key, default.arg(None))


def _sort_key(key: Any) -> tuple[Any, ...]:
    return key if isinstance(key, tuple) else (key,)


class _InMemoryBase(_RepositoryBase[T]):
    """What the sync and async in-memory repositories share: their session."""

    def __init__(self, session: InMemorySession, model: type[T]) -> None:
        super().__init__(model)
        self._session = session

    @property
    def _store(self) -> InMemorySession:
        self._check_open()
        return self._session


class InMemoryRepository(_InMemoryBase[T], Repository[T]):
    """A :class:`~uow.Repository` over a fake unit of work's in-memory database.

    Custom query methods are written with the public contract
    (``self.list()``, ``self.get_by()``), which records what they return as seen.
    """

    def _add(self, obj: T) -> None:
        self._store.add(obj)

    def _add_all(self, objs: builtins.list[T]) -> None:
        store = self._store
        for obj in objs:
            store.add(obj)

    def _add_bulk(self, objs: builtins.list[T]) -> None:
        self._store.insert_now(objs)

    def _get(self, key: Any) -> T | None:
        found: T | None = self._store.get(self.model, key)
        return found

    def _list(self, filters: dict[str, Any], limit: int | None) -> Sequence[T]:
        return self._store.query(self.model, filters, limit)

    def _count(self, filters: dict[str, Any]) -> int:
        return len(self._store.query(self.model, filters, None))

    def _remove(self, obj: T) -> None:
        self._store.delete(obj)


class AsyncInMemoryRepository(_InMemoryBase[T], AsyncRepository[T]):
    """The async twin of :class:`InMemoryRepository`."""

    async def _add(self, obj: T) -> None:
        self._store.add(obj)

    async def _add_all(self, objs: builtins.list[T]) -> None:
        store = self._store
        for obj in objs:
            store.add(obj)

    async def _add_bulk(self, objs: builtins.list[T]) -> None:
        self._store.insert_now(objs)

    async def _get(self, key: Any) -> T | None:
        found: T | None = self._store.get(self.model, key)
        return found

    async def _list(self, filters: dict[str, Any], limit: int | None) -> Sequence[T]:
        return self._store.query(self.model, filters, limit)

    async def _count(self, filters: dict[str, Any]) -> int:
        return len(self._store.query(self.model, filters, None))

    async def _remove(self, obj: T) -> None:
        self._store.delete(obj)
