"""Writes by statement: upserts, and updates and deletes of the rows a query selects.

:func:`build_upsert` checks an upsert once, in the public method that every
implementation shares:

* the model is mapped to one table (an upsert is one statement on one table);
* the values are those of an instance of the model, or a mapping of its
  column attributes;
* ``on`` names the attributes of the primary key or of one UNIQUE constraint
  or unique index, as ``ON CONFLICT (...)`` needs on PostgreSQL and SQLite;
* a version counter is SQLAlchemy's default integer one, which SQL can count
  on (``version + 1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from sqlalchemy import Column, Integer, Table

from ._model import ModelInfo
from ._rows import spec_of
from .errors import QueryError

__all__ = ["Upsert", "build_changes", "build_upsert", "single_table"]


@attrs.frozen
class Upsert:
    """A checked upsert: the row to insert, by column key, and what a conflict changes."""

    table: Table
    #: The values given, by column key.
    row: dict[str, Any]
    #: The columns of the unique key the conflict is on.
    on: tuple[str, ...]
    #: The columns a conflict sets to the given values: every given one outside ``on``.
    changes: tuple[str, ...]
    #: The version counter's column key, if the model has one.
    version: str | None

    @property
    def insert_row(self) -> dict[str, Any]:
        """The row an INSERT writes: the values given, and a version counter's first value."""
        return self.row if self.version is None else {**self.row, self.version: 1}


def build_upsert(info: ModelInfo, what: str, obj_or_values: Any, on: Sequence[str] | None) -> Upsert:
    """Check an upsert of *info*'s model; raise :class:`~uow.errors.QueryError` naming what is wrong."""
    model = info.model
    mapper = info.mapper
    name = model.__name__
    table = single_table(info, what)
    attributes = _attributes(info)
    if isinstance(obj_or_values, Mapping):
        unknown = sorted(set(obj_or_values) - set(attributes))
        if unknown:
            msg = f"{what}() of {name} got {', '.join(map(repr, unknown))}, which are not its column attributes"
            raise QueryError(msg)
        given = dict(obj_or_values)
    elif isinstance(obj_or_values, model):
        values = obj_or_values.__dict__
        given = {attribute: values[attribute] for attribute in attributes if attribute in values}
    else:
        msg = f"{what}() takes a {name} or a dict of its column attributes, not {type(obj_or_values).__name__}"
        raise QueryError(msg)
    row = {attributes[attribute].key: value for attribute, value in given.items()}
    keys = tuple(info.primary_key) if on is None else tuple(on)
    if isinstance(on, str) or not keys or any(key not in attributes for key in keys):
        msg = f"on= takes the names of {name}'s attributes that hold a unique key, as a tuple; got {on!r}"
        raise QueryError(msg)
    on_columns = tuple(attributes[key].key for key in keys)
    missing = [key for key, column in zip(keys, on_columns, strict=True) if row.get(column) is None]
    if missing:
        msg = f"{what}() of {name} needs a value for each attribute of on=: {', '.join(missing)} has none"
        raise QueryError(msg)
    spec = spec_of(table)
    unique_keys = [spec.primary_key, *(columns for _, columns in spec.uniques)]
    if not any(set(columns) == set(on_columns) for columns in unique_keys):
        shown = "; ".join(", ".join(columns) for columns in unique_keys)
        msg = (
            f"on={keys!r} is not a unique key of {table.name}: a conflict can only be on the primary key or a "
            f"UNIQUE constraint or unique index, here ({shown})"
        )
        raise QueryError(msg)
    version: str | None = None
    if mapper.version_id_col is not None:
        version = _check_counter(mapper, name, what)
        row.pop(version, None)
    changes = tuple(column for column in row if column not in on_columns)
    return Upsert(table, row, on_columns, changes, version)


def single_table(info: ModelInfo, what: str) -> Table:
    """The one table *info*'s model is mapped to; QueryError for a model mapped to several (joined inheritance)."""
    tables = [table for table in info.mapper.tables if isinstance(table, Table)]
    if len(tables) != 1:
        msg = (
            f"{what}() writes one table, and {info.model.__name__} is mapped to {len(tables)}: load the objects, "
            "change them and commit, or write this in a custom repository method"
        )
        raise QueryError(msg)
    return tables[0]


def build_changes(info: ModelInfo, values: Any) -> tuple[Table, dict[str, Any], str | None]:
    """Check the SET of a bulk update: the table, the values by column key, and the version counter to move.

    A value is a Python value or a SQL expression on the model's columns
    (``Batch.qty - 1``); the primary key is not changed this way.
    """
    table = single_table(info, "update")
    name = info.model.__name__
    if not isinstance(values, Mapping) or not values:
        msg = f"update() takes values=, a dict of {name}'s column attributes to set, such as {{'qty': 0}}"
        raise QueryError(msg)
    attributes = _attributes(info)
    unknown = sorted(set(values) - set(attributes))
    if unknown:
        msg = f"update() of {name} got {', '.join(map(repr, unknown))}, which are not its column attributes"
        raise QueryError(msg)
    keys = [attribute for attribute in values if attributes[attribute].primary_key]
    if keys:
        msg = (
            f"update() does not change the primary key ({', '.join(keys)}) of {name}: load the objects and "
            "change them, so that the unit of work follows them"
        )
        raise QueryError(msg)
    changes = {attributes[attribute].key: value for attribute, value in values.items()}
    version = None
    if info.mapper.version_id_col is not None:
        version = _check_counter(info.mapper, name, "update")
        if version in changes:
            msg = f"update() moves the version counter of {name} itself; leave {version!r} out of values="
            raise QueryError(msg)
    return table, changes, version


def _attributes(info: ModelInfo) -> dict[str, Column[Any]]:
    """The model's column attributes, to their columns."""
    found: dict[str, Column[Any]] = {}
    for prop in info.mapper.column_attrs:
        column = prop.columns[0]
        if isinstance(column, Column):
            found[prop.key] = column
    return found


def _check_counter(mapper: Any, name: str, what: str) -> str:
    column = mapper.version_id_col
    generator = mapper.version_id_generator
    counts = generator is not False and isinstance(column.type, Integer)
    if counts:
        try:
            counts = generator(None) == 1 and generator(41) == 42
        except Exception:
            counts = False
    if not counts:
        msg = (
            f"{what}() of {name} cannot move its version counter, which is not SQLAlchemy's default integer one: "
            "load the object, change it, and commit"
        )
        raise QueryError(msg)
    return str(column.key)
