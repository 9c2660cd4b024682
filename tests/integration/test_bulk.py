"""add_all(bulk=True) with what the shared test models do not have: inheritance and JSON columns.

The models live on a metadata of their own, created and dropped around each
test on every backend; the fake runs the same services. Rows are read back
through a separate connection with plain SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from sqlalchemy import JSON, Engine, ForeignKey, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import uow
from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner


class Base(DeclarativeBase):
    metadata = MetaData()


class Animal(Base):
    """Single-table inheritance: a Dog is an Animal row with kind 'dog' and a bark."""

    __tablename__ = "uow_bulk_animals"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    bark: Mapped[str | None] = mapped_column(String(20), default=None)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}


class Dog(Animal):
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "dog"}


class Product(Base):
    """Joined-table inheritance: a Lamp has a row in each table."""

    __tablename__ = "uow_bulk_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "product"}


class Lamp(Product):
    __tablename__ = "uow_bulk_lamps"
    id: Mapped[int] = mapped_column(ForeignKey("uow_bulk_products.id"), primary_key=True)
    watts: Mapped[int]
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "lamp"}


class Document(Base):
    __tablename__ = "uow_bulk_documents"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    payload: Mapped[Any] = mapped_column(JSON, nullable=True)


class Catalog(uow.UnitOfWork):
    animals = uow.repository(Animal)
    products = uow.repository(Product)
    documents = uow.repository(Document)


class SqlAlchemyCatalog(uow.SqlAlchemyUnitOfWork, Catalog):
    pass


class FakeCatalog(uow.FakeUnitOfWork, Catalog):
    pass


@pytest.fixture
def catalog_engine(database: Database, provisioner: Provisioner) -> Iterator[Engine]:
    """An engine on the run's database with the bulk test tables, dropped afterwards."""
    eng = provisioner.track(database.engine())
    Base.metadata.create_all(eng)
    yield eng
    Base.metadata.drop_all(eng)


def test_subclass_objects_through_the_base_repository_are_written_whole(catalog_engine: Engine) -> None:
    """A bulk insert of subclass objects through the base class's repository writes the subclass's columns and rows."""
    for unit in (SqlAlchemyCatalog(catalog_engine), FakeCatalog()):
        with unit:
            unit.animals.add_all([Animal(id=1), Dog(id=2, bark="woof")], bulk=True)
            unit.products.add_all([Lamp(id=1, watts=40), Product(id=2)], bulk=True)
            unit.commit()
        with unit:
            dog = unit.animals.get(2)
            lamp = unit.products.get(1)
            assert (Dog, "woof") == (type(dog), dog.bark)
            assert (Lamp, 40) == (type(lamp), lamp.watts)
            assert Product is type(unit.products.get(2))
    assert [(1, "animal", None), (2, "dog", "woof")] == rows(
        catalog_engine, "SELECT id, kind, bark FROM uow_bulk_animals ORDER BY id"
    )
    assert [(1, "lamp"), (2, "product")] == rows(catalog_engine, "SELECT id, kind FROM uow_bulk_products ORDER BY id")
    assert [(1, 40)] == rows(catalog_engine, "SELECT id, watts FROM uow_bulk_lamps")


def test_an_unset_json_attribute_stays_null_and_none_is_json_null(catalog_engine: Engine) -> None:
    """In a bulk insert, an unset JSON attribute is SQL NULL, as at a flush; a set value is stored as JSON."""
    unit = SqlAlchemyCatalog(catalog_engine)
    with unit:
        unit.documents.add_all([Document(id=1), Document(id=2, payload={"a": 1})], bulk=True)
        unit.commit()
    assert [(1, True), (2, False)] == [
        (key, bool(is_null))
        for key, is_null in rows(catalog_engine, "SELECT id, payload IS NULL FROM uow_bulk_documents ORDER BY id")
    ]


def test_get_after_session_delete_finds_nothing(catalog_engine: Engine) -> None:
    """get() returns None for an object deleted with session.delete() in the same block, before any flush."""
    unit = SqlAlchemyCatalog(catalog_engine)
    with unit:
        unit.animals.add(Animal(id=1))
        unit.commit()
    with unit:
        unit.session.delete(unit.animals.get(1))
        assert None is unit.animals.get(1)
        unit.commit()
    assert [] == rows(catalog_engine, "SELECT id FROM uow_bulk_animals")
