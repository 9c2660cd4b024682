"""The repository contract, sync and async.

The public methods live here, once for each twin, and do the checks that must
be identical everywhere: argument validation, ``seen`` tracking, the
``get_by()`` uniqueness rule. Implementations only fill the protected hooks
(``_add``, ``_get``, ...), so the fake and the real repository cannot drift in
their public behaviour.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import ColumnElement

from ._model import ModelInfo, model_info
from ._query import Page, Query, build_query, cursor_after, lock_mode, value_of
from ._upsert import Upsert, build_changes, build_upsert, single_table
from .errors import InactiveUnitOfWorkError, MultipleResultsError, QueryError, ReadOnlyError

__all__ = ["AsyncRepository", "Repository"]

T = TypeVar("T")

#: A where clause: a SQLAlchemy boolean expression on the model's attributes or its table's columns.
#: ``bool`` is accepted by the type only so that comparisons of imperatively mapped attributes, which
#: type checkers see as plain values, type-check; a plain Python bool is refused when the query runs.
Where: TypeAlias = "ColumnElement[bool] | bool"
#: One ordering term: a mapped attribute or a column, or its ``.desc()``, ``.nulls_first()``, ....
OrderTerm: TypeAlias = "ColumnElement[Any] | QueryableAttribute[Any]"
OrderBy: TypeAlias = "OrderTerm | Sequence[OrderTerm] | None"


class _RepositoryBase(Generic[T]):
    """What sync and async repositories share: no I/O here."""

    model: type[T]

    def __init__(self, model: type[T]) -> None:
        self.model = model
        self._info: ModelInfo = model_info(model)
        self._seen: dict[int, T] = {}
        self._open = True
        #: The unit of work that built this repository, told of every use.
        self._unit: Any = None

    @property
    def seen(self) -> tuple[T, ...]:
        """The objects this repository returned or was given, in first-seen order.

        The unit of work collects domain events from them after a commit.
        """
        return tuple(self._seen.values())

    def _track(self, obj: T) -> T:
        """Record *obj* as seen and return it; call it from custom query methods."""
        self._seen[id(obj)] = obj
        if self._unit is not None:
            self._unit._touch()
        return obj

    def _remember(self, obj: T) -> T:
        """Record *obj* as seen, in a public method that has called :meth:`_use` already."""
        self._seen[id(obj)] = obj
        return obj

    def _use(self) -> None:
        """Every public method starts here: refuse a closed repository, note the use."""
        if not self._open:
            self._check_open()
        unit = self._unit
        if unit is not None:
            unit._touch()

    def _track_all(self, objs: Iterable[T]) -> builtins.list[T]:
        """Record every object in *objs* as seen and return them as a list."""
        result = builtins.list(objs)
        for obj in result:
            self._seen[id(obj)] = obj
        return result

    def _check_open(self) -> None:
        if not self._open:
            msg = (
                f"this {type(self).__name__} belongs to a unit of work block that has ended; "
                "use the repository through the unit of work inside `with uow:`"
            )
            raise InactiveUnitOfWorkError(msg)

    def _close(self) -> None:
        self._open = False

    def _checked_many(self, objs: Iterable[T]) -> builtins.list[T]:
        result = builtins.list(objs)
        for obj in result:
            self._info.check_instance(obj, "add_all")
        return result

    def _query(
        self,
        where: Sequence[Where],
        filters: dict[str, Any],
        order_by: OrderBy = None,
        limit: int | None = None,
        offset: int = 0,
        after: str | None = None,
        lock: str | None = None,
    ) -> Query:
        return build_query(self._info, where, filters, order_by, limit, offset, after, lock)

    def _lock(self, for_update: bool, skip_locked: bool, nowait: bool) -> str | None:
        """The row lock asked for; a read-only unit of work refuses one, since a lock announces a write."""
        if not (for_update or skip_locked or nowait):
            return None  # the common case: no lock, nothing to check
        lock = lock_mode(for_update, skip_locked, nowait)
        if lock is not None and self._unit is not None and self._unit._writes_forbidden():
            msg = (
                "for_update=True in a read-only unit of work: a row lock is taken to write the row. Drop "
                "read_only=True, or read without the lock"
            )
            raise ReadOnlyError(msg)
        return lock

    def _page_query(
        self,
        where: Sequence[Where],
        filters: dict[str, Any],
        order_by: OrderBy,
        limit: int,
        offset: int,
        after: str | None,
        lock: str | None,
    ) -> Query:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            msg = f"page() needs limit= of at least 1, the most objects a page holds; got {limit!r}"
            raise QueryError(msg)
        return self._query(where, filters, order_by, limit, offset, after, lock)

    @staticmethod
    def _peeking(query: Query) -> Query:
        """The page's query, one row longer: that row says whether another page follows."""
        assert query.limit is not None
        return query.limited(query.limit + 1)

    def _paged(self, query: Query, found: Sequence[T], total: int, more: bool | None = None) -> Page[T]:
        """The page of *found*, its rows from the page's start on: one more than the page holds if any
        follows, unless *more* says whether one does."""
        assert query.limit is not None
        items = self._track_all(found[: query.limit])
        if more is None:
            more = len(found) > query.limit
        cursor = cursor_after(self._info, query, items[-1], query.offset + len(items) - 1) if more and items else None
        return Page(items, total, cursor)

    def _build_upsert(self, what: str, obj_or_values: Any, on: Sequence[str] | None) -> Upsert:
        upsert = build_upsert(self._info, what, obj_or_values, on)
        if self._unit is not None:
            self._unit._check_write(f"{what}() of a {self.model.__name__}")
        return upsert

    def _bulk(self, what: str, where: Sequence[Where], filters: dict[str, Any]) -> Query:
        """The query of a bulk update or delete: it must select something explicitly."""
        if not where and not filters:
            msg = (
                f"{what}() needs a where clause or a filter; to {what} every {self.model.__name__}, say so with "
                f"{what}(sqlalchemy.true())"
            )
            raise QueryError(msg)
        query = self._query(where, filters)
        single_table(self._info, what)
        if self._unit is not None:
            self._unit._check_write(f"a bulk {what}() of {self.model.__name__} objects")
        return query

    def _changes(self, values: Any) -> tuple[dict[str, Any], str | None]:
        _, changes, version = build_changes(self._info, values)
        return {key: value_of(self._info, value) for key, value in changes.items()}, version

    def _one_or_none(self, found: Sequence[T], filters: dict[str, Any]) -> T | None:
        if len(found) > 1:
            shown = ", ".join(f"{name}={value!r}" for name, value in filters.items())
            msg = (
                f"get_by({shown}) matched more than one {self.model.__name__}; filter on a unique column, or use list()"
            )
            raise MultipleResultsError(msg)
        return self._remember(found[0]) if found else None

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<{type(self).__name__} of {self.model.__name__}, {state}>"


class Repository(_RepositoryBase[T], abc.ABC):
    """The collection-like interface to the stored objects of one mapped class.

    Every implementation (:class:`~uow.SqlAlchemyRepository`,
    :class:`~uow.InMemoryRepository`) behaves the same through these methods;
    the contract test suite proves it. Subclass this to declare extra query
    methods, then subclass each implementation together with your interface.
    """

    def add(self, obj: T) -> None:
        """Add a new object; it is written at the next flush or commit."""
        self._use()
        self._info.check_instance(obj, "add")
        self._add(obj)
        self._remember(obj)

    def add_all(self, objs: Iterable[T], *, bulk: bool = False) -> None:
        """Add several new objects at once.

        With ``bulk=True`` they are inserted now, with one executemany INSERT,
        for loading many rows fast: the objects stay unattached, so later
        changes to them are not saved, generated keys are not set on them,
        related objects are not added, and their domain events are not
        collected. The unit of work's commit still decides whether they stay.
        """
        self._use()
        checked = self._checked_many(objs)
        if bulk:
            self._add_bulk(checked)
            return
        self._add_all(checked)
        self._track_all(checked)

    def get(self, key: Any, *, for_update: bool = False, skip_locked: bool = False, nowait: bool = False) -> T | None:
        """The object with primary key *key*, or ``None``.

        A composite key is a tuple in column order, or a dict by attribute name.
        ``for_update=True`` locks the rows it reads until the transaction
        ends (``SELECT ... FOR UPDATE``), with ``skip_locked=True`` to leave
        out rows that another transaction holds, or ``nowait=True`` to fail
        at once on one.
        """
        self._use()
        lock = self._lock(for_update, skip_locked, nowait)
        obj = self._get(self._info.normalize_key(key), lock)
        return None if obj is None else self._remember(obj)

    def get_by(self, **filters: Any) -> T | None:
        """The one object whose attributes equal *filters*, or ``None``.

        Raises :class:`~uow.errors.MultipleResultsError` if several match.
        """
        self._use()
        return self._one_or_none(self._list(self._query((), filters, limit=2)), filters)

    def list(
        self,
        *where: Where,
        order_by: OrderBy = None,
        limit: int | None = None,
        offset: int = 0,
        for_update: bool = False,
        skip_locked: bool = False,
        nowait: bool = False,
        **filters: Any,
    ) -> builtins.list[T]:
        """The objects for which every *where* clause holds and whose attributes equal *filters*.

        They come in *order_by* order, then in primary-key order, which also
        breaks ties; *limit* and *offset* take a page of them.
        ``for_update=True`` locks the rows it reads until the transaction
        ends (``SELECT ... FOR UPDATE``), with ``skip_locked=True`` to leave
        out rows that another transaction holds, or ``nowait=True`` to fail
        at once on one.
        """
        self._use()
        lock = self._lock(for_update, skip_locked, nowait)
        return self._track_all(self._list(self._query(where, filters, order_by, limit, offset, lock=lock)))

    def count(self, *where: Where, **filters: Any) -> int:
        """How many objects :meth:`list` would return for the same clauses and filters, without a page."""
        self._use()
        return self._count(self._query(where, filters))

    def page(
        self,
        *where: Where,
        limit: int,
        order_by: OrderBy = None,
        offset: int = 0,
        after: str | None = None,
        for_update: bool = False,
        skip_locked: bool = False,
        nowait: bool = False,
        **filters: Any,
    ) -> Page[T]:
        """A page of what :meth:`list` returns, with how many objects match in all and a cursor to the next page.

        Start at *offset*, or *after* the ``next`` cursor of a previous page
        of the same query. Two statements in the same transaction read the
        objects (one more than *limit*, to know whether a page follows) and
        count them all.
        """
        self._use()
        lock = self._lock(for_update, skip_locked, nowait)
        query = self._page_query(where, filters, order_by, limit, offset, after, lock)
        if query.lock is not None:  # no row beyond the page is locked: counts say what follows
            found, total = self._list(query), self._count(query.whole())
            rest = total - query.offset if query.start is None else self._count(query.limited(None))
            return self._paged(query, found, total, more=rest > len(found))
        if query.start is None:  # an offset page: the total says whether another follows
            found, total = self._list_and_count(query)
            return self._paged(query, found, total, more=query.offset + len(found) < total)
        found, total = self._list_and_count(self._peeking(query))  # one row more says it
        return self._paged(query, found, total)

    def exists(self, *where: Where, **filters: Any) -> bool:
        """Whether :meth:`list` would return any object for the same clauses and filters."""
        self._use()
        return self._exists(self._query(where, filters))

    def upsert(self, obj_or_values: T | Mapping[str, Any], *, on: Sequence[str] | None = None) -> T:
        """Insert a row with these values, or set them on the row that holds the same *on* key, and return its object.

        *obj_or_values* is an instance of the model, whose column attributes
        give the values, or a dict of column attributes; the object returned
        is the one this unit of work holds for the row, loaded afresh, never
        the instance given. *on* names the attributes of the primary key (the
        default) or of a UNIQUE constraint or unique index. One statement
        does it (``INSERT ... ON CONFLICT DO UPDATE`` on PostgreSQL and
        SQLite, ``ON DUPLICATE KEY UPDATE`` on MySQL and MariaDB), so two
        transactions upserting the same key never both insert.
        """
        self._use()
        found, _ = self._upsert(self._build_upsert("upsert", obj_or_values, on), update=True)
        return self._remember(found)

    def get_or_create(self, obj_or_values: T | Mapping[str, Any], *, on: Sequence[str] | None = None) -> tuple[T, bool]:
        """The object of the row that holds the same *on* key, or of one inserted with these values if none does.

        Returns the object and whether it was inserted. Takes what
        :meth:`upsert` takes, and never changes a row that exists; two
        transactions asking for the same key never both insert, and neither
        fails on the unique key.
        """
        self._use()
        found, created = self._upsert(self._build_upsert("get_or_create", obj_or_values, on), update=False)
        return self._remember(found), created

    def update(self, *where: Where, values: Mapping[str, Any], **filters: Any) -> int:
        """Set *values* on every row that the clauses and filters select, in one UPDATE; return how many matched.

        *values* maps column attributes to values, or to SQL expressions on
        the model's columns (``{"qty": Batch.qty - 1}``). The statement runs
        after an autoflush, and objects of those rows that this unit of work
        holds get the new values, as SQLAlchemy's ``synchronize_session=
        "fetch"`` does; a version counter moves on every row. ORM events and
        relationships' cascades do not run.
        """
        self._use()
        query = self._bulk("update", where, filters)
        changes, version = self._changes(values)
        return self._update(query, changes, version)

    def delete(self, *where: Where, **filters: Any) -> int:
        """Delete every row that the clauses and filters select, in one DELETE; return how many were deleted.

        Objects of those rows that this unit of work holds are deleted with
        them, and ``get()`` no longer finds them. Foreign keys' ``ON DELETE``
        actions run in the database; relationships' cascades do not.
        """
        self._use()
        return self._delete(self._bulk("delete", where, filters))

    def remove(self, obj: T) -> None:
        """Delete an object that this unit of work returned or was given."""
        self._use()
        self._info.check_instance(obj, "remove")
        self._remove(obj)

    @abc.abstractmethod
    def _add(self, obj: T) -> None: ...

    @abc.abstractmethod
    def _add_all(self, objs: builtins.list[T]) -> None: ...

    @abc.abstractmethod
    def _add_bulk(self, objs: builtins.list[T]) -> None: ...

    @abc.abstractmethod
    def _get(self, key: Any, lock: str | None) -> T | None: ...

    @abc.abstractmethod
    def _list(self, query: Query) -> Sequence[T]: ...

    @abc.abstractmethod
    def _count(self, query: Query) -> int: ...

    def _list_and_count(self, query: Query) -> tuple[Sequence[T], int]:
        """What :meth:`_list` returns for *query*, and how many objects its whole listing holds, without a page."""
        return self._list(query), self._count(query.whole())

    @abc.abstractmethod
    def _exists(self, query: Query) -> bool: ...

    @abc.abstractmethod
    def _upsert(self, upsert: Upsert, *, update: bool) -> tuple[T, bool]:
        """Insert the row, or on a conflict set the changes (*update*) or keep the row; its object, and if inserted."""

    @abc.abstractmethod
    def _update(self, query: Query, changes: dict[str, Any], version: str | None) -> int:
        """UPDATE the rows *query* selects with *changes* (by column key), moving *version*; how many matched."""

    @abc.abstractmethod
    def _delete(self, query: Query) -> int:
        """DELETE the rows *query* selects; how many."""

    @abc.abstractmethod
    def _remove(self, obj: T) -> None: ...


class AsyncRepository(_RepositoryBase[T], abc.ABC):
    """The async twin of :class:`Repository`: the same contract, awaited."""

    async def add(self, obj: T) -> None:
        """Add a new object; it is written at the next flush or commit."""
        self._use()
        self._info.check_instance(obj, "add")
        await self._add(obj)
        self._remember(obj)

    async def add_all(self, objs: Iterable[T], *, bulk: bool = False) -> None:
        """Add several new objects at once; ``bulk=True`` inserts them now, as in :meth:`Repository.add_all`."""
        self._use()
        checked = self._checked_many(objs)
        if bulk:
            await self._add_bulk(checked)
            return
        await self._add_all(checked)
        self._track_all(checked)

    async def get(
        self, key: Any, *, for_update: bool = False, skip_locked: bool = False, nowait: bool = False
    ) -> T | None:
        """The object with primary key *key*, or ``None``, with the row locks of :meth:`Repository.get`."""
        self._use()
        lock = self._lock(for_update, skip_locked, nowait)
        obj = await self._get(self._info.normalize_key(key), lock)
        return None if obj is None else self._remember(obj)

    async def get_by(self, **filters: Any) -> T | None:
        """The one object whose attributes equal *filters*, or ``None``."""
        self._use()
        return self._one_or_none(await self._list(self._query((), filters, limit=2)), filters)

    async def list(
        self,
        *where: Where,
        order_by: OrderBy = None,
        limit: int | None = None,
        offset: int = 0,
        for_update: bool = False,
        skip_locked: bool = False,
        nowait: bool = False,
        **filters: Any,
    ) -> builtins.list[T]:
        """The objects :meth:`Repository.list` returns, awaited."""
        self._use()
        lock = self._lock(for_update, skip_locked, nowait)
        return self._track_all(await self._list(self._query(where, filters, order_by, limit, offset, lock=lock)))

    async def count(self, *where: Where, **filters: Any) -> int:
        """How many objects :meth:`list` would return for the same clauses and filters, without a page."""
        self._use()
        return await self._count(self._query(where, filters))

    async def page(
        self,
        *where: Where,
        limit: int,
        order_by: OrderBy = None,
        offset: int = 0,
        after: str | None = None,
        for_update: bool = False,
        skip_locked: bool = False,
        nowait: bool = False,
        **filters: Any,
    ) -> Page[T]:
        """A page, as :meth:`Repository.page` returns it, awaited."""
        self._use()
        lock = self._lock(for_update, skip_locked, nowait)
        query = self._page_query(where, filters, order_by, limit, offset, after, lock)
        if query.lock is not None:  # no row beyond the page is locked: counts say what follows
            found, total = await self._list(query), await self._count(query.whole())
            rest = total - query.offset if query.start is None else await self._count(query.limited(None))
            return self._paged(query, found, total, more=rest > len(found))
        if query.start is None:  # an offset page: the total says whether another follows
            found, total = await self._list_and_count(query)
            return self._paged(query, found, total, more=query.offset + len(found) < total)
        found, total = await self._list_and_count(self._peeking(query))  # one row more says it
        return self._paged(query, found, total)

    async def exists(self, *where: Where, **filters: Any) -> bool:
        """Whether :meth:`list` would return any object for the same clauses and filters."""
        self._use()
        return await self._exists(self._query(where, filters))

    async def upsert(self, obj_or_values: T | Mapping[str, Any], *, on: Sequence[str] | None = None) -> T:
        """Insert or change the row, as :meth:`Repository.upsert` does, awaited."""
        self._use()
        found, _ = await self._upsert(self._build_upsert("upsert", obj_or_values, on), update=True)
        return self._remember(found)

    async def get_or_create(
        self, obj_or_values: T | Mapping[str, Any], *, on: Sequence[str] | None = None
    ) -> tuple[T, bool]:
        """The object of the row, inserted if missing, as :meth:`Repository.get_or_create` returns it, awaited."""
        self._use()
        found, created = await self._upsert(self._build_upsert("get_or_create", obj_or_values, on), update=False)
        return self._remember(found), created

    async def update(self, *where: Where, values: Mapping[str, Any], **filters: Any) -> int:
        """Set *values* on the rows selected, as :meth:`Repository.update` does, awaited."""
        self._use()
        query = self._bulk("update", where, filters)
        changes, version = self._changes(values)
        return await self._update(query, changes, version)

    async def delete(self, *where: Where, **filters: Any) -> int:
        """Delete the rows selected, as :meth:`Repository.delete` does, awaited."""
        self._use()
        return await self._delete(self._bulk("delete", where, filters))

    async def remove(self, obj: T) -> None:
        """Delete an object that this unit of work returned or was given."""
        self._use()
        self._info.check_instance(obj, "remove")
        await self._remove(obj)

    @abc.abstractmethod
    async def _add(self, obj: T) -> None: ...

    @abc.abstractmethod
    async def _add_all(self, objs: builtins.list[T]) -> None: ...

    @abc.abstractmethod
    async def _add_bulk(self, objs: builtins.list[T]) -> None: ...

    @abc.abstractmethod
    async def _get(self, key: Any, lock: str | None) -> T | None: ...

    @abc.abstractmethod
    async def _list(self, query: Query) -> Sequence[T]: ...

    @abc.abstractmethod
    async def _count(self, query: Query) -> int: ...

    async def _list_and_count(self, query: Query) -> tuple[Sequence[T], int]:
        """What :meth:`_list` returns for *query*, and how many objects its whole listing holds, without a page."""
        return await self._list(query), await self._count(query.whole())

    @abc.abstractmethod
    async def _exists(self, query: Query) -> bool: ...

    @abc.abstractmethod
    async def _upsert(self, upsert: Upsert, *, update: bool) -> tuple[T, bool]:
        """Insert the row, or on a conflict set the changes (*update*) or keep the row; its object, and if inserted."""

    @abc.abstractmethod
    async def _update(self, query: Query, changes: dict[str, Any], version: str | None) -> int:
        """UPDATE the rows *query* selects with *changes* (by column key), moving *version*; how many matched."""

    @abc.abstractmethod
    async def _delete(self, query: Query) -> int:
        """DELETE the rows *query* selects; how many."""

    @abc.abstractmethod
    async def _remove(self, obj: T) -> None: ...
