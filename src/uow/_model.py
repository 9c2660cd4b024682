"""What repositories need to know about a model class, read once per class."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from sqlalchemy import Column, Table, insert, inspect
from sqlalchemy.orm import Mapper

from ._rows import is_generated
from .errors import ConfigurationError, ModelTypeError, UnknownFieldError

#: How a bulk INSERT treats a column attribute: always sent (unset means None); left out when None
#: or unset, for the column's default or generated key; left out when unset, where None is a value.
_REQUIRED, _NONE_IS_DEFAULT, _UNSET_IS_NULL = 0, 1, 2
_UNSET = object()

#: Key types that are a whole single-column key as they are; checked first, since most keys are one.
_SCALAR_KEYS = frozenset({int, str, bytes, uuid.UUID})


@attrs.frozen
class ModelInfo:
    """Primary key and filterable fields of a mapped class."""

    model: type[Any]
    mapper: Mapper[Any]
    primary_key: tuple[str, ...]
    fields: frozenset[str]
    #: The single integer primary key the database would generate, if any.
    generated_key: str | None
    #: For a bulk insert: the statement, and per column attribute the parameter name and whether
    #: an unset (None) value is left out so that the database's default or generated key applies.
    bulk_statement: Any
    bulk_columns: tuple[tuple[str, str, int], ...]

    def key_of(self, obj: object) -> Any:
        """The identity of *obj* as ``Session.get()`` takes it."""
        if len(self.primary_key) == 1:
            return getattr(obj, self.primary_key[0])
        return tuple(getattr(obj, name) for name in self.primary_key)

    def normalize_key(self, key: Any) -> Any:
        """Turn what ``get()`` was given into the form :meth:`key_of` returns."""
        if type(key) in _SCALAR_KEYS and len(self.primary_key) == 1:
            return key
        if isinstance(key, Mapping):
            missing = set(self.primary_key) - set(key)
            if missing:
                msg = f"get() needs every primary key column of {self.model.__name__}: missing {sorted(missing)}"
                raise UnknownFieldError(msg)
            key = tuple(key[name] for name in self.primary_key)
        if len(self.primary_key) == 1:
            if isinstance(key, tuple):
                if len(key) != 1:
                    msg = f"{self.model.__name__} has a single primary key column; get() was given {len(key)} values"
                    raise UnknownFieldError(msg)
                return key[0]
            return key
        if not isinstance(key, tuple) or len(key) != len(self.primary_key):
            msg = (
                f"{self.model.__name__} has a composite primary key {self.primary_key}; "
                "pass get() a tuple with one value per column, in that order"
            )
            raise UnknownFieldError(msg)
        return key

    def bulk_batches(self, objs: list[Any]) -> Iterator[list[dict[str, Any]]]:
        """The INSERT parameters of *objs*, in their order, batched by the columns each one sets.

        As at a flush, an attribute that is None or unset is left out where
        the column has a default or a generated key, so that the database
        fills it in, and an unset attribute is left out where None means a
        value of its own (JSON ``null``), so that the column stays NULL.
        """
        required = [(attribute, parameter) for attribute, parameter, kind in self.bulk_columns if kind == _REQUIRED]
        optional = [
            (attribute, parameter, kind) for attribute, parameter, kind in self.bulk_columns if kind != _REQUIRED
        ]
        rows: list[dict[str, Any]] = []
        shape: tuple[str, ...] = ()
        for obj in objs:
            values = obj.__dict__
            row = {parameter: values.get(attribute) for attribute, parameter in required}
            if optional:
                for attribute, parameter, kind in optional:
                    value = values.get(attribute, _UNSET)
                    if value is _UNSET or (value is None and kind == _NONE_IS_DEFAULT):
                        continue
                    row[parameter] = value
                present = tuple(row)
                if rows and present != shape:
                    yield rows
                    rows = []
                shape = present
            rows.append(row)
        if rows:
            yield rows

    def check_filters(self, filters: Mapping[str, object]) -> None:
        unknown = set(filters) - self.fields
        if unknown:
            msg = (
                f"{self.model.__name__} has no column attribute {', '.join(sorted(unknown))}; "
                f"filter on one of {', '.join(sorted(self.fields))}, or write a query method "
                "on a custom repository for anything else"
            )
            raise UnknownFieldError(msg)

    def check_instance(self, obj: object, operation: str) -> None:
        if not isinstance(obj, self.model):
            msg = f"{operation}() of a repository for {self.model.__name__} was given a {type(obj).__name__}"
            raise ModelTypeError(msg)


_infos: dict[type[Any], ModelInfo] = {}


def model_info(model: type[Any]) -> ModelInfo:
    """The :class:`ModelInfo` of *model*, read once."""
    info = _infos.get(model)
    if info is None:
        info = _infos[model] = _read_model(model)
    return info


def _read_model(model: type[Any]) -> ModelInfo:
    """Read the mapping of *model*; raise :class:`ConfigurationError` if it has none."""
    mapper = inspect(model, raiseerr=False)
    if not isinstance(mapper, Mapper):
        msg = (
            f"{getattr(model, '__qualname__', model)!r} is not a mapped class: map it with "
            "registry.map_imperatively() or a declarative base before building a repository for it"
        )
        raise ConfigurationError(msg)
    primary_key = tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)
    generated_key = None
    if len(mapper.primary_key) == 1 and is_generated(mapper.primary_key[0]):
        generated_key = primary_key[0]
    # A class on one table is inserted with a Core INSERT on that table, the fastest way; one
    # with inheritance or a version counter through the ORM's bulk INSERT, which handles those.
    table = mapper.local_table
    plain = isinstance(table, Table) and len(mapper.tables) == 1 and mapper.polymorphic_on is None
    plain = plain and mapper.version_id_col is None
    bulk_columns = []
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if not isinstance(column, Column) or (plain and column.table is not table):
            continue
        if column.default is not None or column.server_default is not None or prop.key == generated_key:
            kind = _NONE_IS_DEFAULT
        elif column.type.should_evaluate_none:
            kind = _UNSET_IS_NULL
        else:
            kind = _REQUIRED
        bulk_columns.append((prop.key, column.key if plain else prop.key, kind))
    return ModelInfo(
        model=model,
        mapper=mapper,
        primary_key=primary_key,
        fields=frozenset(prop.key for prop in mapper.column_attrs),
        generated_key=generated_key,
        bulk_statement=insert(table) if plain and isinstance(table, Table) else insert(model),
        bulk_columns=tuple(bulk_columns),
    )
