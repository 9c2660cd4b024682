"""The fake stores a value as its column's type stores it, and only where that type is the plain one."""

from __future__ import annotations

import decimal
from typing import Any

import attrs
from sqlalchemy import Column, Integer, MetaData, Numeric, String, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import registry

import uow

metadata = MetaData()


class IntAsText(String):
    """A String column whose Python values are ints: its own processors, so the fake must leave its values be."""

    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        return lambda value: None if value is None else str(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        return lambda value: None if value is None else int(value)


@attrs.define(eq=False, slots=False)
class Reading:
    id: int
    count: object = None
    amount: object = None
    code: object = None


values = Table(
    "fake_values_readings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("count", Integer),
    Column("amount", Numeric(10, 2)),
    Column("code", IntAsText(10)),
)
registry(metadata=metadata).map_imperatively(Reading, values)


class Readings(uow.FakeUnitOfWork):
    readings = uow.repository(Reading)


def stored(**columns: object) -> dict[str, object]:
    """The row a fake stores for a reading with *columns*."""
    unit = Readings()
    with unit:
        unit.readings.add(Reading(1, **columns))
        unit.commit()
    (row,) = unit.database.rows(Reading)
    return {name: row[name] for name in columns}


def test_integer_strings_are_stored_as_integers_in_ascii_digits_only() -> None:
    """' 3 ' and '3.0' are 3 in an integer column, as SQLite stores them; '٣' (a non-ASCII digit) stays text."""
    assert stored(count=" 3 ") == {"count": 3}
    assert stored(count="3.0") == {"count": 3}
    assert stored(count="\u0663") == {"count": "\u0663"}


def test_a_float_string_beyond_exact_integers_stays_a_float() -> None:
    """'12345678901234567890.0' is stored as the float SQLite stores, not as an integer with other digits."""
    assert stored(count="12345678901234567890.0") == {"count": 1.2345678901234567e19}
    assert isinstance(stored(count="12345678901234567890.0")["count"], float)


def test_a_nan_string_is_not_made_a_decimal() -> None:
    """'sNaN' and 'nan' are no number a database stores: the fake keeps the text instead of a NaN Decimal."""
    assert stored(amount="sNaN") == {"amount": "sNaN"}
    assert stored(amount="nan") == {"amount": "nan"}
    assert stored(amount="1.5") == {"amount": decimal.Decimal("1.5")}


def test_a_string_type_with_processors_of_its_own_keeps_its_values() -> None:
    """A String subclass that stores ints is left alone: 5 stays 5 and reads back as 5 in the next block."""
    assert stored(code=5) == {"code": 5}
    unit = Readings()
    with unit:
        unit.readings.add(Reading(2, code=7))
        unit.commit()
    with unit:
        assert unit.readings.get(2).code == 7
