"""Repositories backed by a SQLAlchemy ``Session`` or ``AsyncSession``."""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from sqlalchemy import Delete, Select, Update, delete, func, inspect, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from ._model import ModelInfo, model_info
from ._query import Query
from ._repository import AsyncRepository, Repository
from ._upsert import Upsert
from .errors import NotInRepositoryError

if TYPE_CHECKING:  # importing sqlalchemy.ext.asyncio needs greenlet, which sync applications may not have
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["AsyncSqlAlchemyRepository", "SqlAlchemyRepository"]

T = TypeVar("T")


def _where(stmt: Select[Any], query: Query) -> Select[Any]:
    if query.conditions:
        stmt = stmt.where(*query.conditions)
    return stmt.filter_by(**query.filters) if query.filters else stmt


def _list_statement(info: ModelInfo, query: Query, dialect: str) -> Select[Any]:
    """The SELECT of *query*."""
    stmt = _where(select(info.model), query).order_by(*_ordering(query, dialect))
    if query.limit is not None:
        stmt = stmt.limit(query.limit)
    if query.offset:
        stmt = stmt.offset(query.offset)
    return stmt if query.lock is None else stmt.with_for_update(**_for_update(query.lock))


def _for_update(lock: str) -> dict[str, Any]:
    """``with_for_update()`` arguments of a row lock; SQLite has no row locks, and SQLAlchemy leaves the clause out."""
    return {"skip_locked": lock == "skip_locked", "nowait": lock == "nowait"}


def _ordering(query: Query, dialect: str) -> list[ColumnElement[Any]]:
    """ORDER BY terms; MySQL and MariaDB have no NULLS FIRST/LAST, so a NULL test goes before the column there."""
    terms: list[ColumnElement[Any]] = []
    for order in query.order:
        column: Any = order.column
        if order.nulls is not None and dialect in ("mysql", "mariadb"):
            # NULLs come first there ascending, last descending; a NULL test first puts them where asked.
            terms.append(column.is_(None).desc() if order.nulls == "first" else column.is_(None).asc())
            order = attrs.evolve(order, nulls=None)
        if not order.descending and order.nulls is None:
            terms.append(column)  # ascending is ORDER BY's default
            continue
        term = column.desc() if order.descending else column.asc()
        if order.nulls == "first":
            term = term.nulls_first()
        elif order.nulls == "last":
            term = term.nulls_last()
        terms.append(term)
    return terms


def _count_statement(info: ModelInfo, query: Query) -> Select[Any]:
    return _where(select(func.count()).select_from(info.model), query)


#: The databases that read a page and its total in one statement, at no cost beyond the two statements'.
#: PostgreSQL and MariaDB would compute the count column on every row that the sort reads, which costs them
#: more than the round trip saves once many rows match (docs/repositories.md has the figures).
_COUNTS_WITH_PAGE = frozenset({"sqlite"})


def _page_statement(info: ModelInfo, query: Query, dialect: str) -> Select[Any]:
    """The SELECT of *query* with a last column, the count of its whole listing: a page and its total in one
    statement, and so from one snapshot. The count is a scalar subquery of its own FROM (never correlated with
    the page's), which the database computes once."""
    total = _count_statement(info, query.whole()).correlate(None).scalar_subquery()
    return _list_statement(info, query, dialect).add_columns(total)


def _exists_statement(info: ModelInfo, query: Query) -> Select[Any]:
    return select(_where(select(info.model), query).exists())


def _upsert_statement(upsert: Upsert, dialect: str, *, update: bool) -> Any:
    """INSERT of the upsert's row that, on a conflict on its key, sets its changes (*update*) or does nothing.

    MySQL and MariaDB have no DO NOTHING on a given key: :func:`_kept` inserts there instead.
    """
    table = upsert.table
    row = upsert.insert_row
    if dialect in ("mysql", "mariadb"):
        mysql_stmt = mysql_insert(table).values(row)
        changes: dict[str, Any] = {column: mysql_stmt.inserted[column] for column in upsert.changes}
        if upsert.version is not None:
            changes[upsert.version] = table.c[upsert.version] + 1
        if not changes:  # nothing to set: set a key column to itself, so that the statement still locks the row
            changes = {upsert.on[0]: table.c[upsert.on[0]]}
        return mysql_stmt.on_duplicate_key_update(changes)
    stmt = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(table).values(row)
    if not update:  # RETURNING gives a row only if the INSERT wrote one: what get_or_create() reports
        return stmt.on_conflict_do_nothing(index_elements=list(upsert.on)).returning(table.c[upsert.on[0]])
    changes = {column: stmt.excluded[column] for column in upsert.changes}
    if upsert.version is not None:
        changes[upsert.version] = table.c[upsert.version] + 1
    if not changes:
        return stmt.on_conflict_do_nothing(index_elements=list(upsert.on))
    return stmt.on_conflict_do_update(index_elements=list(upsert.on), set_=changes)


def _reload_statement(info: ModelInfo, upsert: Upsert, dialect: str) -> Select[Any]:
    """The SELECT of the upserted row's object, refreshed; a locking read on MySQL, whose plain reads see a snapshot."""
    table = upsert.table
    stmt = (
        select(info.model)
        .where(*(table.c[column] == upsert.row[column] for column in upsert.on))
        .execution_options(populate_existing=True)
    )
    return stmt.with_for_update() if dialect in ("mysql", "mariadb") else stmt


def _is_duplicate(error: IntegrityError) -> bool:
    """Whether MySQL or MariaDB refused an INSERT for a duplicate key (error 1062)."""
    args: tuple[Any, ...] = tuple(getattr(error.orig, "args", ()))
    return bool(args) and args[0] == 1062


def _update_statement(info: ModelInfo, query: Query, changes: dict[str, Any], version: str | None) -> Update:
    table = info.mapper.local_table
    values: dict[Any, Any] = {table.c[key]: value for key, value in changes.items()}
    if version is not None:
        values[table.c[version]] = table.c[version] + 1
    stmt = update(info.model)
    if query.conditions:
        stmt = stmt.where(*query.conditions)
    if query.filters:
        stmt = stmt.filter_by(**query.filters)
    return stmt.values(values).execution_options(synchronize_session="fetch")


def _delete_statement(info: ModelInfo, query: Query) -> Delete:
    stmt = delete(info.model)
    if query.conditions:
        stmt = stmt.where(*query.conditions)
    if query.filters:
        stmt = stmt.filter_by(**query.filters)
    return stmt.execution_options(synchronize_session="fetch")


def _dialect(session: Session, info: ModelInfo) -> str:
    return session.get_bind(info.mapper).dialect.name


def _check_removable(session: Session, obj: object, model: type[Any]) -> bool:
    """Whether *obj* is pending (True) or persistent (False) in *session*."""
    state = inspect(obj)
    if state.session is not session or not (state.pending or state.persistent):
        msg = (
            f"remove() was given a {model.__name__} that this unit of work neither returned "
            "nor was given in this block; load it through the repository first"
        )
        raise NotInRepositoryError(msg)
    return bool(state.pending)


def _bulk_statements(info: ModelInfo, objs: builtins.list[Any]) -> Iterator[tuple[Any, builtins.list[dict[str, Any]]]]:
    """The INSERT statements and parameters for *objs*, in order; objects of a mapped subclass use its own."""
    for cls, run in itertools.groupby(objs, type):
        own = info if cls is info.model else model_info(cls)
        for rows in own.bulk_batches(builtins.list(run)):
            yield own.bulk_statement, rows


def _pending_delete(session: Session, obj: object) -> bool:
    """Whether *obj* is marked for deletion in *session* and not yet flushed.

    ``Session.get()`` returns such an object from the identity map until the
    next flush; a repository's ``get()`` must not. The session's pending
    deletions are looked at first (a private dict, kept by SQLAlchemy since
    0.4) so that the common case, none, costs nothing.
    """
    pending = getattr(session, "_deleted", True)
    return bool(pending) and obj in session.deleted


class SqlAlchemyRepository(Repository[T]):
    """A :class:`~uow.Repository` that reads and writes through a SQLAlchemy ``Session``.

    Custom query methods use :attr:`session` and pass what they return to
    ``self._track()`` so that the unit of work sees its domain events.
    """

    def __init__(self, session: Session, model: type[T]) -> None:
        super().__init__(model)
        self._session = session

    @property
    def session(self) -> Session:
        """The session of the active unit of work block."""
        self._use()
        return self._session

    # The hooks run inside a public method, which has checked the use already.

    def _add(self, obj: T) -> None:
        self._session.add(obj)

    def _add_all(self, objs: builtins.list[T]) -> None:
        self._session.add_all(objs)

    def _add_bulk(self, objs: builtins.list[T]) -> None:
        session = self._session
        session.flush()  # rows they refer to may be pending
        for statement, rows in _bulk_statements(self._info, objs):
            session.execute(statement, rows)

    def _get(self, key: Any, lock: str | None) -> T | None:
        found = self._session.get(self.model, key, with_for_update=None if lock is None else _for_update(lock))
        if found is not None and _pending_delete(self._session, found):
            return None
        return found

    def _list(self, query: Query) -> Sequence[T]:
        session = self._session
        return session.scalars(_list_statement(self._info, query, _dialect(session, self._info))).all()

    def _count(self, query: Query) -> int:
        return int(self._session.scalar(_count_statement(self._info, query)) or 0)

    def _list_and_count(self, query: Query) -> tuple[Sequence[T], int]:
        session = self._session
        dialect = _dialect(session, self._info)
        if dialect not in _COUNTS_WITH_PAGE:
            return self._list(query), self._count(query.whole())
        rows = session.execute(_page_statement(self._info, query, dialect)).all()
        if not rows:  # no row carries the total: nothing matches, or the page starts past the end
            return [], 0 if query.offset == 0 and query.start is None else self._count(query.whole())
        return [row[0] for row in rows], int(rows[0][1])

    def _exists(self, query: Query) -> bool:
        return bool(self._session.scalar(_exists_statement(self._info, query)))

    def _upsert(self, upsert: Upsert, *, update: bool) -> tuple[T, bool]:
        session = self._session
        session.flush()
        dialect = _dialect(session, self._info)
        if not update and dialect in ("mysql", "mariadb"):
            created = self._insert_or_keep(upsert)
        else:
            result = session.execute(_upsert_statement(upsert, dialect, update=update))
            created = update or result.first() is not None
        found = session.scalars(_reload_statement(self._info, upsert, dialect)).one()
        return found, created

    def _insert_or_keep(self, upsert: Upsert) -> bool:
        """INSERT in a savepoint; a duplicate key rolls it back: the row exists. Whether it inserted."""
        session = self._session
        try:
            with session.begin_nested():
                session.execute(upsert.table.insert().values(upsert.insert_row))
        except IntegrityError as error:
            if not _is_duplicate(error):
                raise
            return False
        return True

    def _update(self, query: Query, changes: dict[str, Any], version: str | None) -> int:
        result: Any = self._session.execute(_update_statement(self._info, query, changes, version))
        return int(result.rowcount)

    def _delete(self, query: Query) -> int:
        result: Any = self._session.execute(_delete_statement(self._info, query))
        return int(result.rowcount)

    def _remove(self, obj: T) -> None:
        session = self._session
        if _check_removable(session, obj, self.model):
            session.expunge(obj)
        else:
            session.delete(obj)


class AsyncSqlAlchemyRepository(AsyncRepository[T]):
    """An :class:`~uow.AsyncRepository` over a SQLAlchemy ``AsyncSession``."""

    def __init__(self, session: AsyncSession, model: type[T]) -> None:
        super().__init__(model)
        self._session = session

    @property
    def session(self) -> AsyncSession:
        """The async session of the active unit of work block."""
        self._use()
        return self._session

    async def _add(self, obj: T) -> None:
        self._session.add(obj)

    async def _add_all(self, objs: builtins.list[T]) -> None:
        self._session.add_all(objs)

    async def _add_bulk(self, objs: builtins.list[T]) -> None:
        session = self._session
        await session.flush()
        for statement, rows in _bulk_statements(self._info, objs):
            await session.execute(statement, rows)

    async def _get(self, key: Any, lock: str | None) -> T | None:
        found = await self._session.get(self.model, key, with_for_update=None if lock is None else _for_update(lock))
        if found is not None and _pending_delete(self._session.sync_session, found):
            return None
        return found

    async def _list(self, query: Query) -> Sequence[T]:
        session = self._session
        dialect = _dialect(session.sync_session, self._info)
        return (await session.scalars(_list_statement(self._info, query, dialect))).all()

    async def _count(self, query: Query) -> int:
        return int(await self._session.scalar(_count_statement(self._info, query)) or 0)

    async def _list_and_count(self, query: Query) -> tuple[Sequence[T], int]:
        session = self._session
        dialect = _dialect(session.sync_session, self._info)
        if dialect not in _COUNTS_WITH_PAGE:
            return await self._list(query), await self._count(query.whole())
        rows = (await session.execute(_page_statement(self._info, query, dialect))).all()
        if not rows:  # no row carries the total: nothing matches, or the page starts past the end
            return [], 0 if query.offset == 0 and query.start is None else await self._count(query.whole())
        return [row[0] for row in rows], int(rows[0][1])

    async def _exists(self, query: Query) -> bool:
        return bool(await self._session.scalar(_exists_statement(self._info, query)))

    async def _upsert(self, upsert: Upsert, *, update: bool) -> tuple[T, bool]:
        session = self._session
        await session.flush()
        dialect = _dialect(session.sync_session, self._info)
        if not update and dialect in ("mysql", "mariadb"):
            created = await self._insert_or_keep(upsert)
        else:
            result = await session.execute(_upsert_statement(upsert, dialect, update=update))
            created = update or result.first() is not None
        found = (await session.scalars(_reload_statement(self._info, upsert, dialect))).one()
        return found, created

    async def _insert_or_keep(self, upsert: Upsert) -> bool:
        """INSERT in a savepoint; a duplicate key rolls it back: the row exists. Whether it inserted."""
        session = self._session
        try:
            async with session.begin_nested():
                await session.execute(upsert.table.insert().values(upsert.insert_row))
        except IntegrityError as error:
            if not _is_duplicate(error):
                raise
            return False
        return True

    async def _update(self, query: Query, changes: dict[str, Any], version: str | None) -> int:
        result: Any = await self._session.execute(_update_statement(self._info, query, changes, version))
        return int(result.rowcount)

    async def _delete(self, query: Query) -> int:
        result: Any = await self._session.execute(_delete_statement(self._info, query))
        return int(result.rowcount)

    async def _remove(self, obj: T) -> None:
        session = self._session
        if _check_removable(session.sync_session, obj, self.model):
            session.expunge(obj)
        else:
            await session.delete(obj)
