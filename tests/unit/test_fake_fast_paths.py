"""The fake's short ways (a flush of plain objects, a key of one column) behave as its general ones.

Each test is a case that a short way must leave to the general one: a
self-referencing foreign key, a version counter, a relationship held by a
loaded object or declared only on a subclass, a deleted object whose key a
new one takes, a composite key.
"""

from __future__ import annotations

import attrs
import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import registry, relationship
from sqlalchemy.orm.exc import StaleDataError

import uow

metadata = MetaData()
mapper_registry = registry(metadata=metadata)


@attrs.define(eq=False, slots=False)
class Folder:
    """A tree by a plain foreign key column: no relationship()."""

    id: int
    parent_id: int | None = None


@attrs.define(eq=False, slots=False)
class Counter:
    """A row with a version counter and no relationship."""

    id: int
    value: int
    version: int | None = None


@attrs.define(eq=False, slots=False)
class Plain:
    """A row with nothing but columns."""

    id: int
    name: str


@attrs.define(eq=False, slots=False)
class Basket:
    id: int
    items: list[Item] = attrs.field(factory=list)


@attrs.define(eq=False, slots=False)
class Item:
    id: int
    basket_id: int | None = None


@attrs.define(eq=False, slots=False)
class Animal:
    """The base of a joined hierarchy without a discriminator; only its subclass has a relationship."""

    id: int
    name: str


@attrs.define(eq=False, slots=False)
class Dog(Animal):
    toys: list[Toy] = attrs.field(factory=list)


@attrs.define(eq=False, slots=False)
class Cat(Animal):
    """A subclass with a table of its own and no relationship."""

    lives: int = 9


@attrs.define(eq=False, slots=False)
class Shape:
    """The base of a single-table hierarchy with a discriminator, without relationships."""

    id: int
    kind: str | None = None


@attrs.define(eq=False, slots=False)
class Circle(Shape):
    radius: int | None = None


@attrs.define(eq=False, slots=False)
class Toy:
    id: int
    dog_id: int | None = None


@attrs.define(eq=False, slots=False)
class Seat:
    """A row with a composite primary key."""

    row: int
    number: int
    taken: bool = False


mapper_registry.map_imperatively(
    Folder,
    Table(
        "fast_folders",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("parent_id", Integer, ForeignKey("fast_folders.id")),
    ),
)
counters = Table(
    "fast_counters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
    Column("version", Integer, nullable=False),
)
mapper_registry.map_imperatively(Counter, counters, version_id_col=counters.c.version)
mapper_registry.map_imperatively(
    Plain,
    Table(
        "fast_plain",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(20), nullable=False),
    ),
)
items = Table(
    "fast_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("basket_id", Integer, ForeignKey("fast_baskets.id")),
)
mapper_registry.map_imperatively(
    Basket,
    Table("fast_baskets", metadata, Column("id", Integer, primary_key=True, autoincrement=False)),
    properties={"items": relationship(Item, cascade="all, delete-orphan")},
)
mapper_registry.map_imperatively(Item, items)
animals = Table(
    "fast_animals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(20), nullable=False),
)
mapper_registry.map_imperatively(Animal, animals)
mapper_registry.map_imperatively(
    Dog,
    Table("fast_dogs", metadata, Column("id", Integer, ForeignKey("fast_animals.id"), primary_key=True)),
    inherits=Animal,
    properties={"toys": relationship(Toy, cascade="all, delete-orphan")},
)
mapper_registry.map_imperatively(
    Toy,
    Table(
        "fast_toys",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("dog_id", Integer, ForeignKey("fast_dogs.id")),
    ),
)
cats = Table(
    "fast_cats",
    metadata,
    Column("id", Integer, ForeignKey("fast_animals.id"), primary_key=True),
    Column("lives", Integer, nullable=False),
)
mapper_registry.map_imperatively(Cat, cats, inherits=Animal)
shapes = Table(
    "fast_shapes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(10), nullable=False),
    Column("radius", Integer),
)
mapper_registry.map_imperatively(Shape, shapes, polymorphic_on=shapes.c.kind, polymorphic_identity="shape")
mapper_registry.map_imperatively(Circle, inherits=Shape, polymorphic_identity="circle")
mapper_registry.map_imperatively(
    Seat,
    Table(
        "fast_seats",
        metadata,
        Column("row", Integer, primary_key=True, autoincrement=False),
        Column("number", Integer, primary_key=True, autoincrement=False),
        Column("taken", Integer, nullable=False),
    ),
)


class Shop(uow.FakeUnitOfWork):
    folders = uow.repository(Folder)
    counters = uow.repository(Counter)
    plain = uow.repository(Plain)
    baskets = uow.repository(Basket)
    items = uow.repository(Item)
    animals = uow.repository(Animal)
    dogs = uow.repository(Dog)
    toys = uow.repository(Toy)
    cats = uow.repository(Cat)
    shapes = uow.repository(Shape)
    seats = uow.repository(Seat)


def test_a_child_added_before_its_parent_in_a_self_referencing_table_is_refused() -> None:
    """Without a relationship, rows go in the order added: a child before its parent is refused, as databases do."""
    unit = Shop()
    with unit:
        unit.folders.add_all([Folder(2, parent_id=1), Folder(1)])
        with pytest.raises(IntegrityError, match="fast_folders_parent_id_fkey"):
            unit.commit()
    with unit:
        unit.folders.add_all([Folder(1), Folder(2, parent_id=1)])
        unit.commit()
    assert unit.database.rows(Folder) == [{"id": 1, "parent_id": None}, {"id": 2, "parent_id": 1}]


def test_a_version_counter_counts_and_refuses_a_stale_update_without_relationships() -> None:
    """A versioned model without relationships still counts versions and refuses a stale write."""
    unit = Shop()
    with unit:
        unit.counters.add(Counter(1, 0))
        unit.commit()
    assert unit.database.rows(Counter) == [{"id": 1, "value": 0, "version": 1}]
    with unit:
        unit.counters.get(1).value = 5
        unit.commit()
    assert unit.database.rows(Counter) == [{"id": 1, "value": 5, "version": 2}]
    with unit:
        counter = unit.counters.get(1)
        with unit.transaction(propagation="requires_new"):  # another transaction changes the row meanwhile
            unit.counters.get(1).value = 7
            unit.commit()
        counter.value = 6
        with pytest.raises(StaleDataError):
            unit.commit()
    assert unit.database.rows(Counter) == [{"id": 1, "value": 7, "version": 3}]


def test_a_loaded_object_with_a_collection_cascades_a_new_member_beside_a_plain_new_object() -> None:
    """A plain new object does not keep a loaded parent's new collection member from being saved."""
    unit = Shop()
    with unit:
        unit.baskets.add(Basket(1))
        unit.commit()
    with unit:
        unit.baskets.get(1).items.append(Item(10))
        unit.plain.add(Plain(1, "lamp"))
        unit.commit()
    assert unit.database.rows(Item) == [{"id": 10, "basket_id": 1}]
    assert unit.database.rows(Plain) == [{"id": 1, "name": "lamp"}]


def test_a_relationship_declared_only_on_a_subclass_cascades_beside_its_plain_base() -> None:
    """A subclass's relationship is followed even when its base class, flushed with it, has none."""
    unit = Shop()
    with unit:
        unit.animals.add(Animal(1, "cat"))
        unit.dogs.add(Dog(2, "rex", toys=[Toy(20)]))
        unit.commit()
    assert unit.database.rows(Toy) == [{"id": 20, "dog_id": 2}]
    assert [row["id"] for row in unit.database.rows(Animal)] == [1, 2]


def test_a_subclass_with_a_table_of_its_own_writes_a_row_in_each_table() -> None:
    """An object of a joined subclass without relationships is inserted and updated in both of its tables."""
    unit = Shop()
    with unit:
        cat = Cat(3, "tom")
        unit.cats.add(cat)
        unit.commit()
        cat.name, cat.lives = "thomas", 8
        unit.commit()
    assert unit.database.rows(animals) == [{"id": 3, "name": "thomas"}]
    assert unit.database.rows(cats) == [{"id": 3, "lives": 8}]


def test_a_subclass_of_a_single_table_hierarchy_gets_its_discriminator() -> None:
    """A new object of a hierarchy with a discriminator is written with its class's identity."""
    unit = Shop()
    with unit:
        unit.shapes.add_all([Shape(1), Circle(2, radius=3)])
        unit.commit()
    assert unit.database.rows(shapes) == [
        {"id": 1, "kind": "shape", "radius": None},
        {"id": 2, "kind": "circle", "radius": 3},
    ]
    with unit:
        assert isinstance(unit.shapes.get(2), Circle)


def test_a_deleted_object_whose_key_a_new_object_takes_leaves_one_row_with_the_new_values() -> None:
    """Removing an object and adding a new one with its key in one flush updates the row, as the ORM does."""
    unit = Shop()
    with unit:
        unit.plain.add(Plain(1, "lamp"))
        unit.commit()
    with unit:
        unit.plain.remove(unit.plain.get(1))
        unit.plain.add(Plain(1, "desk"))
        unit.commit()
    assert unit.database.rows(Plain) == [{"id": 1, "name": "desk"}]


def test_a_composite_key_is_read_and_updated_through_both_of_its_columns() -> None:
    """get() with a tuple and an update of one row of a composite key touch that row only."""
    unit = Shop()
    with unit:
        unit.seats.add_all([Seat(1, 1), Seat(1, 2), Seat(2, 1)])
        unit.commit()
    with unit:
        unit.seats.get((1, 2)).taken = True
        unit.seats.add(Seat(2, 2))
        unit.commit()
    assert [(row["row"], row["number"], row["taken"]) for row in unit.database.rows(Seat)] == [
        (1, 1, False),
        (1, 2, True),
        (2, 1, False),
        (2, 2, False),
    ]


def test_a_row_written_while_its_transaction_was_alone_is_locked_against_one_opened_after() -> None:
    """Rows written before a second transaction opened are locked against it: its lock and its write both fail."""
    unit = Shop()
    with unit:
        unit.plain.add(Plain(1, "a"))
        unit.commit()
    with unit:
        unit.plain.get(1).name = "b"
        assert unit.plain.get(2) is None  # its autoflush writes row 1 while this transaction is the only one open
        with unit.transaction(propagation="requires_new"), pytest.raises(OperationalError, match="would wait"):
            unit.plain.get(1, for_update=True)
        with (
            pytest.raises(OperationalError, match="which has written it"),
            unit.transaction(propagation="requires_new"),
        ):
            unit.plain.get(1).name = "c"
            unit.commit()
        unit.commit()
    with unit:  # both ended: the row is free again
        unit.plain.get(1).name = "d"
        unit.commit()
    assert unit.database.rows(Plain) == [{"id": 1, "name": "d"}]
