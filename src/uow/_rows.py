"""The fake's database: rows of tables, their constraints, and transactions that write over them.

This layer knows tables and rows, never mapped objects: ``_memory.py`` turns
objects into rows at a flush and rows into objects at a load, as the ORM does
over a real database.

* :class:`TableSpec` is what a ``Table`` declares, read once: its columns, its
  primary key, UNIQUE constraints and unique indexes, NOT NULL columns,
  foreign keys both ways, literal server defaults and the key the database
  generates.
* :class:`Store` holds the committed rows of every table, with an index per
  unique constraint and per foreign key, so that a check costs the same with
  ten rows stored as with ten thousand.
* :class:`Overlay` is one transaction: the rows it wrote, over the committed
  ones. Each write is checked as the database checks a statement, and a
  commit writes only the rows it changed. A row is a dict of column key to
  value and is never changed in place: a write replaces it.

Reads see the latest committed rows under the transaction's own writes, as
PostgreSQL's default READ COMMITTED isolation does. A row written by an open
transaction is locked against the others until it ends.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    Numeric,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.evaluator import UnevaluatableError, _EvaluatorCompiler
from sqlalchemy.sql.ddl import DDL

from .errors import FakeDatabaseError

__all__ = ["Overlay", "Store", "TableSpec", "coerce", "spec_of"]

Row = dict[str, Any]
Key = tuple[Any, ...]


def _integrity(statement: str, message: str) -> sa_exc.IntegrityError:
    return sa_exc.IntegrityError(statement, None, FakeDatabaseError(message))


def _name(constraint: Any, default: str) -> str:
    name = constraint.name
    return str(name) if isinstance(name, str) and name else default  # quoted_name and conv are names too


def _shown(values: Key) -> str:
    return ", ".join("null" if value is None else str(value) for value in values)


class ForeignKey:
    """One foreign key: columns of *table* that refer to columns of *target*."""

    def __init__(self, constraint: ForeignKeyConstraint, table: Table) -> None:
        self.table = table
        self.columns = tuple(element.parent.key for element in constraint.elements)
        target_columns = [element.column for element in constraint.elements]
        self.target: Table = target_columns[0].table
        self.target_columns = tuple(column.key for column in target_columns)
        self.name = _name(constraint, f"{table.name}_{'_'.join(self.columns)}_fkey")
        self.ondelete = (constraint.ondelete or "NO ACTION").upper()
        self.onupdate = (constraint.onupdate or "NO ACTION").upper()


class _RowEvaluator(_EvaluatorCompiler):
    """SQLAlchemy's Python evaluator of SQL expressions, reading columns from a row instead of an object."""

    def visit_column(self, clause: Any) -> Any:
        key = clause.key
        return lambda row: row.get(key)

    def visit_and_clauselist_op(self, operator: Any, evaluators: list[Any], clause: Any) -> Any:
        """AND in SQL's three-valued logic: false if any part is false, even after an unknown (NULL) one."""

        def evaluate(row: Row) -> bool | None:
            unknown = False
            for evaluator in evaluators:
                value = evaluator(row)
                if value is None:
                    unknown = True
                elif not value:
                    return False
            return None if unknown else True

        return evaluate


def _evaluate(clause: Any) -> Any:
    """A function of a row that evaluates *clause* as SQL would; UnevaluatableError if SQLAlchemy cannot."""
    return _RowEvaluator().process(clause)  # type: ignore[no-untyped-call]


class TableSpec:
    """What a table declares that the fake enforces, read once per table."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.name = table.name
        self.columns = tuple(column.key for column in table.columns)
        self.primary_key = tuple(column.key for column in table.primary_key.columns)
        self.pk_name = _name(table.primary_key, f"{table.name}_pkey")
        self.not_null = tuple(column.key for column in table.columns if not column.nullable)
        uniques: list[tuple[str, tuple[str, ...]]] = []
        #: What the table declares that the fake cannot model: the name an opt-out gives, and what it is.
        self.unmodelled: list[tuple[str, str]] = []
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint):
                columns = tuple(column.key for column in constraint.columns)
                name = _name(constraint, f"{table.name}_{'_'.join(columns)}_key")
                if not self._unmodelled_unique(constraint, name):
                    uniques.append((name, columns))
        for index in table.indexes:
            if isinstance(index, Index) and index.unique:
                columns = tuple(column.key for column in index.columns)
                name = _name(index, f"{table.name}_{'_'.join(columns)}_idx")
                if not self._unmodelled_unique(index, name):
                    uniques.append((name, columns))
        for column in table.columns:
            if column.unique and not any(columns == (column.key,) for _, columns in uniques):
                uniques.append((f"{table.name}_{column.key}_key", (column.key,)))
        self.uniques = tuple(uniques)
        self.foreign_keys = tuple(
            ForeignKey(constraint, table)
            for constraint in table.constraints
            if isinstance(constraint, ForeignKeyConstraint)
        )
        #: The columns of each unique constraint and of each foreign key, in the order of the two above.
        self.unique_columns = tuple(columns for _, columns in self.uniques)
        self.fk_columns = tuple(fk.columns for fk in self.foreign_keys)
        #: What an error names as the statement that failed.
        self.insert_statement = f"INSERT INTO {self.name} (in-memory fake)"
        self.update_statement = f"UPDATE {self.name} (in-memory fake)"
        self.delete_statement = f"DELETE FROM {self.name} (in-memory fake)"
        self.commit_statement = f"COMMIT (in-memory fake, table {self.name})"
        #: Whether a foreign key of this table refers to the table itself (a tree).
        self.self_referencing = any(fk.target is table for fk in self.foreign_keys)
        #: The foreign keys of other tables that refer to this one; filled in by :func:`spec_of`.
        self.referenced_by: list[ForeignKey] = []
        #: CHECK constraints that SQLAlchemy can evaluate in Python: name and test of a row.
        self.checks: list[tuple[str, Any]] = []
        for position, constraint in enumerate(
            (each for each in table.constraints if isinstance(each, CheckConstraint)), start=1
        ):
            name = _name(constraint, f"{table.name}_check" if position == 1 else f"{table.name}_check{position}")
            try:
                self.checks.append((name, _evaluate(constraint.sqltext)))
            except UnevaluatableError:
                self.unmodelled.append(
                    (name, f"the CHECK constraint {name!r} of table {table.name!r}, given as SQL text")
                )
        for column in table.columns:
            where = f"{table.name}.{column.key}"
            if column.computed is not None:
                self.unmodelled.append((where, f"the computed column {where!r}"))
            elif column.server_onupdate is not None:
                self.unmodelled.append((where, f"the server-side ON UPDATE value of {where!r}"))
        for fk in self.foreign_keys:
            if fk.onupdate not in ("NO ACTION", "RESTRICT"):
                self.unmodelled.append((fk.name, f"ON UPDATE {fk.onupdate} of the foreign key {fk.name!r}"))
            if fk.ondelete == "SET DEFAULT":
                self.unmodelled.append((fk.name, f"ON DELETE SET DEFAULT of the foreign key {fk.name!r}"))
        for listener in table.dispatch.after_create:
            statement = getattr(listener, "statement", None)
            if isinstance(listener, DDL) and isinstance(statement, str) and "TRIGGER" in statement.upper():
                self.unmodelled.append((f"{table.name} trigger", f"a trigger created with table {table.name!r}"))
        #: The integer primary key column the database numbers, if any.
        self.generated: str | None = None
        if len(table.primary_key.columns) == 1:
            column = next(iter(table.primary_key.columns))
            if is_generated(column):
                self.generated = column.key

        #: Per column whose values a database converts: its key, the Python type it stores, and the column.
        self.converters = tuple(
            (column.key, stored, column) for column in table.columns if (stored := _stored_type(column)) is not None
        )

    def _unmodelled_unique(self, constraint: UniqueConstraint | Index, name: str) -> bool:
        """Record a unique constraint or index the fake cannot enforce as declared; True if it is one."""
        kind = "index" if isinstance(constraint, Index) else "constraint"
        where = f"the unique {kind} {name!r} of table {self.name!r}"
        options = constraint.dialect_kwargs
        if isinstance(constraint, Index) and any(not isinstance(each, Column) for each in constraint.expressions):
            self.unmodelled.append((name, f"{where}, on an expression"))
        elif any(key.endswith("_where") and value is not None for key, value in options.items()):
            self.unmodelled.append((name, f"{where}, which is partial (a WHERE clause)"))
        elif any(key.endswith("_nulls_not_distinct") and value for key, value in options.items()):
            self.unmodelled.append((name, f"{where}, with NULLS NOT DISTINCT"))
        else:
            return False
        return True

    def convert(self, row: Row) -> None:
        """Store each value as its column's type, as a database converts what it is given (``'3'`` as 3)."""
        for key, stored, column in self.converters:
            value = row.get(key)
            if value is not None and type(value) is not stored:
                row[key] = coerce(column, value)

    def key_of(self, row: Row) -> Key:
        return _values(row, self.primary_key)


def _plain(kind: Any, base: type[Any]) -> bool:
    """Whether *kind* converts values as *base* does: a subclass with processors of its own stores other values."""
    cls = type(kind)
    return cls.bind_processor is base.bind_processor and cls.result_processor is base.result_processor


def _stored_type(column: Any) -> type[Any] | None:
    """The Python type a column's values come back as, for the types whose values :func:`coerce` converts."""
    kind = column.type
    if isinstance(kind, Boolean):
        return None
    if isinstance(kind, Integer):
        return int if _plain(kind, Integer) else None
    if isinstance(kind, Float):
        return float if _plain(kind, Float) else None
    if isinstance(kind, Numeric):
        return decimal.Decimal if kind.asdecimal and _plain(kind, Numeric) else None
    if isinstance(kind, String) and _plain(kind, String):
        try:
            python_type = kind.python_type
        except NotImplementedError:
            return None
        return str if python_type is str else None  # not an Enum of a Python enum class
    return None


def is_generated(column: Any) -> bool:
    """Whether the database numbers this integer primary key column when an INSERT leaves it out."""
    if not isinstance(column.type, Integer) or column.foreign_keys:
        return False
    if column.identity is not None:
        return True
    default = column.default
    if default is not None:
        return bool(getattr(default, "is_sequence", False))
    return column.server_default is None and column.autoincrement in ("auto", True)


_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


def coerce(column: Any, value: Any) -> Any:
    """*value* as the column compares it, following SQLite's type affinity: ``'3'`` is 3 in an integer column."""
    if value is None:
        return None
    kind = column.type
    if isinstance(kind, Boolean):
        return value
    if isinstance(kind, Integer):
        if type(value) is int:  # the usual value, as it is
            return value
        if isinstance(value, str):
            text = value.strip()
            if _INTEGER.match(text):
                return int(text)
            if _NUMBER.match(text):  # '3.0' and '3e0' are 3 too; '3.5' is a real that no integer equals
                number = float(text)
                return int(number) if number.is_integer() and abs(number) < 2**53 else number
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
            return int(value)
        return value
    if isinstance(kind, Float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value
    if isinstance(kind, Numeric):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            try:
                exact = decimal.Decimal(str(value))
            except decimal.InvalidOperation:
                return value
            return exact if exact.is_finite() else value  # a NaN is no number a database stores
        return value
    if isinstance(kind, String) and isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
        return str(value)
    return value


_specs: dict[Table, TableSpec] = {}


def spec_of(table: Table) -> TableSpec:
    """The :class:`TableSpec` of *table*, with the foreign keys of its metadata that refer to it."""
    spec = _specs.get(table)
    if spec is None:
        spec = _specs[table] = TableSpec(table)
        for other in table.metadata.tables.values() if table.metadata is not None else ():
            other_spec = spec if other is table else spec_of(other)
            for fk in other_spec.foreign_keys:
                if fk.target is table and fk not in spec.referenced_by:
                    spec.referenced_by.append(fk)
        for fk in spec.foreign_keys:  # a table of another metadata, or read before this one
            target = spec_of(fk.target) if fk.target is not table else spec
            if fk not in target.referenced_by:
                target.referenced_by.append(fk)
    return spec


def _values(row: Row, columns: tuple[str, ...]) -> Key:
    """The values of *columns* in *row*, in their order."""
    if len(columns) == 1:  # the usual case, built without a generator
        return (row[columns[0]],)
    return tuple(row[name] for name in columns)


class _Indexes:
    """Unique values and foreign-key references of a set of rows of one table."""

    __slots__ = ("refs", "unique")

    def __init__(self, spec: TableSpec) -> None:
        #: Per unique constraint: its values to the key of the row that holds them.
        self.unique: list[dict[Key, Key]] = [{} for _ in spec.uniques] if spec.uniques else []
        #: Per foreign key: the values it refers to, to the keys of the rows that refer to them.
        self.refs: list[dict[Key, set[Key]]] = [{} for _ in spec.foreign_keys] if spec.foreign_keys else []

    def add(self, spec: TableSpec, key: Key, row: Row) -> None:
        # zip() without strict=True: both lists are built from the same spec, one per constraint.
        if self.unique:
            for index, columns in zip(self.unique, spec.unique_columns):  # noqa: B905
                values = _values(row, columns)
                if None not in values:
                    index[values] = key
        if self.refs:
            for refs, columns in zip(self.refs, spec.fk_columns):  # noqa: B905
                values = _values(row, columns)
                if None not in values:
                    holders = refs.get(values)
                    if holders is None:
                        refs[values] = {key}
                    else:
                        holders.add(key)

    def remove(self, spec: TableSpec, key: Key, row: Row) -> None:
        for index, columns in zip(self.unique, spec.unique_columns, strict=True):
            values = _values(row, columns)
            if index.get(values) == key:
                del index[values]
        for refs, columns in zip(self.refs, spec.fk_columns, strict=True):
            values = _values(row, columns)
            holders = refs.get(values)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del refs[values]


class _Table:
    """The rows of one table, with their indexes."""

    __slots__ = ("indexes", "rows", "spec")

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.rows: dict[Key, Row] = {}
        self.indexes = _Indexes(spec)

    def put(self, key: Key, row: Row | None) -> None:
        rows = self.rows
        old = rows.get(key)
        indexed = self.indexes.unique or self.indexes.refs
        if old is not None and indexed:
            self.indexes.remove(self.spec, key, old)
        if row is None:
            rows.pop(key, None)
        else:
            rows[key] = row
            if indexed:
                self.indexes.add(self.spec, key, row)


class Store:
    """The committed rows of a fake database."""

    def __init__(self, unenforced: frozenset[str] = frozenset()) -> None:
        #: Names of constraints, columns and triggers the fake was told to leave out instead of refusing them.
        self.unenforced = unenforced
        self.tables: dict[Table, _Table] = {}
        #: The highest integer key each table has held or handed out: the next generated one follows it.
        self.counters: dict[Table, int] = {}
        #: The rows that an open transaction has written: locked against the others until it ends. While one
        #: transaction is open alone, nobody can wait for its rows: they are recorded when a second one opens.
        self.locks: dict[tuple[Table, Key], Overlay] = {}
        #: The transactions open on this store, oldest first.
        self.open: list[Overlay] = []
        #: How many commits have written rows: a transaction that began after the last one needs no
        #: second check at its commit, since every statement was checked against the rows stored now.
        self.generation = 0

    def table(self, table: Table) -> _Table:
        found = self.tables.get(table)
        if found is None:
            found = self.tables[table] = _Table(spec_of(table))
        return found


_DELETED: Any = None


class Overlay:
    """One transaction's writes over a :class:`Store`: what it inserted, updated and deleted, checked as it goes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        #: Per table: the rows this transaction wrote, by key; None for a row it deleted.
        self.writes: dict[Table, _Table] = {}
        #: The keys this transaction inserted that were not in the store when it did.
        self.inserted: set[tuple[Table, Key]] = set()
        self.counters: dict[Table, int] = {}
        #: The store's generation when this transaction began.
        self.generation = store.generation
        #: The rows this transaction locked with SELECT ... FOR UPDATE, without writing them.
        self.locked: set[tuple[Table, Key]] = set()
        #: Whether this transaction's written rows are recorded in the store's locks (see :meth:`_share`).
        self.shared = False
        opened = store.open
        if opened:  # no longer alone: the others' rows are locked against this one from now on
            for other in opened:
                other._share()
            self.shared = True
        opened.append(self)

    def _share(self) -> None:
        """Record the rows this transaction wrote as locked, since another transaction is open beside it."""
        if self.shared:
            return
        self.shared = True
        locks = self.store.locks
        for table, written in list(self.writes.items()):  # copies: the transaction may write meanwhile
            for key in list(written.rows):
                locks[(table, key)] = self

    def close(self) -> None:
        """End the transaction for good: its session is closed."""
        self.end()
        opened = self.store.open
        if self in opened:
            opened.remove(self)

    # -- reading ---------------------------------------------------------------

    def row(self, table: Table, key: Key) -> Row | None:
        written = self.writes.get(table)
        if written is not None and key in written.rows:
            return written.rows[key]
        stored = self.store.tables.get(table)
        return None if stored is None else stored.rows.get(key)

    def rows(self, table: Table) -> Iterator[tuple[Key, Row]]:
        """Every row of *table* this transaction sees, in no particular order."""
        written = self.writes.get(table)
        stored = self.store.tables.get(table)
        if stored is not None:
            if written is None:
                yield from stored.rows.items()
            else:
                mine = written.rows
                yield from ((key, row) for key, row in stored.rows.items() if key not in mine)
        if written is not None:
            yield from ((key, row) for key, row in written.rows.items() if row is not None)

    def referring(self, fk: ForeignKey, values: Key) -> list[Key]:
        """The keys of the rows of *fk*'s table that refer to *values* through it."""
        position = spec_of(fk.table).foreign_keys.index(fk)
        found: set[Key] = set()
        stored = self.store.tables.get(fk.table)
        written = self.writes.get(fk.table)
        if stored is not None:
            for key in stored.indexes.refs[position].get(values, ()):
                if written is None or key not in written.rows:
                    found.add(key)
        if written is not None:
            found.update(written.indexes.refs[position].get(values, ()))
        return sorted(found)

    def find(self, table: Table, match: dict[str, Any]) -> list[tuple[Key, Row]]:
        """The rows of *table* whose columns equal *match*, through a foreign key's index where one fits."""
        spec = spec_of(table)
        for fk in spec.foreign_keys:
            if all(name in match for name in fk.columns):
                values = tuple(match[name] for name in fk.columns)
                candidates = [(key, self.row(table, key)) for key in self.referring(fk, values)]
                break
        else:
            candidates = list(self.rows(table))
        return sorted(
            (
                (key, row)
                for key, row in candidates
                if row is not None and all(row.get(k) == v for k, v in match.items())
            ),
            key=lambda item: item[0],
        )

    def _unique_holder(self, spec: TableSpec, position: int, values: Key) -> Key | None:
        written = self.writes.get(spec.table)
        if written is not None:
            holder = written.indexes.unique[position].get(values)
            if holder is not None:
                return holder
        stored = self.store.tables.get(spec.table)
        if stored is None:
            return None
        holder = stored.indexes.unique[position].get(values)
        if holder is not None and written is not None and holder in written.rows:
            return None  # this transaction changed or deleted that row: its own index says
        return holder

    # -- writing ---------------------------------------------------------------

    def next_key(self, table: Table) -> int:
        """A generated integer key: one past the highest the table has held or handed out.

        The store counts it at once, outside any transaction, as a sequence or
        an identity column does: a transaction open beside this one gets a
        key of its own, and a rollback does not give the number back.
        """
        store = self.store
        highest = max(self.counters.get(table, 0), store.counters.get(table, 0))
        stored = store.tables.get(table)
        if highest == 0 and stored is not None:
            highest = max((key[0] for key in stored.rows if isinstance(key[0], int)), default=0)
        store.counters[table] = highest + 1
        return highest + 1

    def lock(self, table: Table, key: Key, mode: str) -> bool:
        """Lock the row as SELECT ... FOR UPDATE does, until this transaction ends.

        A row that another open transaction holds is skipped (False) with
        *mode* ``"skip_locked"``; otherwise it raises OperationalError: at
        once, as NOWAIT does, or because a database would wait for a
        transaction of this same fake.
        """
        holder = self.store.locks.get((table, key))
        if holder is None or holder is self:
            self.store.locks[(table, key)] = self
            self.locked.add((table, key))
            return True
        if mode == "skip_locked":
            return False
        spec = spec_of(table)
        if mode == "nowait":
            msg = f'could not obtain lock on row ({_shown(key)}) in relation "{spec.name}"'
        else:
            msg = (
                f'row ({_shown(key)}) of table "{spec.name}" is locked by another open transaction of this fake: '
                "SELECT ... FOR UPDATE would wait for it, forever if it is the block around this one. Lock it "
                "in one transaction only, or use nowait=True or skip_locked=True"
            )
        raise sa_exc.OperationalError(
            f"SELECT ... FOR UPDATE (in-memory fake, table {spec.name})", None, FakeDatabaseError(msg)
        )

    def _seen_key(self, table: Table, key: Key) -> None:
        if len(key) == 1 and isinstance(key[0], int) and key[0] > self.counters.get(table, 0):
            self.counters[table] = key[0]

    def _write(self, spec: TableSpec, key: Key, row: Row | None) -> None:
        table = spec.table
        shared = self.shared
        if shared:
            lock = (table, key)
            holder = self.store.locks.get(lock)
        if shared and holder is not None and holder is not self:
            msg = (
                f'row ({_shown(key)}) of table "{spec.name}" is locked by another open transaction of this '
                "fake, which has written it and not ended: a database would wait for that transaction, "
                "forever if it is the block around this one. Commit the outer block's change first, or "
                "keep the two transactions on different rows"
            )
            raise sa_exc.OperationalError(f"UPDATE {spec.name} (in-memory fake)", None, FakeDatabaseError(msg))
        written = self.writes.get(table)
        if written is None:
            written = self.writes[table] = _Table(spec)
        written.put(key, row)
        if row is None:
            written.rows[key] = None  # type: ignore[assignment]  # a deletion
        if shared:
            self.store.locks[lock] = self

    def insert(self, table: Table, row: Row) -> Key:
        """INSERT *row*, complete with defaults and its key; return the key."""
        spec = _specs.get(table) or spec_of(table)
        statement = spec.insert_statement
        if spec.generated is not None and row.get(spec.generated) is None:
            row[spec.generated] = self.next_key(table)
        spec.convert(row)
        for name in spec.not_null:  # :meth:`_check_not_null`, inline
            if row.get(name) is None:
                self._check_not_null(spec, row, statement)
        if spec.checks:
            self._check_checks(spec, row, statement)
        if not spec.primary_key:  # a table without a primary key: each row gets a hidden key of its own
            key: Key = (self.next_key(table),)
            self._check_unique(spec, key, row, statement)
            self._check_references(spec, row, None, statement)
            self.inserted.add((table, key))
            self._write(spec, key, row)
            return key
        key = spec.key_of(row)
        written = self.writes.get(table)
        stored = self.store.tables.get(table)
        if written is not None and key in written.rows:  # :meth:`row`, inline
            taken = written.rows[key] is not None
        else:
            taken = stored is not None and key in stored.rows
        if taken:
            msg = (
                f'duplicate key value violates unique constraint "{spec.pk_name}"\n'
                f"DETAIL:  Key ({', '.join(spec.primary_key)})=({_shown(key)}) already exists."
            )
            raise _integrity(statement, msg)
        if spec.uniques:
            self._check_unique(spec, key, row, statement)
        if spec.foreign_keys:
            self._check_references(spec, row, None, statement)
        if stored is None or key not in stored.rows:
            self.inserted.add((table, key))
        self._seen_key(table, key)
        self._write(spec, key, row)
        return key

    def update(self, table: Table, key: Key, row: Row) -> None:
        """UPDATE the row with *key* to *row*; a changed key moves it."""
        spec = _specs.get(table) or spec_of(table)
        statement = spec.update_statement
        old = self.row(table, key)
        if old is None:
            raise sa_exc.OperationalError(statement, None, FakeDatabaseError(f"no row ({_shown(key)}) to update"))
        spec.convert(row)
        self._check_not_null(spec, row, statement)
        if spec.checks:
            self._check_checks(spec, row, statement)
        new_key = spec.key_of(row)
        if spec.referenced_by:  # the key, or another unique column, that other rows refer to cannot change
            self._check_not_referenced(spec, old, statement, new=row)
        if new_key != key and self.row(table, new_key) is not None:
            msg = (
                f'duplicate key value violates unique constraint "{spec.pk_name}"\n'
                f"DETAIL:  Key ({', '.join(spec.primary_key)})=({_shown(new_key)}) already exists."
            )
            raise _integrity(statement, msg)
        if spec.uniques:
            self._check_unique(spec, new_key, row, statement, ignore=key)
        if spec.foreign_keys:
            self._check_references(spec, row, old, statement)
        if new_key != key:
            self._write(spec, key, None)
            self.inserted.add((table, new_key))
        self._write(spec, new_key, row)

    def delete(self, table: Table, key: Key) -> None:
        """DELETE the row with *key*, with each foreign key's ON DELETE action; a missing row is no error."""
        spec = spec_of(table)
        old = self.row(table, key)
        if old is None:
            return
        statement = spec.delete_statement
        self._write(spec, key, None)
        # A failed flush leaves the whole transaction to be rolled back, as the ORM does: no undo here.
        self._on_delete(spec, old, statement)

    def _on_delete(self, spec: TableSpec, old: Row, statement: str) -> None:
        for fk in spec.referenced_by:
            values = tuple(old[name] for name in fk.target_columns)
            if None in values:
                continue
            holders = self.referring(fk, values)
            if not holders:
                continue
            if fk.ondelete == "CASCADE":
                for holder in holders:
                    self.delete(fk.table, holder)
            elif fk.ondelete == "SET NULL":
                for holder in holders:
                    row = self.row(fk.table, holder)
                    if row is not None:
                        changed = dict(row)
                        changed.update(dict.fromkeys(fk.columns, None))
                        self.update(fk.table, holder, changed)
            else:
                raise _integrity(statement, _still_referenced(spec, fk, values))

    def _check_not_referenced(self, spec: TableSpec, old: Row, statement: str, new: Row | None = None) -> None:
        """Refuse to delete *old*, or to update it to *new*, while other rows refer to the values it gives up.

        An update checks only the foreign keys whose referenced columns it
        changes, and none that the test left out knowingly with its ON UPDATE
        action.
        """
        unenforced = self.store.unenforced if new is not None else ()
        for fk in spec.referenced_by:
            values = tuple(old[name] for name in fk.target_columns)
            if None in values:
                continue
            if new is not None and (fk.name in unenforced or values == tuple(new[name] for name in fk.target_columns)):
                continue
            if self.referring(fk, values):
                raise _integrity(statement, _still_referenced(spec, fk, values))

    def check_row(self, spec: TableSpec, row: Row, statement: str) -> None:
        """Refuse a row that breaks a NOT NULL or CHECK constraint, as any write of it would."""
        self._check_not_null(spec, row, statement)
        self._check_checks(spec, row, statement)

    def _check_not_null(self, spec: TableSpec, row: Row, statement: str) -> None:
        for name in spec.not_null:
            if row.get(name) is None:
                msg = f'null value in column "{name}" of relation "{spec.name}" violates not-null constraint'
                raise _integrity(statement, msg)

    def _check_checks(self, spec: TableSpec, row: Row, statement: str) -> None:
        for name, test in spec.checks:
            if name in self.store.unenforced:
                continue
            if test(row) is False:  # NULL, unknown, passes as in SQL
                msg = f'new row for relation "{spec.name}" violates check constraint "{name}"'
                raise _integrity(statement, msg)

    def _check_unique(self, spec: TableSpec, key: Key, row: Row, statement: str, ignore: Key | None = None) -> None:
        for position, (name, columns) in enumerate(spec.uniques):
            values = tuple(row[column] for column in columns)
            if None in values:
                continue  # NULLs are distinct
            holder = self._unique_holder(spec, position, values)
            if holder is not None and holder != key and holder != ignore:
                msg = (
                    f'duplicate key value violates unique constraint "{name}"\n'
                    f"DETAIL:  Key ({', '.join(columns)})=({_shown(values)}) already exists."
                )
                raise _integrity(statement, msg)

    def _check_references(self, spec: TableSpec, row: Row, old: Row | None, statement: str) -> None:
        for fk in spec.foreign_keys:
            values = _values(row, fk.columns)
            if None in values:
                continue  # MATCH SIMPLE: a NULL in the key refers to nothing
            if old is not None and values == _values(old, fk.columns):
                continue
            if not self._exists(fk, values):
                target = spec_of(fk.target)
                msg = (
                    f'insert or update on table "{spec.name}" violates foreign key constraint "{fk.name}"\n'
                    f"DETAIL:  Key ({', '.join(fk.columns)})=({_shown(values)}) is not present in table "
                    f'"{target.name}".'
                )
                raise _integrity(statement, msg)

    def _exists(self, fk: ForeignKey, values: Key) -> bool:
        target = spec_of(fk.target)
        if fk.target_columns == target.primary_key:
            return self.row(fk.target, values) is not None
        for position, (_, columns) in enumerate(target.uniques):
            if columns == fk.target_columns:
                return self._unique_holder(target, position, values) is not None
        return any(tuple(row[name] for name in fk.target_columns) == values for _, row in self.rows(fk.target))

    # -- ending ----------------------------------------------------------------

    def commit(self) -> None:
        """Check the writes against what others committed meanwhile, then store them."""
        store = self.store
        if not self.writes:
            self.end()
            return
        if store.generation != self.generation:
            self._check_against_store()
        for table, written in self.writes.items():
            stored = store.table(table)
            for key, row in written.rows.items():
                stored.put(key, row)
        for table, counter in self.counters.items():
            if counter > store.counters.get(table, 0):
                store.counters[table] = counter
        store.generation += 1
        self.end()

    def _check_against_store(self) -> None:
        """Refuse writes that conflict with what other transactions committed since this one began."""
        store = self.store
        for table, written in self.writes.items():
            spec = written.spec
            stored = store.table(table)
            statement = spec.commit_statement
            for key, row in written.rows.items():
                if row is None:
                    continue
                if (table, key) in self.inserted and key in stored.rows:
                    msg = (
                        f'duplicate key value violates unique constraint "{spec.pk_name}"\n'
                        f"DETAIL:  Key ({', '.join(spec.primary_key)})=({_shown(key)}) already exists."
                    )
                    raise _integrity(statement, msg)
                for position, (name, columns) in enumerate(spec.uniques):
                    values = tuple(row[column] for column in columns)
                    holder = stored.indexes.unique[position].get(values)
                    if None not in values and holder is not None and holder != key and holder not in written.rows:
                        msg = (
                            f'duplicate key value violates unique constraint "{name}"\n'
                            f"DETAIL:  Key ({', '.join(columns)})=({_shown(values)}) already exists."
                        )
                        raise _integrity(statement, msg)
        # Foreign keys again, against what others committed meanwhile: a parent deleted under a new child,
        # or a child added under a deleted parent, is refused as the database's row locks would refuse it.
        for table, written in self.writes.items():
            spec = written.spec
            statement = spec.commit_statement
            for key, row in written.rows.items():
                if row is None:
                    stored_row = store.tables[table].rows.get(key) if table in store.tables else None
                    if stored_row is not None:
                        self._check_not_referenced(spec, stored_row, statement)
                else:
                    self._check_references(spec, row, None, statement)

    def end(self) -> None:
        """Forget the writes and give up the locks: after a commit, or as a rollback."""
        if not self.writes and not self.locked and not self.counters and not self.inserted:  # it only read
            self.generation = self.store.generation
            return
        locks = self.store.locks
        if self.shared:
            for table, written in self.writes.items():
                for key in written.rows:
                    if locks.get((table, key)) is self:
                        del locks[(table, key)]
            self.shared = len(self.store.open) > 1
        for lock in self.locked:
            if locks.get(lock) is self:
                del locks[lock]
        self.locked = set()
        self.writes = {}
        self.inserted = set()
        self.counters = {}
        self.generation = self.store.generation

    # -- savepoints ------------------------------------------------------------

    def mark(self) -> tuple[dict[Table, dict[Key, Row | None]], set[tuple[Table, Key]], dict[Table, int]]:
        """What :meth:`restore` needs to go back to now: a copy of the writes, in proportion to their number."""
        return (
            {table: dict(written.rows) for table, written in self.writes.items()},
            set(self.inserted),
            dict(self.counters),
        )

    def restore(
        self, mark: tuple[dict[Table, dict[Key, Row | None]], set[tuple[Table, Key]], dict[Table, int]]
    ) -> None:
        writes, inserted, counters = mark
        locks = self.store.locks
        for table, written in self.writes.items():
            before = writes.get(table, {})
            for key in written.rows:
                if key not in before and locks.get((table, key)) is self:
                    del locks[(table, key)]
        self.writes = {}
        for table, rows in writes.items():
            rebuilt = self.writes[table] = _Table(spec_of(table))
            for key, row in rows.items():
                rebuilt.put(key, row)
                if row is None:
                    rebuilt.rows[key] = None  # type: ignore[assignment]
        self.inserted = inserted
        self.counters = counters


def _still_referenced(spec: TableSpec, fk: ForeignKey, values: Key) -> str:
    referring = spec_of(fk.table).name
    return (
        f'update or delete on table "{spec.name}" violates foreign key constraint "{fk.name}" on table '
        f'"{referring}"\nDETAIL:  Key ({", ".join(fk.target_columns)})=({_shown(values)}) is still referenced '
        f'from table "{referring}".'
    )
