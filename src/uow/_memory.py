"""The in-memory session behind the fakes, and the in-memory repositories.

The fake behaves like a database with a SQLAlchemy session in front of it:

* :class:`InMemoryDatabase` holds committed rows (``_rows.Store``), never
  objects, so that nobody outside can change them.
* :class:`InMemorySession` is one transaction. As the ORM does, it keeps an
  identity map of the objects it loaded, keeps new objects pending until a
  flush (any query, or the commit), follows the ``save-update``, ``delete``
  and ``delete-orphan`` cascades, synchronizes foreign keys along
  relationships, numbers generated keys, applies defaults and version
  counters, and turns all that into rows written over the committed ones
  (``_rows.Overlay``), where the table's constraints are checked. A failed
  flush leaves the session refusing work until it is rolled back.
* Objects are built from rows when they are loaded. Their relationships load
  when first read, or at once for the eager loader strategies; after the
  block, an unloaded one raises ``DetachedInstanceError``.

A transaction costs in proportion to the rows it touches, not to the rows
stored.
"""

from __future__ import annotations

import builtins
import datetime
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Boolean, Column, Integer, MetaData, Numeric, Table, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Mapper, RelationshipDirection
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm.attributes import get_history, set_committed_value
from sqlalchemy.orm.base import (
    PASSIVE_NO_INITIALIZE,
    PASSIVE_NO_RESULT,
    RELATED_OBJECT_OK,
    SQL_OK,
    instance_state,
    instance_str,
)
from sqlalchemy.sql.elements import ColumnElement

from ._outbox import Message
from ._query import Order, Query, _QueryEvaluator, matcher, sort_rows
from ._repository import AsyncRepository, Repository, _RepositoryBase
from ._rows import Key, Overlay, Row, Store, _stored_type, coerce, is_generated, spec_of
from ._upsert import Upsert
from .errors import ConfigurationError, NotInRepositoryError

__all__ = ["AsyncInMemoryRepository", "InMemoryRepository"]

T = TypeVar("T")

_MANYTOONE = RelationshipDirection.MANYTOONE
_ONETOMANY = RelationshipDirection.ONETOMANY
_MANYTOMANY = RelationshipDirection.MANYTOMANY
_EAGER = frozenset({"selectin", "joined", "subquery", "immediate", False})
_LAZY = frozenset({"select", True})
_MISSING: Any = object()


# -- what a mapped class is to the fake, read once ------------------------------


class _Plan:
    """How objects of one mapped class become rows and back."""

    def __init__(self, mapper: Mapper[Any]) -> None:
        mapper._check_configure()  # relationships, and the delete-orphan cascades that point at this class
        self.mapper = mapper
        self.base = mapper.base_mapper
        #: The mapper whose class keys the identity map for this class's objects, as the ORM keys it: the
        #: base of a polymorphic hierarchy, but each class of its own in a hierarchy without a discriminator.
        self.identity: Mapper[Any] = next(
            each for each in mapper.iterate_to_root() if each.class_ is mapper._identity_class
        )
        chain = list(reversed(list(mapper.iterate_to_root())))
        tables: list[Table] = []
        for each in chain:
            table = each.local_table
            if isinstance(table, Table) and table not in tables:
                tables.append(table)
        if not tables:
            msg = f"the fake cannot store {mapper.class_.__name__}: it is not mapped to a table"
            raise ConfigurationError(msg)
        self.tables = tuple(tables)
        self.table = tables[0]
        #: Per table: (column key, attribute key, column) for every column of the table.
        self.columns: tuple[tuple[Table, tuple[tuple[str, str | None, Column[Any]], ...]], ...] = tuple(
            (
                table,
                tuple((column.key, _attribute_of(mapper, column), column) for column in table.columns),
            )
            for table in tables
        )
        self.primary_key = tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)
        #: Per table: the attributes that hold its primary key columns, in their order.
        self.key_attributes: dict[Table, tuple[str, ...]] = {
            table: tuple(_attribute_of(mapper, column) or column.key for column in table.primary_key.columns)
            for table in tables
        }
        self.pk_columns = tuple(mapper.primary_key)
        #: Per key attribute whose values a database converts: the attribute, the type it stores, the column.
        self.key_converters = tuple(
            (attribute, stored, column)
            for attribute, column in zip(self.primary_key, self.pk_columns, strict=True)
            if (stored := _stored_type(column)) is not None
        )
        self.fields = {prop.key: prop.columns[0] for prop in mapper.column_attrs}
        self.column_keys = tuple(self.fields)
        self.generated: str | None = None
        if len(mapper.primary_key) == 1 and is_generated(mapper.primary_key[0]):
            self.generated = self.primary_key[0]
        version = mapper.version_id_col
        self.version: str | None = None if version is None else mapper.get_property_by_column(version).key
        self.version_column: str = "" if version is None else str(version.key)
        self.version_generator: Any = mapper.version_id_generator
        #: The discriminator column of a hierarchy, and the identities of this class and its subclasses.
        self.polymorphic_on: str | None = None
        self.identities: frozenset[Any] = frozenset()
        if mapper.polymorphic_on is not None:
            self.polymorphic_on = str(mapper.polymorphic_on.key)
            self.identities = frozenset(each.polymorphic_identity for each in mapper.self_and_descendants)
        self.relationships = tuple(mapper.relationships)
        for rel in self.relationships:
            if isinstance(rel.target, Table) and rel.target in self.tables:
                _SELF_ORDERED.add(rel.target)  # the ORM sorts this table's rows, parents first
        #: Whether a delete could cascade from or to its objects: relationships, or a delete-orphan parent.
        #: Whether a delete-orphan cascade points at this class or a class it derives from, as the ORM looks.
        self.orphanable = any(each._delete_orphans for each in mapper.iterate_to_root())
        self.cascades = bool(self.relationships or self.orphanable)
        self.defaults = _defaults_of(self)
        #: Whether a flush can write its objects the short way (:meth:`InMemorySession._flush_simple`): one
        #: table that does not refer to itself, and nothing that cascades, synchronizes foreign keys, counts
        #: versions or sets a discriminator.
        self.simple = (
            not self.cascades
            and self.version is None
            and mapper.polymorphic_on is None
            and len(self.tables) == 1
            and not spec_of(self.table).self_referencing
        )
        #: What the fake cannot model, by the name an opt-out gives it, with a description.
        self.unmodelled: dict[str, str] = {}
        #: What the fake cannot model and no opt-out can leave aside.
        self.refused: list[str] = []
        tables_used = list(tables)
        for rel in self.relationships:
            if isinstance(rel.secondary, Table) and rel.secondary not in tables_used:
                tables_used.append(rel.secondary)
            if rel.lazy in ("dynamic", "write_only"):
                self.refused.append(
                    f"the relationship {mapper.class_.__name__}.{rel.key} with lazy={rel.lazy!r}, which queries "
                    "the database itself: test it against a database, or map it with lazy='select'"
                )
        for table in tables_used:
            spec = spec_of(table)
            self.unmodelled.update(spec.unmodelled)
            for column in table.columns:
                if column.server_default is None or column.computed is not None or column.identity is not None:
                    continue
                if spec.generated == column.key or _server_default(column) is not _MISSING:
                    continue
                where = f"{table.name}.{column.key}"
                self.unmodelled[where] = f"the server default of {where!r}, which is not a literal"

    def key_of(self, obj: object) -> Key:
        return _picked(obj.__dict__, self.primary_key)

    def table_key(self, table: Table, obj: object) -> Key:
        """The key of *obj*'s row in *table*: its columns that map the primary key."""
        return _picked(obj.__dict__, self.key_attributes[table])


def _convert_key(plan: _Plan, values: dict[str, Any]) -> None:
    """A new object's key as its columns store it (``'5'`` as 5), so that the identity map and the row agree.

    The object then holds the key that loading its row would give, where the
    ORM would keep the value given until the object is loaded again.
    """
    for attribute, stored, column in plan.key_converters:
        value = values.get(attribute)
        if value is not None and type(value) is not stored:
            values[attribute] = coerce(column, value)


def _picked(values: dict[str, Any], names: tuple[str, ...]) -> Key:
    """The values of *names* in *values*, None for a missing one, as a key."""
    if len(names) == 1:  # the usual key, built without a generator
        return (values.get(names[0]),)
    return tuple(values.get(name) for name in names)


def _attribute_of(mapper: Mapper[Any], column: Any) -> str | None:
    try:
        return mapper.get_property_by_column(column).key
    except Exception:
        return None


_plans: dict[Mapper[Any], _Plan] = {}


_class_plans: dict[type[Any], _Plan] = {}


def _plan(obj: Any) -> _Plan:
    """The plan of *obj*'s class, in one lookup once known."""
    return _class_plans.get(type(obj)) or _plan_of_class(type(obj))


def _plan_of_class(cls: type[Any]) -> _Plan:
    """The plan of mapped class *cls*, remembered for :func:`_plan`."""
    found = _class_plans[cls] = plan_of(_mapper(cls))
    return found


def plan_of(mapper: Mapper[Any]) -> _Plan:
    found = _plans.get(mapper)
    if found is None:
        found = _plans[mapper] = _Plan(mapper)
    return found


_class_mappers: dict[type[Any], Mapper[Any]] = {}


def _mapper(obj_or_cls: Any) -> Mapper[Any]:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    mapper = _class_mappers.get(cls)
    if mapper is None:
        mapper = _class_mappers[cls] = inspect(cls)
    return mapper


# -- defaults and conversions ---------------------------------------------------


def _server_default(column: Column[Any]) -> Any:
    """The value of a literal server default, as the column's type holds it."""
    arg = getattr(column.server_default, "arg", None)
    text = arg if isinstance(arg, str) else getattr(arg, "text", None)
    if not isinstance(text, str):
        return _MISSING
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1].replace("''", "'")
    kind = column.type
    if isinstance(kind, Boolean):
        lowered = text.lower()
        if lowered in ("1", "true", "t"):
            return True
        if lowered in ("0", "false", "f"):
            return False
        return _MISSING
    converted = coerce(column, text)
    if isinstance(kind, Integer | Numeric) and isinstance(converted, str):
        return _MISSING
    return converted


def _defaults_of(plan: _Plan) -> list[tuple[str, bool, Any]]:
    """Per attribute with a default: its name, whether the default is called, and the value or the callable."""
    found: list[tuple[str, bool, Any]] = []
    for _, columns in plan.columns:
        for _, attribute, column in columns:
            if attribute is None or any(name == attribute for name, _, _ in found):
                continue
            default: Any = column.default
            if default is not None and not getattr(default, "is_sequence", False):
                if default.is_scalar:
                    found.append((attribute, False, default.arg))
                    continue
                if default.is_callable:
                    found.append((attribute, True, default.arg))
                    continue
            if column.server_default is not None and attribute != plan.generated:
                literal = _server_default(column)
                if literal is not _MISSING:
                    found.append((attribute, False, literal))
    return found


def _apply_defaults(plan: _Plan, obj: object) -> None:
    """Fill unset attributes from column defaults, as an INSERT does."""
    values = obj.__dict__
    for attribute, called, default in plan.defaults:
        if values.get(attribute) is None:
            setattr(obj, attribute, default(None) if called else default)


# -- the database and its sessions ---------------------------------------------


class InMemoryDatabase:
    """Committed state of a fake unit of work: rows of tables, with their constraints."""

    def __init__(self, unenforced: frozenset[str] = frozenset()) -> None:
        self.store = Store(unenforced)
        #: The messages committed to the outbox, oldest first.
        self.published: builtins.list[Message] = []

    def rows(self, model_or_table: Any) -> builtins.list[dict[str, Any]]:
        """The committed rows of a table, or of a mapped class's first table, in primary-key order.

        What a test reads "through a separate connection": each row is a new
        dict of column key to value.
        """
        table = model_or_table if isinstance(model_or_table, Table) else plan_of(_mapper(model_or_table)).table
        stored = self.store.tables.get(table)
        if stored is None:
            return []
        return [dict(row) for _, row in sorted(stored.rows.items(), key=lambda item: _sort_key(item[0]))]


def _detached(obj: object, key: str) -> orm_exc.DetachedInstanceError:
    return orm_exc.DetachedInstanceError(
        f"Parent instance {instance_str(obj)} is not bound to a Session; lazy load operation of "
        f"attribute '{key}' cannot proceed: the unit of work block that loaded it has ended. Read it inside "
        "the block, or load it eagerly (lazy='selectin')"
    )


class InMemorySession:
    """One transaction of an :class:`InMemoryDatabase`, with the identity map of the objects it loaded."""

    def __init__(self, database: InMemoryDatabase) -> None:
        self._database = database
        self._overlay = Overlay(database.store)
        #: The objects this transaction loaded or flushed, by base mapper and key.
        self._identity: dict[tuple[Mapper[Any], Key], Any] = {}
        #: By id: each such object, and its column attributes as its rows hold them.
        self._loaded: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._pending: dict[int, Any] = {}
        self._deleted: dict[int, Any] = {}
        self._failed: BaseException | None = None
        self._flushing = False
        #: The objects the flush under way gave a generated key, with the key's attribute.
        self._keyed: builtins.list[tuple[Any, str]] = []
        self._links_seen: dict[tuple[bool, Table, frozenset[int]], Any] = {}
        #: The objects this transaction deleted, flushed: a rollback brings them back, as the ORM does.
        self._gone: dict[tuple[Mapper[Any], Key], tuple[Any, dict[str, Any]]] = {}
        #: The ids of the loaded objects whose values a rollback or a failed flush expired.
        self._expired: set[int] = set()
        #: The ids of the objects this transaction inserted: forgotten by a rollback.
        self._inserted_ids: set[int] = set()
        #: False once the block has ended: lazy loads then raise DetachedInstanceError.
        self.open = True
        #: Called before a flush that writes, with what is pending; raises if writes are forbidden.
        self.check_write: Callable[[str], None] | None = None
        #: Where the rows locked by ``for_update=True`` are recorded, as (class, primary key): lock mode.
        self.locked: dict[tuple[type[Any], Any], str] = {}
        # While a read-only scope runs inside a read-write one: the state of every object when it began.
        self._watched: dict[int, tuple[Any, dict[str, Any]]] | None = None
        # The messages the commit under way writes to the outbox.
        self._messages: builtins.list[Message] = []
        #: Per class name, the objects the flushes inserted, updated or deleted: counted while traced.
        self.flushed_counts: dict[str, int] | None = None

    # -- transaction ---------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            msg = (
                "This in-memory session's transaction has been rolled back due to a previous "
                f"exception during flush. Roll back before going on. Original exception: {self._failed!r}"
            )
            raise sa_exc.PendingRollbackError(msg)

    def commit(self) -> None:
        self.flush()
        try:
            self._overlay.commit()
        except BaseException as error:
            self._messages = []
            self._fail(error)
            raise
        if self._messages:
            self._database.published.extend(self._messages)
            self._messages = []
        self._inserted_ids = set()
        self._gone = {}

    def receive(self, table: Table, consumer: str, message_id: str) -> bool:
        """Insert an inbox receipt unless this transaction sees one. A receipt that another open transaction
        wrote raises OperationalError, where a database would make this call wait for that transaction."""
        self._check_usable()
        key = (consumer, message_id)
        if self._overlay.row(table, key) is not None:
            return False
        now = datetime.datetime.now(datetime.timezone.utc)
        self._overlay.insert(table, {"consumer": consumer, "message_id": message_id, "received_at": now})
        return True

    def stage_messages(self, messages: Iterable[Message]) -> None:
        """Messages for the outbox, published if the commit under way succeeds."""
        self._messages.extend(messages)

    def rollback(self) -> None:
        """Discard the writes; loaded objects stay, refreshed from the committed rows, as SQLAlchemy reloads them.

        Objects this transaction inserted are forgotten, as the ORM expunges
        them; an object whose row is gone is forgotten too.
        """
        inserted = self._inserted_ids
        self._messages = []
        self._overlay.end()
        self._pending.clear()
        self._deleted.clear()
        self._failed = None
        self._inserted_ids = set()
        self._revive()
        self._keep_refreshed(lambda obj: id(obj) not in inserted)

    def _keep_refreshed(self, keep: Callable[[Any], bool]) -> None:
        """Keep the loaded objects *keep* accepts, expired as SQLAlchemy expires them; forget the others."""
        identity: dict[tuple[Mapper[Any], Key], Any] = {}
        loaded: dict[int, tuple[Any, dict[str, Any]]] = {}
        for ident, obj in self._identity.items():
            if keep(obj):
                self._expire(obj)
                identity[ident] = obj
                loaded[id(obj)] = self._loaded.get(id(obj), (obj, _columns(_plan(obj), obj)))
        self._identity = identity
        self._loaded = loaded

    def _expire(self, obj: Any) -> None:
        """Forget *obj*'s loaded values but its key: the next read reloads them, as after the ORM's expiry."""
        plan = _plan(obj)
        values = obj.__dict__
        state = instance_state(obj)
        if type(state.callables) is not dict:
            state.callables = dict(state.callables)
        keep = set(plan.primary_key)
        for name in plan.column_keys:
            if name not in keep:
                values.pop(name, None)
                state.callables[name] = _Refresher(self, name)
        for rel in plan.relationships:
            values.pop(rel.key, None)
        state._commit_all(values)
        state.parents = {}  # which collections hold it is read again too
        self._install_loaders(obj, plan)
        self._expired.add(id(obj))

    def _unexpire(self, obj: Any) -> None:
        """Reload an expired object's columns from its rows; ObjectDeletedError if its row is gone."""
        if id(obj) not in self._expired:
            return
        plan = _plan(obj)
        values = obj.__dict__
        key = plan.key_of(obj)
        fresh: dict[str, Any] = {}
        for table, columns in plan.columns:
            row = self._overlay.row(table, key if table is plan.table else plan.table_key(table, obj))
            if row is None:
                raise orm_exc.ObjectDeletedError(instance_state(obj))
            for column_key, attribute, _ in columns:
                if attribute is not None:
                    fresh.setdefault(attribute, row.get(column_key))
        callables = instance_state(obj).callables
        for name, value in fresh.items():
            if name not in values:
                values[name] = value
            if isinstance(callables.get(name), _Refresher):
                del callables[name]
        self._expired.discard(id(obj))
        self._loaded[id(obj)] = (obj, fresh)

    def close(self) -> None:
        """End the transaction: discard the writes and detach every object."""
        self._overlay.close()
        self._pending.clear()
        self._deleted.clear()
        self._failed = None
        self._identity.clear()
        self._loaded.clear()
        self._inserted_ids = set()
        self._expired = set()
        self._gone = {}
        self.open = False

    def watch_changes(self, *, starts: bool) -> None:
        """Start or stop noticing attributes changed on loaded objects, for a read-only scope."""
        if not starts:
            self._watched = None
            return
        self._check_usable()
        self._watched = {id(obj): (obj, _object_state(obj)) for obj, _ in self._loaded.values()}

    def _changed_since_watch(self) -> int:
        if self._watched is None:
            return 0
        return sum(1 for obj, state in self._watched.values() if _object_state(obj) != state)

    def has_changes(self) -> bool:
        """Whether this transaction holds work not yet committed, changed attributes of loaded objects included."""
        if self._pending or self._deleted or self._overlay.writes:
            return True
        for obj, snapshot in self._loaded.values():
            if self._dirty(obj, snapshot) or self._links_changed(obj):
                return True
        return bool(self._cascade_new())

    def begin_nested(self) -> _Savepoint:
        """Flush, then remember this transaction's state, as SAVEPOINT does."""
        self.flush()
        return _Savepoint(
            session=self,
            mark=self._overlay.mark(),
            states={id(obj): (obj, _object_state(obj)) for obj, _ in self._loaded.values()},
            identity=dict(self._identity),
            loaded={key: (obj, dict(snapshot)) for key, (obj, snapshot) in self._loaded.items()},
            inserted=set(self._inserted_ids),
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
        # reload of expired objects would; objects loaded since are reloaded
        # from the rows; objects inserted since are forgotten.
        self._overlay.restore(savepoint.mark)
        for obj, state in savepoint.states.values():
            _restore_object(obj, state)
            instance_state(obj)._commit_all(obj.__dict__)
            self._expired.discard(id(obj))
            # A relationship first loaded inside the savepoint is unloaded again: it loads again when read.
            self._install_loaders(obj, _plan(obj))
        known = {id(obj) for obj in savepoint.identity.values()}
        inserted_since = self._inserted_ids - savepoint.inserted
        loaded_since = {
            ident: obj
            for ident, obj in self._identity.items()
            if id(obj) not in known and id(obj) not in inserted_since
        }
        previous = self._loaded
        self._identity = dict(savepoint.identity)
        self._loaded = {key: (obj, dict(snapshot)) for key, (obj, snapshot) in savepoint.loaded.items()}
        self._inserted_ids = set(savepoint.inserted)
        for ident, obj in loaded_since.items():
            self._identity[ident] = obj
            self._loaded[id(obj)] = previous.get(id(obj), (obj, _columns(_plan(obj), obj)))
            self._expire(obj)
        self._pending.clear()
        self._deleted.clear()
        self._failed = None

    # -- unit of work --------------------------------------------------------

    def _holds(self, obj: object) -> bool:
        return id(obj) in self._loaded and self._loaded[id(obj)][0] is obj

    def add(self, obj: object) -> None:
        self._deleted.pop(id(obj), None)
        if not self._holds(obj):
            self._pending[id(obj)] = obj

    def delete(self, obj: object) -> None:
        if self._pending.pop(id(obj), None) is not None:
            return
        if not self._holds(obj):
            msg = (
                f"remove() was given a {type(obj).__name__} that this unit of work neither returned "
                "nor was given in this block; load it through the repository first"
            )
            raise NotInRepositoryError(msg)
        if _plan(obj).relationships:
            # As Session.delete(): the delete cascade loads what it reaches now, so that it stays readable.
            state = instance_state(obj)
            for _ in state.mapper.cascade_iterator("delete", state):
                pass
        self._deleted[id(obj)] = obj

    def insert_now(self, objs: builtins.list[Any]) -> None:
        """A bulk INSERT: flush, then write the rows of *objs*, which stay unattached, as the database would."""
        self.flush()
        self._check_write(f"{len(objs)} new objects")
        try:
            for obj in objs:
                plan = _plan(obj)
                values = dict(obj.__dict__)
                if plan.generated is not None and values.get(plan.generated) is None:
                    values[plan.generated] = self._overlay.next_key(plan.table)
                shadow = _Shadow(values)
                _apply_defaults(plan, shadow)
                self._set_identity(plan, shadow)
                if plan.version is not None:  # the ORM's bulk INSERT writes the generator's first value, always
                    self._first_version(plan, shadow)
                for table, row in self._rows_of(plan, shadow.__dict__):
                    self._overlay.insert(table, row)
        except BaseException as error:
            self._fail(error)
            raise

    def upsert(self, model: type[Any], upsert: Upsert, *, update: bool) -> tuple[Any, bool]:
        """INSERT ... ON CONFLICT on *upsert*'s key: DO UPDATE its changes (*update*) or DO NOTHING.

        Returns the object of the row, refreshed from it as ``populate_existing`` does, and whether the
        row was inserted.
        """
        self.flush()
        self._check_write(f"an upsert of a {model.__name__}")
        plan = plan_of(_mapper(model))
        spec = spec_of(upsert.table)
        overlay = self._overlay
        columns = {column.key: column for column in upsert.table.columns}
        row = {key: coerce(columns[key], value) for key, value in upsert.row.items()}
        try:
            # The row to insert comes first, with its defaults, and NOT NULL and CHECK hold for it even
            # when a conflict then turns the statement into an UPDATE, as PostgreSQL checks them.
            table, full = self._values_row(plan, row)
            overlay.check_row(spec, full, spec.insert_statement)
            if set(upsert.on) == set(spec.primary_key):
                key: Key | None = spec.key_of(full) if overlay.row(table, spec.key_of(full)) is not None else None
            else:
                position = next(
                    index for index, (_, unique) in enumerate(spec.uniques) if set(unique) == set(upsert.on)
                )
                key = overlay._unique_holder(
                    spec, position, tuple(full[column] for column in spec.uniques[position][1])
                )
            if key is None:
                created = True
                key = overlay.insert(table, full)
            else:
                created = False
                current = overlay.row(table, key)
                assert current is not None
                changed = {column: row[column] for column in upsert.changes}
                if update and (changed or upsert.version is not None):
                    merged = {**current, **changed}
                    if upsert.version is not None:
                        merged[upsert.version] = (current.get(upsert.version) or 0) + 1
                    overlay.update(table, key, merged)
                    key = spec.key_of(merged)
        except BaseException as error:
            self._fail(error)
            raise
        obj = self._identity.get((plan.identity, key))
        if obj is None:
            obj = self._load(plan, key)
        else:
            self._expire(obj)
            self._unexpire(obj)
        return obj, created

    def bulk_update(self, model: type[Any], query: Query, changes: dict[str, Any], version: str | None) -> int:
        """UPDATE ... WHERE *query*: set *changes* (values, or expressions of the row) on each row it selects."""
        self.flush()
        self._check_write(f"a bulk update of {model.__name__} objects")
        plan = plan_of(_mapper(model))
        keys, _ = self._matching(plan, query.filters, query.conditions, ())
        columns = {column.key: column for column in plan.table.columns}
        evaluator = _QueryEvaluator(frozenset({plan.table}))
        computed = {
            key: evaluator.compile(value) if isinstance(value, ColumnElement) else coerce(columns[key], value)
            for key, value in changes.items()
        }
        try:
            for key, row in keys:
                new = dict(row)
                for column_key, value in computed.items():
                    new[column_key] = value(row) if callable(value) else value
                if version is not None:
                    new[version] = (row.get(version) or 0) + 1
                self._overlay.update(plan.table, key, new)
        except BaseException as error:
            self._fail(error)
            raise
        for key, _ in keys:  # the objects this transaction holds get the new values, as "fetch" sets them
            obj = self._identity.get((plan.identity, key))
            if obj is not None and id(obj) not in self._expired:
                self._expire(obj)
                self._unexpire(obj)
        return len(keys)

    def bulk_delete(self, model: type[Any], query: Query) -> int:
        """DELETE ... WHERE *query*, with the foreign keys' ON DELETE actions; the objects held go with their rows."""
        self.flush()
        self._check_write(f"a bulk delete of {model.__name__} objects")
        plan = plan_of(_mapper(model))
        keys, _ = self._matching(plan, query.filters, query.conditions, ())
        try:
            for key, _ in keys:
                self._overlay.delete(plan.table, key)
        except BaseException as error:
            self._fail(error)
            raise
        for (base, key), obj in list(self._identity.items()):  # rows deleted here or by an ON DELETE CASCADE
            if id(obj) in self._loaded and self._overlay.row(plan_of(base).table, key) is None:
                del self._identity[(base, key)]
                self._gone[(base, key)] = self._loaded.pop(id(obj))
        return len(keys)

    def _values_row(self, plan: _Plan, row: Row) -> tuple[Table, Row]:
        """The row an INSERT of column values writes for *plan*'s class: with defaults and a generated key."""
        attributes = {column_key: attribute for _, cols in plan.columns for column_key, attribute, _ in cols}
        shadow = _Shadow({attribute: row[key] for key, attribute in attributes.items() if attribute and key in row})
        values = shadow.__dict__
        if plan.generated is not None and values.get(plan.generated) is None:
            values[plan.generated] = self._overlay.next_key(plan.table)
        _apply_defaults(plan, shadow)
        self._set_identity(plan, shadow)
        if plan.version is not None:
            values[plan.version] = 1
        ((table, written),) = self._rows_of(plan, values)
        return table, written

    def _fail(self, error: BaseException) -> None:
        """A flush or a commit failed: refuse work until the rollback, and expire what was loaded, as the ORM does."""
        self._failed = error
        self._revive()
        for obj, _ in list(self._loaded.values()):
            self._expire(obj)

    def _revive(self) -> None:
        """Objects deleted by a flush of a transaction that will not commit are loaded objects again."""
        for ident, (obj, snapshot) in self._gone.items():
            self._identity.setdefault(ident, obj)
            self._loaded.setdefault(id(obj), (obj, snapshot))
        self._gone = {}

    def _check_write(self, pending: str) -> None:
        if self.check_write is not None:
            self.check_write(pending)

    def flush(self) -> None:
        if self._failed is not None:
            self._check_usable()
        if self._flushing or self._unchanged():
            return
        self._flushing = True
        try:
            self._flush()
        except BaseException as error:
            self._take_back_keys()
            self._fail(error)
            raise
        finally:
            self._flushing = False
            if self._keyed:
                self._keyed = []

    def _key_new(self, plan: _Plan, obj: Any, values: dict[str, Any]) -> None:
        """The key of new *obj* at its flush: numbered when the database generates it and none was given, into
        its dict without an attribute event, as the ORM sets the key its INSERT returned; else as its columns
        store it."""
        if plan.generated is not None and values.get(plan.generated) is None:
            values[plan.generated] = self._overlay.next_key(plan.table)
            self._keyed.append((obj, plan.generated))
        else:
            _convert_key(plan, values)

    def _take_back_keys(self) -> None:
        """A flush failed: the objects it gave generated keys have none again, as when the ORM's INSERT fails.

        Their next flush numbers them anew, so that a retry of the same
        objects never reuses a key that another transaction took meanwhile.
        """
        for obj, attribute in self._keyed:
            obj.__dict__[attribute] = None

    def _unchanged(self) -> bool:
        """Whether nothing was added, removed or changed through an attribute since the last flush."""
        if self._pending or self._deleted or self._watched is not None:
            return False
        for obj, _ in self._loaded.values():  # noqa: SIM110  # a loop: all() of a generator costs more here
            if instance_state(obj).modified:
                return False
        return True

    def _flush(self) -> None:
        if not self._deleted and self._all_simple():
            self._flush_simple()
            return
        inserts = self._cascade_new()
        self._cascade_deletes()
        changed = self._changed_since_watch()
        if changed and self.check_write is not None:
            self.check_write(f"{len(inserts)} new, {changed} changed and {len(self._deleted)} deleted objects")
        dirty = [
            (obj, snapshot)
            for obj, snapshot in self._loaded.values()
            if id(obj) not in self._deleted and self._dirty(obj, snapshot)
        ]
        if (
            not inserts
            and not self._deleted
            and not dirty
            and not any(self._links_changed(obj) for obj, _ in self._loaded.values())
        ):
            return  # nothing changed, not even a collection
        if self.check_write is not None:
            self.check_write(f"{len(inserts)} new, {len(dirty)} changed and {len(self._deleted)} deleted objects")
        overlay = self._overlay
        # Keys first, so that foreign keys can be synchronized to them.
        for obj in inserts:
            plan = _plan(obj)
            self._key_new(plan, obj, obj.__dict__)
            _apply_defaults(plan, obj)
            self._set_identity(plan, obj)
        links: list[tuple[bool, Table, Row]] = []
        self._links_seen = {}
        related = False
        for obj in [*inserts, *(obj for obj, _ in self._loaded.values())]:
            if id(obj) not in self._deleted and _plan(obj).relationships:
                related = True
                self._synchronize(obj, links)
        for obj in self._deleted.values():
            if _plan(obj).relationships:
                related = True
                self._release_children(obj)
        if related:  # synchronizing foreign keys may have changed loaded objects
            dirty = [
                (obj, snapshot)
                for obj, snapshot in self._loaded.values()
                if id(obj) not in self._deleted and self._dirty(obj, snapshot)
            ]
        order = _position
        deleted = self._deleted
        # A deleted object whose row a new object takes in this flush: the ORM turns the pair into an UPDATE.
        doomed = (
            {(table, _plan(obj).table_key(table, obj)): obj for obj in deleted.values() for table in _plan(obj).tables}
            if deleted
            else {}
        )
        switched: set[tuple[Table, Key]] = set()
        planned: list[tuple[int, int, Table, Key | None, Row]] = []
        for sequence, obj in enumerate(inserts):
            plan = _plan(obj)
            replaced = doomed.get((plan.table, plan.table_key(plan.table, obj))) if doomed else None
            if replaced is not None:
                self._check_version(_plan(replaced), replaced, self._loaded[id(replaced)][1], "UPDATE")
            if (
                replaced is not None
                and plan.version is not None
                and plan.version_generator is not False
                and obj.__dict__.get(plan.version) is None  # a version the program set is written, as an UPDATE's
            ):
                # The ORM's row switch is an UPDATE of the old row: its version counter goes on from there.
                setattr(obj, plan.version, plan.version_generator(self._loaded[id(replaced)][1].get(plan.version)))
            if plan.version is not None and (replaced is None or obj.__dict__.get(plan.version) is None):
                self._first_version(plan, obj)  # the ORM's INSERT writes the generator's first value, always
            values = obj.__dict__
            for table, columns in plan.columns:
                row = {
                    column_key: values.get(attribute) if attribute is not None else None
                    for column_key, attribute, _ in columns
                }
                key = plan.table_key(table, obj)
                if doomed and (table, key) in doomed:
                    switched.add((table, key))
                planned.append((order(table), sequence, table, key, row))
        depths = (
            _depths([(table, key, row) for _, _, table, key, row in planned if key is not None])
            if any(spec_of(table).self_referencing for _, _, table, _, _ in planned)
            else {}
        )
        # Per table, as the ORM saves a mapper's objects: the new ones in the order they were added, then
        # the changed ones in primary-key order. Each statement is a method and its arguments.
        statements: list[tuple[int, int, int, int, Callable[..., Any], tuple[Any, ...]]] = []
        for position, sequence, target, written_key, written in planned:
            if switched and written_key is not None and (target, written_key) in switched:
                statement: tuple[Callable[..., Any], tuple[Any, ...]] = (
                    overlay.update,
                    (target, written_key, written),
                )
            else:
                statement = (overlay.insert, (target, written))
            depth = depths.get((target, written_key or ()), 0) if depths else 0
            statements.append((position, 0, depth, sequence, *statement))
        if len(dirty) > 1:
            dirty.sort(key=_update_order)
        for sequence, (obj, snapshot) in enumerate(dirty):
            for position, function, arguments in self._updates(obj, snapshot, order):
                statements.append((position, 1, 0, sequence, function, arguments))
        if len(statements) > 1:
            statements.sort(key=_first_four)
        for *_, function, arguments in statements:
            function(*arguments)
        for adds, table, row in links:
            if adds:
                overlay.insert(table, row)
        for adds, table, row in links:
            if not adds:
                self._unlink(table, row)
        doomed_rows = []
        for obj in self._deleted.values():
            plan = _plan(obj)
            snapshot = self._loaded[id(obj)][1]
            if (plan.table, plan.table_key(plan.table, obj)) not in switched:
                self._check_version(plan, obj, snapshot, "DELETE")
            for table in plan.tables:
                key = plan.table_key(table, obj)
                if (table, key) not in switched:
                    current = overlay.row(table, key)
                    doomed_rows.append((table, key, current if current is not None else {}))
        depths = _depths(doomed_rows)
        deletions = sorted(
            (
                (-order(table), -depths.get((table, key), 0), sequence, table, key)
                for sequence, (table, key, _) in enumerate(doomed_rows)
            ),
            key=lambda item: item[:3],
        )
        for *_, table, key in deletions:
            overlay.delete(table, key)
        # The flush went through: the objects are what their rows hold now.
        self._flushed(inserts, dirty)
        for obj in self._deleted.values():
            plan = _plan(obj)
            if self._identity.get((plan.identity, plan.key_of(obj))) is obj:
                del self._identity[(plan.identity, plan.key_of(obj))]
            self._gone[(plan.identity, plan.key_of(obj))] = self._loaded.pop(id(obj))
        self._pending.clear()
        self._deleted.clear()
        self._commit_states()

    def _all_simple(self) -> bool:
        """Whether every object this flush could write has a simple plan (see :attr:`_Plan.simple`)."""
        plans = _class_plans
        for obj in self._pending.values():
            plan = plans.get(type(obj)) or _plan_of_class(type(obj))
            if not plan.simple:
                return False
        for obj, _ in self._loaded.values():
            plan = plans.get(type(obj)) or _plan_of_class(type(obj))
            if not plan.simple:
                return False
        return True

    def _flush_simple(self) -> None:
        """:meth:`_flush` when nothing is deleted and every object pending or loaded has a simple plan.

        It is the general flush with the steps that then do nothing left out:
        with no relationships there is nothing to cascade, synchronize or link,
        so the new objects are the pending ones and no collection changed; with
        no deletions there is no row switch and nothing to delete; with one
        table that does not refer to itself per object, no version counter and
        no discriminator, each new object is one INSERT and each changed one at
        most one UPDATE. The statements run in the general flush's order.
        """
        loaded = self._loaded
        pending = self._pending
        inserts = [obj for ident, obj in pending.items() if ident not in loaded] if pending else []
        changed = 0 if self._watched is None else self._changed_since_watch()
        if changed and self.check_write is not None:
            self.check_write(f"{len(inserts)} new, {changed} changed and 0 deleted objects")
        dirty: list[tuple[Any, dict[str, Any]]] = []
        for obj, snapshot in loaded.values():  # :meth:`_dirty`, inline: it runs for every loaded object
            values = obj.__dict__
            for name, value in snapshot.items():
                if name in values and values[name] != value:
                    dirty.append((obj, snapshot))
                    break
        if not inserts and not dirty:
            return  # nothing changed
        if self.check_write is not None:
            self.check_write(f"{len(inserts)} new, {len(dirty)} changed and 0 deleted objects")
        overlay = self._overlay
        order = _position
        statements: list[tuple[int, int, int, Callable[..., Any], tuple[Any, ...]]] = []
        for sequence, obj in enumerate(inserts):
            plan = _plan(obj)
            values = obj.__dict__
            self._key_new(plan, obj, values)
            if plan.defaults:
                _apply_defaults(plan, obj)
            ((table, columns),) = plan.columns
            row = {
                column_key: values.get(attribute) if attribute is not None else None
                for column_key, attribute, _ in columns
            }
            statements.append((order(table), 0, sequence, overlay.insert, (table, row)))
        if len(dirty) > 1:
            dirty.sort(key=_update_order)
        update = self._update
        for sequence, (obj, snapshot) in enumerate(dirty):
            # :meth:`_updates` for a simple plan: one table, no version counter.
            plan = _plan(obj)
            values = obj.__dict__
            ((table, columns),) = plan.columns
            changes = {
                column_key: values[attribute]
                for column_key, attribute, _ in columns
                if attribute is not None
                and attribute in values
                and values[attribute] != snapshot.get(attribute, _MISSING)
            }
            if changes:
                key = _picked(snapshot, plan.key_attributes[table])
                statements.append((order(table), 1, sequence, update, (table, key, changes)))
        if len(statements) > 1:
            statements.sort(key=_first_three)
        for statement in statements:
            statement[3](*statement[4])
        self._flushed(inserts, dirty)
        self._pending.clear()
        self._commit_states()

    def _flushed(self, inserts: list[Any], dirty: list[tuple[Any, dict[str, Any]]]) -> None:
        """After a flush went through: the new and the changed objects are what their rows hold now."""
        counts = self.flushed_counts
        if counts is not None:
            for obj in (*inserts, *(obj for obj, _ in dirty), *self._deleted.values()):
                name = type(obj).__name__
                counts[name] = counts.get(name, 0) + 1
        for obj in inserts:
            plan = _plan(obj)
            self._pending.pop(id(obj), None)
            self._remember(plan, obj)
            if plan.relationships:
                self._install_loaders(obj, plan)
            self._inserted_ids.add(id(obj))
        for obj, snapshot in dirty:
            plan = _plan(obj)
            old_key = _picked(snapshot, plan.primary_key)
            new_key = plan.key_of(obj)
            if old_key != new_key:  # the primary key changed: the identity map follows the row
                if self._identity.get((plan.identity, old_key)) is obj:
                    del self._identity[(plan.identity, old_key)]
                self._identity[(plan.identity, new_key)] = obj
            values = obj.__dict__
            self._loaded[id(obj)] = (obj, {name: values.get(name, old) for name, old in snapshot.items()})

    def _commit_states(self) -> None:
        """The ORM's record of changed attributes starts again from what the flush wrote."""
        for obj, _ in self._loaded.values():
            state = instance_state(obj)
            if state.modified:
                state._commit_all(obj.__dict__)

    def _updates(
        self, obj: Any, snapshot: dict[str, Any], order: Callable[[Table], int]
    ) -> Iterable[tuple[int, Callable[..., Any], tuple[Any, ...]]]:
        plan = _plan(obj)
        values = obj.__dict__
        self._check_version(plan, obj, snapshot, "UPDATE")
        if (
            plan.version is not None
            and plan.version_generator is not False
            and values.get(plan.version) == snapshot.get(plan.version)  # a version set by the program is written
        ):
            setattr(obj, plan.version, plan.version_generator(snapshot.get(plan.version)))
        for table, columns in plan.columns:
            # Only the columns this transaction changed, as an UPDATE's SET clause names them.
            row = {
                column_key: values.get(attribute)
                for column_key, attribute, _ in columns
                if attribute is not None
                and attribute in values
                and values[attribute] != snapshot.get(attribute, _MISSING)
            }
            if not row:
                continue
            key = _picked(snapshot, plan.key_attributes[table])
            yield order(table), self._update, (table, key, row)

    def _update(self, table: Table, key: Key, row: Row) -> None:
        """UPDATE the columns in *row* of the row with *key*, which must still be there."""
        current = self._overlay.row(table, key)
        if current is None:
            msg = f"UPDATE statement on table '{spec_of(table).name}' expected to update 1 row(s); 0 were matched."
            raise orm_exc.StaleDataError(msg)
        merged = dict(current)
        merged.update(row)
        self._overlay.update(table, key, merged)

    def _check_version(self, plan: _Plan, obj: Any, snapshot: dict[str, Any], verb: str) -> None:
        """Raise StaleDataError if *obj*'s row changed since it was loaded, as the version counter's WHERE would."""
        if plan.version is None:
            return
        table = plan.tables[0]
        current = self._overlay.row(table, _picked(snapshot, plan.primary_key))
        loaded = snapshot.get(plan.version)
        if current is None or current.get(plan.version_column) != loaded:
            name = spec_of(table).name
            if verb == "DELETE":
                msg = f"DELETE statement on table '{name}' expected to delete 1 row(s); Only 0 were matched."
            else:
                msg = f"UPDATE statement on table '{name}' expected to update 1 row(s); 0 were matched."
            raise orm_exc.StaleDataError(msg)

    def _first_version(self, plan: _Plan, obj: Any) -> None:
        if plan.version_generator is not False and plan.version is not None:
            setattr(obj, plan.version, plan.version_generator(None))

    @staticmethod
    def _set_identity(plan: _Plan, obj: Any) -> None:
        mapper = plan.mapper
        if mapper.polymorphic_on is not None and mapper.polymorphic_identity is not None:
            attribute = _attribute_of(mapper, mapper.polymorphic_on)
            if attribute is not None and obj.__dict__.get(attribute) is None:
                obj.__dict__[attribute] = mapper.polymorphic_identity

    @staticmethod
    def _rows_of(plan: _Plan, values: dict[str, Any]) -> Iterable[tuple[Table, Row]]:
        for table, columns in plan.columns:
            yield (
                table,
                {
                    column_key: values.get(attribute) if attribute is not None else None
                    for column_key, attribute, _ in columns
                },
            )

    def _dirty(self, obj: Any, snapshot: dict[str, Any]) -> bool:
        values = obj.__dict__
        return any(name in values and values[name] != value for name, value in snapshot.items())

    @staticmethod
    def _links_changed(obj: Any) -> bool:
        """Whether a relationship of *obj* changed since the last flush: a collection or a reference."""
        if not instance_state(obj).modified:
            return False
        values = obj.__dict__
        return any(
            rel.key in values and get_history(obj, rel.key, passive=PASSIVE_NO_INITIALIZE).has_changes()
            for rel in _plan(obj).relationships
        )

    def _remember(self, plan: _Plan, obj: Any) -> None:
        values = obj.__dict__
        key = _picked(values, plan.primary_key)
        self._identity[(plan.identity, key)] = obj
        self._loaded[id(obj)] = (obj, {name: values.get(name) for name in plan.column_keys})  # _columns()
        # Persistent, as the ORM marks a loaded or flushed object: its parents are then known to be
        # there until a collection or a reference lets go of it, which makes it an orphan.
        instance_state(obj).key = (plan.identity.class_, key, None)

    def _identity_target(self, obj: Any, rel: Any) -> Any:
        """The object a many-to-one of *obj* refers to, if it is in the identity map; None otherwise."""
        target = plan_of(rel.mapper)
        wanted = {remote.key: _get_column(obj, local) for remote, local in rel.synchronize_pairs}
        if tuple(column.key for column in target.pk_columns) != tuple(wanted):
            return None
        found = self._identity.get((target.identity, tuple(wanted.values())))
        return None if found is None or id(found) in self._deleted else found

    # -- cascades and relationships ------------------------------------------

    def _cascade_new(self) -> list[Any]:
        """Pending objects, plus new objects reachable from any object of the session."""
        found: dict[int, Any] = {}
        loaded = self._loaded
        deleted = self._deleted
        roots = [*self._pending.values(), *(obj for obj, _ in loaded.values())]
        for root in roots:
            key = id(root)
            if key in deleted:
                continue
            if key not in loaded:
                found.setdefault(key, root)
            if not _plan(root).relationships:
                continue
            state = instance_state(root)
            for related, *_ in state.mapper.cascade_iterator("save-update", state):
                if id(related) not in loaded and id(related) not in deleted:
                    found.setdefault(id(related), related)
        return list(found.values())

    def _cascade_deletes(self) -> None:
        """Add to the deletions what the ``delete`` and ``delete-orphan`` cascades reach."""
        if not self._deleted and not any(_plan(obj).cascades for obj, _ in self._loaded.values()):
            return
        queue = list(self._deleted.values())
        while queue:
            obj = queue.pop()
            for rel in _plan(obj).relationships:
                if not rel.cascade.delete:
                    continue
                for child in _members(getattr(obj, rel.key)):  # loads it, as the ORM does
                    if id(child) in self._loaded and id(child) not in self._deleted:
                        self._deleted[id(child)] = child
                        queue.append(child)
                    elif id(child) in self._pending:
                        del self._pending[id(child)]
        for obj, _ in list(self._loaded.values()):
            if id(obj) in self._deleted:
                continue
            if _plan(obj).orphanable and _mapper(obj)._is_orphan(instance_state(obj)):
                self._deleted[id(obj)] = obj  # no parent holds it any more: the delete-orphan cascade
                queue.append(obj)
                continue
            for rel in _plan(obj).relationships:
                if rel.direction is not _ONETOMANY or not rel.cascade.delete_orphan or rel.key not in obj.__dict__:
                    continue
                history = get_history(obj, rel.key, passive=PASSIVE_NO_INITIALIZE)
                for child in history.deleted or ():
                    if (
                        id(child) in self._loaded
                        and id(child) not in self._deleted
                        and _mapper(child)._is_orphan(instance_state(child))  # not moved to another parent
                    ):
                        self._deleted[id(child)] = child
                        queue.append(child)
        if queue:
            self._cascade_deletes()

    def _synchronize(self, obj: Any, links: list[tuple[bool, Table, Row]]) -> None:
        """Copy keys along *obj*'s changed relationships into foreign keys, as the ORM's flush does."""
        values = obj.__dict__
        for rel in _plan(obj).relationships:
            if rel.key not in values or rel.viewonly:
                continue
            history = get_history(obj, rel.key, passive=PASSIVE_NO_INITIALIZE)
            if not history.has_changes() and id(obj) in self._loaded:
                continue
            direction = rel.direction
            if direction is _MANYTOONE:
                # As the ORM's many-to-one dependency: an added target (or None) sets (or clears) the key;
                # a removed one with nothing added clears it.
                if history.added:
                    target = history.added[-1]
                    for remote, local in rel.synchronize_pairs:
                        _set_column(obj, local, None if target is None else _get_column(target, remote))
                elif history.deleted:
                    for _, local in rel.synchronize_pairs:
                        _set_column(obj, local, None)
            elif direction is _ONETOMANY:
                added = history.added or () if id(obj) in self._loaded else _members(values[rel.key])
                for child in added:
                    for parent_column, child_column in rel.synchronize_pairs:
                        _set_column(child, child_column, _get_column(obj, parent_column))
                for child in history.deleted or ():
                    if id(child) in self._deleted or rel.cascade.delete_orphan:
                        continue
                    if _members_contain(values[rel.key], child):
                        continue
                    for _, child_column in rel.synchronize_pairs:
                        if not child_column.primary_key:
                            _set_column(child, child_column, None)
            elif direction is _MANYTOMANY:
                secondary = rel.secondary
                if not isinstance(secondary, Table):
                    continue
                added = history.added or () if id(obj) in self._loaded else _members(values[rel.key])
                for adds, members in ((True, added), (False, history.deleted or ())):
                    for target in members:
                        row = {column.key: None for column in secondary.columns}
                        for parent_column, column in rel.synchronize_pairs:
                            row[column.key] = _get_column(obj, parent_column)
                        for target_column, column in rel.secondary_synchronize_pairs or ():
                            row[column.key] = _get_column(target, target_column)
                        pair = (adds, secondary, frozenset((id(obj), id(target))))
                        if self._links_seen.setdefault(pair, rel) is not rel:
                            continue  # the other side of a back_populates pair reported this link already
                        links.append((adds, secondary, row))

    def _release_children(self, obj: Any) -> None:
        """A parent is deleted: its children not deleted with it lose their foreign key, as the ORM does."""
        for rel in _plan(obj).relationships:
            if rel.viewonly or rel.passive_deletes:
                continue
            if rel.direction is _ONETOMANY and not rel.cascade.delete:
                for child in _members(getattr(obj, rel.key)):
                    if id(child) in self._deleted:
                        continue
                    for _, child_column in rel.synchronize_pairs:
                        _set_column(child, child_column, None)
            elif rel.direction is _MANYTOMANY and isinstance(rel.secondary, Table):
                secondary = rel.secondary
                for target in _members(getattr(obj, rel.key)):
                    row = {column.key: None for column in secondary.columns}
                    for parent_column, column in rel.synchronize_pairs:
                        row[column.key] = _get_column(obj, parent_column)
                    for target_column, column in rel.secondary_synchronize_pairs or ():
                        row[column.key] = _get_column(target, target_column)
                    self._unlink(secondary, row)

    def _unlink(self, table: Table, row: Row) -> None:
        """DELETE the association row that links what *row* names, whatever its own key."""
        match = {name: value for name, value in row.items() if value is not None}
        found = self._overlay.find(table, match)[:1]
        if not found:
            msg = f"DELETE statement on table '{spec_of(table).name}' expected to delete 1 row(s); Only 0 were matched."
            raise orm_exc.StaleDataError(msg)
        for key, _ in found:
            self._overlay.delete(table, key)

    def _install_loaders(self, obj: Any, plan: _Plan) -> None:
        if not plan.relationships:
            return
        state = instance_state(obj)
        if type(state.callables) is not dict:
            state.callables = dict(state.callables)
        values = obj.__dict__
        for rel in plan.relationships:
            key = rel.key
            if key in values:
                continue
            lazy = rel.lazy
            if lazy in _EAGER:
                set_committed_value(obj, key, self._related(obj, rel))
            elif lazy == "noload":
                set_committed_value(obj, key, [] if rel.uselist else None)
            elif lazy in ("raise", "raise_on_sql"):
                state.callables[key] = _raiser(rel)
            else:
                state.callables[key] = _Loader(self, rel)

    def _related(self, obj: Any, rel: Any) -> Any:
        """What relationship *rel* of *obj* holds, from the rows: an object, None, or a list."""
        target = plan_of(rel.mapper)
        values = obj.__dict__
        if rel.direction is _MANYTOONE:
            wanted = {}
            for remote, local in rel.synchronize_pairs:
                wanted[remote.key] = _get_column(obj, local)
            if any(value is None for value in wanted.values()):
                return None
            if tuple(column.key for column in target.pk_columns) == tuple(wanted):
                return self.get(rel.mapper.class_, _as_key(tuple(wanted.values())))
            found = self._select(
                rel.mapper, {_attribute_of(rel.mapper, target.table.c[k]) or k: v for k, v in wanted.items()}
            )
            return found[0] if found else None
        if rel.direction is _ONETOMANY:
            filters: dict[str, Any] = {}
            for parent_column, child_column in rel.synchronize_pairs:
                attribute = _attribute_of(rel.mapper, child_column)
                if attribute is None:
                    return []
                filters[attribute] = _get_column(obj, parent_column)
            if any(value is None for value in filters.values()):
                return []
            members = self._select(rel.mapper, filters)
        else:
            secondary = rel.secondary
            if not isinstance(secondary, Table):
                return []
            wanted_links = {column.key: _get_column(obj, parent) for parent, column in rel.synchronize_pairs}
            targets = []
            pairs = rel.secondary_synchronize_pairs or ()
            for _, row in self._overlay.find(secondary, wanted_links):
                key = tuple(
                    row[column.key]
                    for target_column in target.pk_columns
                    for other, column in pairs
                    if other is target_column
                )
                member = self.get(rel.mapper.class_, _as_key(key))
                if member is not None:
                    targets.append(member)
            members = targets
        del values
        order_by = rel.order_by
        if order_by:
            attributes = [_attribute_of(rel.mapper, column) for column in order_by]
            members.sort(key=lambda member: tuple(_sortable(member.__dict__.get(a)) for a in attributes if a))
        return members

    # -- queries -------------------------------------------------------------

    def get(self, model: type[Any], key: Any, lock: str | None = None) -> Any:
        """The object of *model* with primary key *key*: from the identity map, or loaded after a flush.

        With *lock*, its row is locked first, as ``SELECT ... FOR UPDATE`` does.
        """
        self._check_usable()
        plan = _class_plans.get(model) or _plan_of_class(model)
        pk_columns = plan.pk_columns
        if len(pk_columns) == 1:  # the usual key, built without a generator
            parts: Key = (coerce(pk_columns[0], key),)
        else:
            parts = key if isinstance(key, tuple) else (key,)
            parts = tuple(coerce(column, part) for column, part in zip(pk_columns, parts, strict=False))
        if lock is not None:
            self.flush()
            if self._overlay.row(plan_of(plan.base).table, parts) is not None and not self._lock(plan, parts, lock):
                return None  # SKIP LOCKED: another transaction holds the row
        obj = self._identity.get((plan.identity, parts))
        if obj is None or id(obj) in self._expired:  # an expired object is queried again, after the autoflush
            self.flush()
            obj = self._identity.get((plan.identity, parts))
            if obj is None:
                obj = self._load(plan, parts)
            elif id(obj) in self._expired:
                try:
                    self._unexpire(obj)
                except orm_exc.ObjectDeletedError:
                    return None  # its row is gone: get() finds nothing, as its query would
        if obj is None or id(obj) in self._deleted or not isinstance(obj, model):
            return None
        return obj

    def _load(self, plan: _Plan, key: Key, row: Row | None = None) -> Any:
        """Build the object whose base row has *key*, as the ORM loads it; None if there is no row."""
        base = plan_of(plan.base)
        if row is None:
            row = self._overlay.row(base.table, key)
            if row is None:
                return None
        actual = base
        if base.polymorphic_on is not None:
            mapper = base.mapper.polymorphic_map.get(row.get(base.polymorphic_on))
            if mapper is not None:
                actual = plan_of(mapper)
        elif plan is not base:
            # No discriminator: a subclass's query joins its own tables, and finds the rows that are there.
            if any(self._overlay.row(table, key) is None for table in plan.tables[1:]):
                return None
            actual = plan
        obj = actual.mapper.class_manager.new_instance()
        values = obj.__dict__
        for table, columns in actual.columns:
            table_row = row if table is base.table else self._overlay.row(table, key)
            if table_row is None:
                continue
            for column_key, attribute, _ in columns:
                if attribute is not None and attribute not in values:
                    values[attribute] = table_row.get(column_key)
        self._remember(actual, obj)
        self._install_loaders(obj, actual)
        state = instance_state(obj)
        load = state.manager.dispatch.load
        if load:  # the "load" event, and @reconstructor methods; false when nothing listens
            load(state, None)
        return obj

    def _matching(
        self, plan: _Plan, filters: dict[str, Any], where: Sequence[Any], order: Sequence[Order]
    ) -> tuple[builtins.list[tuple[Key, Row]], builtins.list[tuple[str, Any]]]:
        """The base-table rows of *plan*'s class that *filters* (on base-table columns) and *where* select, in
        *order*; and the filters on the columns of other tables, which the objects are checked against."""
        base = plan_of(plan.base)
        table_filters: list[tuple[str, Any]] = []
        later: list[tuple[str, Any]] = []
        for name, value in filters.items():
            column = plan.fields[name]
            converted = coerce(column, value)
            if column.table is base.table:
                table_filters.append((column.key, converted))
            else:
                later.append((name, converted))
        # A subclass of a hierarchy reads only the rows of its own identities, as its query's WHERE does.
        discriminator = plan.polymorphic_on if plan.mapper is not plan.base else None
        keys = []
        for key, row in self._overlay.rows(base.table):
            if discriminator is not None and row.get(discriminator) not in plan.identities:
                continue
            if all(row.get(name) == value for name, value in table_filters):
                keys.append((key, row))
        if where or order:
            rows = self._joined_rows(plan, keys)
            if where:
                matches = matcher(frozenset(plan.mapper.tables), where)
                keys = [item for item in keys if matches(rows[item[0]])]
            sort_rows(keys, order, lambda item: rows[item[0]])
        else:
            keys.sort(key=lambda item: _sort_key(item[0]))
        return keys, later

    def _select(
        self,
        model: Any,
        filters: dict[str, Any],
        where: Sequence[Any] = (),
        order: Sequence[Order] = (),
    ) -> builtins.list[Any]:
        """Objects of *model* whose attributes equal *filters*, converted by column type, for which every
        *where* clause holds, in *order* (primary-key order if none is given)."""
        mapper = _mapper(model) if not isinstance(model, Mapper) else model
        plan = plan_of(mapper)
        base = plan_of(plan.base)
        keys, later = self._matching(plan, filters, where, order)
        found = []
        for key, row in keys:
            obj = self._identity.get((plan.identity, key))
            if obj is None:
                obj = self._load(plan if base.polymorphic_on is None else base, key, row)
            elif id(obj) in self._expired:
                self._unexpire(obj)  # a query's rows refresh the expired objects it returns
            if obj is None or id(obj) in self._deleted or not isinstance(obj, mapper.class_):
                continue
            if later and not all(obj.__dict__.get(name) == value for name, value in later):
                continue
            found.append(obj)
        return found

    def _joined_rows(self, plan: _Plan, keys: Sequence[tuple[Key, Row]]) -> dict[Key, Row]:
        """The row of each base-table key, merged with its rows in the other tables of *plan*'s class."""
        others = [table for table, _ in plan.columns if table is not plan_of(plan.base).table]
        if not others:
            return dict(keys)
        merged: dict[Key, Row] = {}
        for key, row in keys:
            joined = dict(row)
            for table in others:
                joined.update(self._overlay.row(table, key) or {})
            merged[key] = joined
        return merged

    def _lock(self, plan: _Plan, key: Key, mode: str) -> bool:
        """Lock the row of *plan*'s object with *key* and record it; False if SKIP LOCKED leaves it out."""
        if not self._overlay.lock(plan_of(plan.base).table, key, mode):
            return False
        self.locked[(plan.mapper.class_, _as_key(key))] = mode
        return True

    def query(self, model: type[Any], query: Query) -> builtins.list[Any]:
        """What a SELECT of *model* with *query* returns, after the autoflush."""
        self.flush()
        found = self._select(model, query.filters, query.conditions, query.order)
        if query.lock is not None:
            mode = query.lock
            found = [obj for obj in found if self._lock(_plan(obj), _plan(obj).key_of(obj), mode)]
        if query.limit is None:
            return found[query.offset :]
        return found[query.offset : query.offset + query.limit]


class _Shadow:
    """A stand-in object for a bulk INSERT: the values of an object, without touching it."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


class _Loader:
    """Loads one relationship of one object when it is first read, while its block runs."""

    __slots__ = ("rel", "session")

    def __init__(self, session: InMemorySession, rel: Any) -> None:
        self.session = session
        self.rel = rel

    def __call__(self, state: Any, passive: Any) -> Any:
        session = self.session
        obj = state.obj()
        if not passive & SQL_OK:
            # As the ORM's many-to-one loader by primary key: the identity map answers without a query.
            if passive & RELATED_OBJECT_OK and session.open and self.rel.direction is _MANYTOONE:
                found = session._identity_target(obj, self.rel)
                if found is not None:
                    return found
            return PASSIVE_NO_RESULT
        if not session.open:
            raise _detached(obj, self.rel.key)
        session._check_usable()  # a failed flush leaves nothing to load from until the rollback
        if not session._flushing:
            session.flush()  # autoflush, as a lazy load's query does
        session._unexpire(obj)
        return session._related(obj, self.rel)


class _Refresher:
    """Reloads the columns of an expired object when one is first read, while its block runs."""

    __slots__ = ("name", "session")

    def __init__(self, session: InMemorySession, name: str) -> None:
        self.session = session
        self.name = name

    def __call__(self, state: Any, passive: Any) -> Any:
        if not passive & SQL_OK:
            return PASSIVE_NO_RESULT
        session = self.session
        obj = state.obj()
        if not session.open:
            msg = (
                f"Instance {instance_str(obj)} is not bound to a Session; attribute refresh operation cannot "
                "proceed: it was expired by a rollback in a unit of work block that has ended. Load it again "
                "in a block"
            )
            raise orm_exc.DetachedInstanceError(msg)
        session._check_usable()
        if not session._flushing:
            session.flush()  # autoflush, as the refresh's query does
        session._unexpire(obj)
        return obj.__dict__.get(self.name)


def _raiser(rel: Any) -> Callable[[Any, Any], Any]:
    def refuse(state: Any, passive: Any) -> Any:
        if not passive & SQL_OK:
            return PASSIVE_NO_RESULT
        msg = f"'{rel.parent.class_.__name__}.{rel.key}' is not available due to lazy='{rel.lazy}'"
        raise sa_exc.InvalidRequestError(msg)

    return refuse


_positions: dict[MetaData, tuple[int, dict[Table, int]]] = {}

#: The sort keys of a flush's statements: the items before the method and its arguments.
_first_three = operator.itemgetter(0, 1, 2)
_first_four = operator.itemgetter(0, 1, 2, 3)


#: The tables that refer to themselves through a relationship of a class mapped to them: the ORM sorts the
#: rows of such a table by their dependencies. Without the relationship, it writes them in the order they
#: were added, and the database refuses a child written before its parent.
_SELF_ORDERED: set[Table] = set()


def _update_order(item: tuple[Any, dict[str, Any]]) -> tuple[Any, ...]:
    """Where a changed object's UPDATE goes, as the ORM orders them: by its table's place, then by primary key."""
    obj, snapshot = item
    plan = _plan(obj)
    return (_position(plan.table), _sort_key(tuple(snapshot.get(name) for name in plan.primary_key)))


def _depths(rows: Iterable[tuple[Table, Key, Row]]) -> dict[tuple[Table, Key], int]:
    """For rows of tables that refer to themselves: how many of the other *rows* each one hangs below.

    Parents are written before their children and deleted after them, as the
    ORM sorts the rows of a self-referential table, when a relationship of
    its class says how they depend on each other.
    """
    by_table: dict[Table, dict[Key, Row]] = {}
    for table, key, row in rows:
        if spec_of(table).self_referencing and table in _SELF_ORDERED:
            by_table.setdefault(table, {})[key] = row
    depths: dict[tuple[Table, Key], int] = {}
    for table, batch in by_table.items():
        spec = spec_of(table)
        own = [fk for fk in spec.foreign_keys if fk.target is table and fk.target_columns == spec.primary_key]
        if not own or len(batch) < 2:
            continue
        for key in batch:
            depth, current, seen = 0, key, {key}
            while True:
                row = batch[current]
                parent = next(
                    (
                        values
                        for values in (tuple(row.get(name) for name in fk.columns) for fk in own)
                        if values in batch and values not in seen
                    ),
                    None,
                )
                if parent is None:
                    break
                depth += 1
                seen.add(parent)
                current = parent
            depths[(table, key)] = depth
    return depths


def _position(table: Table) -> int:
    """The position of *table* in its metadata's dependency order: parents before the tables that refer to them.

    Read again whenever the metadata has gained tables, so that every
    position comes from one sort.
    """
    metadata = table.metadata
    known = _positions.get(metadata)
    if known is None or known[0] != len(metadata.tables):
        known = _positions[metadata] = (
            len(metadata.tables),
            {each: position for position, each in enumerate(metadata.sorted_tables)},
        )
    return known[1].get(table, 0)


def _get_column(obj: Any, column: Any) -> Any:
    mapper = _mapper(obj)
    attribute = _attribute_of(mapper, column)
    if attribute is None:
        return None
    return obj.__dict__.get(attribute)


def _set_column(obj: Any, column: Any, value: Any) -> None:
    mapper = _mapper(obj)
    attribute = _attribute_of(mapper, column)
    if attribute is not None and obj.__dict__.get(attribute, _MISSING) != value:
        setattr(obj, attribute, value)


def _members(value: Any) -> builtins.list[Any]:
    if value is None:
        return []
    if isinstance(value, dict):
        return builtins.list(value.values())
    if isinstance(value, list | set | tuple | frozenset):
        return builtins.list(value)
    if hasattr(value, "__dict__") and "_sa_instance_state" in value.__dict__:
        return [value]
    return builtins.list(value)


def _members_contain(collection: Any, member: Any) -> bool:
    return any(each is member for each in _members(collection))


def _as_key(parts: Key) -> Any:
    return parts[0] if len(parts) == 1 else parts


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, 0) if value is None else (1, value)


def _columns(plan: _Plan, obj: Any) -> dict[str, Any]:
    values = obj.__dict__
    return {name: values.get(name) for name in plan.column_keys}


def _sort_key(key: Key) -> tuple[Any, ...]:
    return tuple(_sortable(part) for part in key)


class _Savepoint:
    __slots__ = ("identity", "inserted", "loaded", "mark", "session", "states")

    def __init__(
        self,
        *,
        session: InMemorySession,
        mark: Any,
        states: dict[int, tuple[Any, dict[str, Any]]],
        identity: dict[tuple[Mapper[Any], Key], Any],
        loaded: dict[int, tuple[Any, dict[str, Any]]],
        inserted: set[int],
    ) -> None:
        self.inserted = inserted
        self.session = session
        self.mark = mark
        self.states = states
        self.identity = identity
        self.loaded = loaded


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


def _check_modelled(plan: _Plan, unenforced: frozenset[str]) -> None:
    """Refuse a model that declares what the fake cannot model, unless the unit of work was told to leave it out."""
    if not plan.refused and not plan.unmodelled:
        return
    missing = [described for name, described in plan.unmodelled.items() if name not in unenforced]
    name = plan.mapper.class_.__name__
    if plan.refused:
        msg = f"the fake cannot model {'; '.join(plan.refused)}"
        raise ConfigurationError(msg)
    if missing:
        names = ", ".join(repr(each) for each in plan.unmodelled if each not in unenforced)
        msg = (
            f"the fake cannot model what {name} declares: {'; '.join(missing)}. A test on the fake would "
            f"pass where the database may refuse or compute something. Test this against a database, or "
            f"build the fake with unenforced={{{names}}} to leave it out knowingly"
        )
        raise ConfigurationError(msg)


class _InMemoryBase(_RepositoryBase[T]):
    """What the sync and async in-memory repositories share: their session."""

    def __init__(self, session: InMemorySession, model: type[T]) -> None:
        super().__init__(model)
        self._session = session
        plan = _class_plans.get(model) or _plan_of_class(model)
        if plan.refused or plan.unmodelled:
            _check_modelled(plan, session._database.store.unenforced)

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

    def _get(self, key: Any, lock: str | None) -> T | None:
        found: T | None = self._store.get(self.model, key, lock)
        return found

    def _list(self, query: Query) -> Sequence[T]:
        return self._store.query(self.model, query)

    def _count(self, query: Query) -> int:
        return len(self._store.query(self.model, query))

    def _exists(self, query: Query) -> bool:
        return bool(self._store.query(self.model, query))

    def _upsert(self, upsert: Upsert, *, update: bool) -> tuple[T, bool]:
        found, created = self._store.upsert(self.model, upsert, update=update)
        return found, created

    def _update(self, query: Query, changes: dict[str, Any], version: str | None) -> int:
        return self._store.bulk_update(self.model, query, changes, version)

    def _delete(self, query: Query) -> int:
        return self._store.bulk_delete(self.model, query)

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

    async def _get(self, key: Any, lock: str | None) -> T | None:
        found: T | None = self._store.get(self.model, key, lock)
        return found

    async def _list(self, query: Query) -> Sequence[T]:
        return self._store.query(self.model, query)

    async def _count(self, query: Query) -> int:
        return len(self._store.query(self.model, query))

    async def _exists(self, query: Query) -> bool:
        return bool(self._store.query(self.model, query))

    async def _upsert(self, upsert: Upsert, *, update: bool) -> tuple[T, bool]:
        found, created = self._store.upsert(self.model, upsert, update=update)
        return found, created

    async def _update(self, query: Query, changes: dict[str, Any], version: str | None) -> int:
        return self._store.bulk_update(self.model, query, changes, version)

    async def _delete(self, query: Query) -> int:
        return self._store.bulk_delete(self.model, query)

    async def _remove(self, obj: T) -> None:
        self._store.delete(obj)
