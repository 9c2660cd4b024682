"""Queries a repository answers: where clauses, ordering and pages, the same on every implementation.

A query is written with SQLAlchemy's own expressions, on the model's mapped
attributes (``Batch.qty > 3``) or its table's columns (``batches.c.qty > 3``).
:func:`build_query` checks it once, in the public method that every
implementation shares, so that the fake and the database accept exactly the
same queries:

* every column belongs to one of the tables the model is mapped to;
* every operator is one the fake evaluates as SQL does: comparisons, ``in_``
  and ``not_in``, ``is_`` and ``is_not``, ``like``, ``ilike``,
  ``startswith``, ``endswith``, ``contains``, ``between``, and ``and_``,
  ``or_`` and ``not_``, with SQL's three-valued logic for NULL.

The database runs the query as SQL. The fake evaluates it on rows with
SQLAlchemy's evaluator (the one behind ``synchronize_session="evaluate"``),
which this module extends with LIKE and BETWEEN, and with the conversion of
values by column type that :func:`~uow._rows.coerce` does everywhere else.

Ordering appends the primary key, so that ties come out in the same order on
every implementation and pages never overlap.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import json
import operator
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import attrs
from sqlalchemy import Column, Table, and_, or_
from sqlalchemy.orm.evaluator import UnevaluatableError
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ColumnElement, UnaryExpression

from ._model import ModelInfo
from ._rows import _RowEvaluator, coerce
from .errors import QueryError

__all__ = ["Order", "Page", "Query", "build_query", "lock_mode", "value_of"]

T = TypeVar("T")

Row = dict[str, Any]

#: The modifiers of an ordering term: ascending or descending, and where NULLs go.
_DESCENDING = {operators.desc_op}
_NULLS = {operators.nulls_first_op: "first", operators.nulls_last_op: "last"}


@attrs.frozen
class Order:
    """One ordering term: a column, its direction, and where NULLs go (None: where the database puts them)."""

    column: Column[Any]
    descending: bool
    nulls: str | None


@attrs.frozen
class Query:
    """A checked query: where clauses, equality filters, ordering and a page."""

    where: tuple[ColumnElement[bool], ...]
    filters: dict[str, Any]
    order: tuple[Order, ...]
    limit: int | None
    offset: int
    #: Where a keyset page starts: the rows after a cursor's object, or None.
    start: ColumnElement[bool] | None = None
    #: The row lock the query takes: "update", "skip_locked" or "nowait"; None for none.
    lock: str | None = None

    @property
    def conditions(self) -> tuple[ColumnElement[bool], ...]:
        """The where clauses, with the start of a keyset page."""
        return self.where if self.start is None else (*self.where, self.start)

    def whole(self) -> Query:
        """The same query without its page: every matching row."""
        return Query(self.where, self.filters, self.order, None, 0, None, self.lock)

    def limited(self, limit: int | None) -> Query:
        """The same query, with at most *limit* rows from the same start (None: every row from there)."""
        return Query(self.where, self.filters, self.order, limit, self.offset, self.start, self.lock)


class Page(Generic[T]):
    """One page of a listing: its objects, how many match in all, and the cursor of the page after it.

    ``next`` is None on the last page. Pass it as ``after=`` to get the page
    that follows, whatever page this one was.
    """

    __slots__ = ("_next", "items", "total")

    def __init__(self, items: list[T], total: int, next: str | Callable[[], str] | None) -> None:
        self.items = items
        self.total = total
        #: The cursor, or a function that encodes it when it is first asked for: many callers never ask.
        self._next = next

    @property
    def next(self) -> str | None:
        """The cursor of the page after this one, for ``after=``; None on the last page."""
        cursor = self._next
        if callable(cursor):
            cursor = self._next = cursor()
        return cursor

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Page)
        return (self.items, self.total, self.next) == (other.items, other.total, other.next)

    __hash__ = None  # type: ignore[assignment]  # its items are a list

    def __repr__(self) -> str:
        return f"Page(items={self.items!r}, total={self.total!r}, next={self.next!r})"


def lock_mode(for_update: object, skip_locked: object, nowait: object) -> str | None:
    """The row lock that ``for_update``, ``skip_locked`` and ``nowait`` ask for; QueryError if they disagree."""
    for name, flag in (("for_update", for_update), ("skip_locked", skip_locked), ("nowait", nowait)):
        if flag.__class__ is not bool:
            msg = f"{name} takes True or False, not {flag!r}"
            raise QueryError(msg)
    if not for_update:
        if skip_locked or nowait:
            msg = "skip_locked=True and nowait=True qualify a row lock: pass for_update=True with them"
            raise QueryError(msg)
        return None
    if skip_locked and nowait:
        msg = "a row lock either skips rows that others hold (skip_locked=True) or fails at once (nowait=True)"
        raise QueryError(msg)
    return "skip_locked" if skip_locked else "nowait" if nowait else "update"


_model_tables: dict[type[Any], frozenset[Table]] = {}


def _tables(info: ModelInfo) -> frozenset[Table]:
    """The tables *info*'s model is mapped to, read once per model."""
    found = _model_tables.get(info.model)
    if found is None:
        found = _model_tables[info.model] = frozenset(table for table in info.mapper.tables if isinstance(table, Table))
    return found


def build_query(
    info: ModelInfo,
    where: Sequence[Any],
    filters: dict[str, Any],
    order_by: Any,
    limit: int | None,
    offset: int,
    after: str | None = None,
    lock: str | None = None,
) -> Query:
    """Check a query once for every implementation; raise :class:`~uow.errors.QueryError` naming what is wrong.

    *after* is a cursor from :func:`cursor_after`: the query then starts
    after the object it was made from.
    """
    if filters:
        info.check_filters(filters)
    simple_limit = limit is None or (type(limit) is int and limit >= 0)
    if not where and order_by is None and not offset and after is None and simple_limit:
        return Query((), filters, _primary_key_order(info), limit, 0, lock=lock)  # the common case, checked at once
    tables = _tables(info)
    for clause in where:
        _check_where(info, tables, clause)
    order = _primary_key_order(info) if order_by is None else _ordering(info, tables, order_by)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        msg = f"limit must be a whole number of at least 0, or None for every row; got {limit!r}"
        raise QueryError(msg)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        msg = f"offset must be a whole number of at least 0; got {offset!r}"
        raise QueryError(msg)
    if after is None:
        return Query(tuple(where), filters, order, limit, offset, lock=lock)
    if offset:
        msg = "a page starts either after a cursor or at an offset: pass after= or offset=, not both"
        raise QueryError(msg)
    position = _read_cursor(info, order, after)
    if isinstance(position, int):
        return Query(tuple(where), filters, order, limit, position, lock=lock)
    return Query(tuple(where), filters, order, limit, 0, _after(order, position), lock)


#: The orderings read lately, by the ids of their terms, with their model: an ordering on the same
#: attributes, such as ``order_by=Batch.eta``, is read once. Its terms are kept, so that their ids are not reused.
_orderings: dict[tuple[int, ...], tuple[type[Any], tuple[Any, ...], tuple[Order, ...]]] = {}


def _ordering(info: ModelInfo, tables: frozenset[Table], order_by: Any) -> tuple[Order, ...]:
    """The ordering *order_by* asks for, then the primary key's columns that it does not name."""
    terms = tuple(order_by) if isinstance(order_by, list | tuple) else (order_by,)
    key = tuple(map(id, terms))
    known = _orderings.get(key)
    if known is not None and known[0] is info.model and all(map(operator.is_, known[1], terms)):
        return known[2]
    order = tuple(_order(info, tables, term) for term in terms)
    named = {(each.column.table, each.column.key) for each in order}
    order += tuple(each for each in _primary_key_order(info) if (each.column.table, each.column.key) not in named)
    if len(_orderings) >= _CHECKED_KEPT:
        _orderings.clear()
    _orderings[key] = (info.model, terms, order)
    return order


_pk_orders: dict[type[Any], tuple[Order, ...]] = {}


def _primary_key_order(info: ModelInfo) -> tuple[Order, ...]:
    """The primary key's columns, ascending: the order every query ends with. Read once per model."""
    found = _pk_orders.get(info.model)
    if found is None:
        columns = (column for column in info.mapper.primary_key if isinstance(column, Column))
        found = _pk_orders[info.model] = tuple(Order(column, False, None) for column in columns)
    return found


#: The where clauses checked lately, by id, with their model: a clause used twice (a listing and its
#: count) is checked once. The clause itself is kept, so that its id is not reused meanwhile.
_checked: dict[int, tuple[Any, type[Any]]] = {}
_CHECKED_KEPT = 256


def _check_where(info: ModelInfo, tables: frozenset[Table], clause: Any) -> None:
    known = _checked.get(id(clause))
    if known is not None and known[0] is clause and known[1] is info.model:
        return
    _check_new_where(info, tables, clause)
    if len(_checked) >= _CHECKED_KEPT:
        _checked.clear()  # start over: one step, safe with threads
    _checked[id(clause)] = (clause, info.model)


def _check_new_where(info: ModelInfo, tables: frozenset[Table], clause: Any) -> None:
    name = info.model.__name__
    if isinstance(clause, bool) or not isinstance(clause, ColumnElement):
        msg = (
            f"a where clause of a query on {name} must be a SQLAlchemy expression such as "
            f"`{name}.qty > 3` or `table.c.qty > 3`; got {clause!r}. A plain Python value here usually "
            "means the attribute compared is not a mapped column"
        )
        raise QueryError(msg)
    if _simple_comparison(tables, clause):
        return
    evaluator = _QueryEvaluator(tables)
    try:
        evaluator.compile(clause)
    except UnevaluatableError as error:
        msg = (
            f"the query on {name} uses something a repository cannot answer the same way on every "
            f"implementation: {error}. Use comparisons, in_/not_in, is_/is_not, like/ilike, startswith, "
            "endswith, contains, between, and and_/or_/not_ on columns of "
            f"{name}'s own tables, or write this query in a custom repository method"
        )
        raise QueryError(msg) from None


#: The operators of a plain comparison, which the fake's evaluator takes for any column and value.
_COMPARISONS = frozenset(
    (operators.eq, operators.ne, operators.lt, operators.le, operators.gt, operators.ge),
)


def _simple_comparison(tables: frozenset[Table], clause: Any) -> bool:
    """Whether *clause* is ``column <op> value`` on a column of *tables*: the common where clause, which the
    evaluator accepts, told at a glance (a few µs a query less)."""
    if not isinstance(clause, BinaryExpression) or clause.operator not in _COMPARISONS:
        return False
    right = clause.right
    if not isinstance(right, BindParameter) or right.expanding:
        return False
    column = _column_of(clause.left)
    return column is not None and column.table in tables


def value_of(info: ModelInfo, value: Any) -> Any:
    """A value to SET: as it is, or, for a SQL expression (``Batch.qty - 1``), checked as a where clause is."""
    element = getattr(value, "__clause_element__", None)
    if element is not None:
        value = element()
    if isinstance(value, ColumnElement):
        try:
            _QueryEvaluator(_tables(info)).compile(value)
        except UnevaluatableError as error:
            msg = (
                f"update() of {info.model.__name__} sets a value that the repositories cannot compute alike "
                f"everywhere: {error}. Use a value, or arithmetic on its own columns, such as `qty - 1`"
            )
            raise QueryError(msg) from None
    return value


def _order(info: ModelInfo, tables: frozenset[Table], term: Any) -> Order:
    descending = False
    nulls: str | None = None
    element = getattr(term, "__clause_element__", None)
    clause = element() if element is not None else term
    while isinstance(clause, UnaryExpression):
        if clause.modifier in _NULLS:
            nulls = nulls or _NULLS[clause.modifier]
        elif clause.modifier in _DESCENDING:
            descending = True
        elif clause.modifier is not operators.asc_op:
            break
        clause = clause.element
    column = _column_of(clause)
    if column is None or column.table not in tables:
        msg = (
            f"order_by of a query on {info.model.__name__} takes columns of its own tables, such as "
            f"`{info.model.__name__}.eta`, `.desc()` and `.nulls_last()` of them; got {term!r}"
        )
        raise QueryError(msg)
    return Order(column, descending, nulls)


def _column_of(clause: Any) -> Column[Any] | None:
    """The table column an ORM attribute or a column expression stands for."""
    element = getattr(clause, "__clause_element__", None)
    if element is not None:
        clause = element()
    if isinstance(clause, Column) and isinstance(clause.table, Table):
        return clause
    return None


# -- cursors -------------------------------------------------------------------


def keyset(order: Sequence[Order]) -> bool:
    """Whether a cursor can hold the ordering values themselves: no column of the ordering takes NULL."""
    return not any(term.column.nullable for term in order)


def _fingerprint(order: Sequence[Order]) -> list[str]:
    return [f"{term.column.table.name}.{term.column.key}:{'d' if term.descending else 'a'}" for term in order]


_TAGS: dict[str, Callable[[str], Any]] = {
    "d": datetime.date.fromisoformat,
    "t": datetime.datetime.fromisoformat,
    "h": datetime.time.fromisoformat,
    "n": decimal.Decimal,
    "u": uuid.UUID,
    "b": base64.urlsafe_b64decode,
}


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime.datetime):
        return {"t": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"d": value.isoformat()}
    if isinstance(value, datetime.time):
        return {"h": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"n": str(value)}
    if isinstance(value, uuid.UUID):
        return {"u": str(value)}
    if isinstance(value, bytes):
        return {"b": base64.urlsafe_b64encode(value).decode()}
    msg = f"a cursor cannot hold a {type(value).__name__} value; order by columns of plain types, or page by offset"
    raise QueryError(msg)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        ((tag, text),) = value.items()
        return _TAGS[tag](text)
    return value


def cursor_after(info: ModelInfo, query: Query, last: object, position: int) -> Callable[[], str]:
    """An opaque cursor for the page after *last*, the object at *position* (counted from 0) of the whole listing.

    On an ordering whose columns take no NULL, the cursor holds *last*'s
    ordering values, so that the next page starts after that object even if
    rows were added or removed before it. Otherwise it holds the position.
    The values are read, and checked, now; the text is made by the function
    returned, when the page's ``next`` is first read.
    """
    order = query.order
    payload: dict[str, Any] = {}
    if keyset(order):
        keys = _attribute_keys(info)
        payload["k"] = [_encode(getattr(last, keys[term.column])) for term in order]
    else:
        payload["n"] = position + 1

    def encode() -> str:
        text = json.dumps({"o": _fingerprint(order), **payload}, separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    return encode


_model_attribute_keys: dict[type[Any], dict[Any, str]] = {}


def _attribute_keys(info: ModelInfo) -> dict[Any, str]:
    """The attribute of each column *info*'s model maps, by column; read once per model."""
    found = _model_attribute_keys.get(info.model)
    if found is None:
        mapper = info.mapper
        found = {column: prop.key for prop in mapper.column_attrs for column in prop.columns}
        _model_attribute_keys[info.model] = found
    return found


def _read_cursor(info: ModelInfo, order: Sequence[Order], cursor: Any) -> int | list[Any]:
    wrong = (
        f"after= takes the `next` cursor of a page of the same query on {info.model.__name__}, with the same "
        f"order_by; this one is not: {cursor!r}"
    )
    if not isinstance(cursor, str):
        raise QueryError(wrong)
    try:
        payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if payload["o"] != _fingerprint(order):
            raise QueryError(wrong)
        if "n" in payload:
            position = payload["n"]
            if not isinstance(position, int) or position < 0:
                raise QueryError(wrong)
            return position
        values = [_decode(value) for value in payload["k"]]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise QueryError(wrong) from None
    if len(values) != len(order) or not keyset(order):
        raise QueryError(wrong)
    return values


def _after(order: Sequence[Order], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows after *values* in *order*: ahead on the first column that differs, equal on those before it."""
    alternatives = []
    for position, term in enumerate(order):
        equal = [order[before].column == values[before] for before in range(position)]
        column = term.column
        ahead = column < values[position] if term.descending else column > values[position]
        alternatives.append(and_(*equal, ahead))
    return or_(*alternatives)


# -- the fake's evaluation ------------------------------------------------------


def _like_pattern(pattern: str, *, prefix: str = "", suffix: str = "", escape: str | None = None) -> re.Pattern[str]:
    """SQL LIKE as a regular expression: ``%`` any run of characters, ``_`` one, *escape* quoting the next."""
    parts: list[str] = []
    characters = iter(prefix + pattern + suffix)
    for char in characters:
        if escape is not None and char == escape:
            quoted = next(characters, "")
            parts.append(re.escape(quoted))
        elif char == "%":
            parts.append(".*")
        elif char == "_":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


class _QueryEvaluator(_RowEvaluator):
    """SQLAlchemy's evaluator over rows, for the columns of *tables*, with LIKE, BETWEEN and typed values."""

    def __init__(self, tables: frozenset[Table]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tables = tables

    def compile(self, clause: Any) -> Any:
        """A function of a row that evaluates *clause*; UnevaluatableError if it cannot."""
        return self.process(clause)  # type: ignore[no-untyped-call]

    def visit_column(self, clause: Any) -> Any:
        column = _column_of(clause)
        if column is None or column.table not in self.tables:
            raise UnevaluatableError(f"the column {clause} is not one of the model's own tables")
        key = column.key
        return lambda row: row.get(key)

    def visit_binary(self, clause: Any) -> Any:
        operator = clause.operator
        if operator in (operators.between_op, operators.not_between_op):
            low, high = clause.right.clauses
            test = self._between(self.compile(clause.left), self.compile(low), self.compile(high))
            return test if operator is operators.between_op else _negate(test)
        like = _LIKES.get(operator)
        if like is not None:
            return self._like(clause, *like)
        if operator in (operators.in_op, operators.not_in_op):
            negated = operator is operators.not_in_op
            return self._membership(self.compile(clause.left), self.compile(clause.right), negated=negated)
        return super().visit_binary(clause)  # type: ignore[no-untyped-call]

    def visit_bindparam(self, clause: Any) -> Any:
        value = clause.effective_value
        if isinstance(value, list | tuple) and clause.expanding:
            converted: Any = [coerce(clause, each) for each in value]
        else:
            converted = coerce(clause, value)
        return lambda row: converted

    @staticmethod
    def _between(value: Any, low: Any, high: Any) -> Callable[[Row], bool | None]:
        def test(row: Row) -> bool | None:
            found, first, last = value(row), low(row), high(row)
            if found is None or first is None or last is None:
                return None
            return bool(first <= found <= last)

        return test

    @staticmethod
    def _membership(value: Any, members: Any, *, negated: bool) -> Callable[[Row], bool | None]:
        """IN, or NOT IN if *negated*, as SQL evaluates it: NULL among the members makes a miss unknown."""

        def test(row: Row) -> bool | None:
            found, among = value(row), members(row)
            if not among:
                return negated  # of nothing: false, or true for NOT IN, even for NULL, as SQLAlchemy renders it
            if found is None:
                return None
            if found in among:
                return not negated
            return None if None in among else negated

        return test

    def _like(self, clause: Any, negated: bool, folded: bool, prefix: str, suffix: str) -> Any:
        value = self.compile(clause.left)
        pattern = self.compile(clause.right)
        escape = clause.modifiers.get("escape")

        def test(row: Row) -> bool | None:
            found, wanted = value(row), pattern(row)
            if found is None or wanted is None:
                return None
            if folded:
                found, wanted = str(found).lower(), str(wanted).lower()
            matched = _like_pattern(str(wanted), prefix=prefix, suffix=suffix, escape=escape).fullmatch(str(found))
            return (matched is None) if negated else (matched is not None)

        return test


def _negate(test: Callable[[Row], bool | None]) -> Callable[[Row], bool | None]:
    def negated(row: Row) -> bool | None:
        result = test(row)
        return None if result is None else not result

    return negated


#: LIKE-family operators: negated, case-folded, and what SQLAlchemy adds around the pattern.
_LIKES: dict[Any, tuple[bool, bool, str, str]] = {
    operators.like_op: (False, False, "", ""),
    operators.not_like_op: (True, False, "", ""),
    operators.ilike_op: (False, True, "", ""),
    operators.not_ilike_op: (True, True, "", ""),
    operators.startswith_op: (False, False, "", "%"),
    operators.not_startswith_op: (True, False, "", "%"),
    operators.endswith_op: (False, False, "%", ""),
    operators.not_endswith_op: (True, False, "%", ""),
    operators.contains_op: (False, False, "%", "%"),
    operators.not_contains_op: (True, False, "%", "%"),
}


def matcher(tables: frozenset[Any], where: Iterable[ColumnElement[bool]]) -> Callable[[Row], bool]:
    """A test of a row (its columns by key, across *tables*) that every where clause holds for."""
    evaluator = _QueryEvaluator(frozenset(table for table in tables if isinstance(table, Table)))
    tests = [evaluator.compile(clause) for clause in where]

    def matches(row: Row) -> bool:
        return all(test(row) is True for test in tests)

    return matches


def sort_rows(items: list[Any], order: Sequence[Order], row_of: Callable[[Any], Row]) -> None:
    """Sort *items* in place by *order*, reading each one's columns through *row_of*.

    NULLs go where PostgreSQL puts them unless the term says: after every
    value ascending, before every value descending.
    """
    for term in reversed(order):
        key = term.column.key
        nulls_last = term.nulls == "last" if term.nulls is not None else not term.descending
        # In a descending sort the largest key comes first: NULLs are made the largest to come first.
        null_rank = 1 if nulls_last != term.descending else 0

        def sort_key(item: Any, key: str = key, null_rank: int = null_rank) -> tuple[int, Any]:
            value = row_of(item).get(key)
            return (null_rank, 0) if value is None else (1 - null_rank, value)

        items.sort(key=sort_key, reverse=term.descending)
