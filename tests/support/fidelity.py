"""Models and units of work for the fidelity tests: what a real database does that the fake must do too.

Declarative models on a metadata of their own (never the shared one), with
tables prefixed ``fid_``: generated keys (``Identity()``, a ``Sequence``),
UNIQUE and NOT NULL constraints, foreign keys with each ``ON DELETE`` action,
a one-to-many relationship with ``delete-orphan``, a version counter, a
many-to-many association, and joined and single-table inheritance.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    String,
    Table,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import uow

__all__ = [
    "Address",
    "Article",
    "AsyncFakeFidelityUnitOfWork",
    "AsyncFidelityUnitOfWork",
    "Customer",
    "Employee",
    "Engineer",
    "FakeFidelityUnitOfWork",
    "FidelityUnitOfWork",
    "Invoice",
    "Line",
    "Memo",
    "Order",
    "Product",
    "Slot",
    "SqlFidelityUnitOfWork",
    "Stock",
    "Tag",
    "Truck",
    "Vehicle",
    "article_tags",
    "enforce_foreign_keys",
    "metadata",
]

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class Customer(Base):
    """An ``Identity()`` key, a UNIQUE NOT NULL column and a NOT NULL one; memos, invoices and addresses refer to it."""

    __tablename__ = "fid_customers"

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(100))


class Memo(Base):
    """A note on a customer: ``ON DELETE SET NULL``, and no ORM relationship, so only the database acts."""

    __tablename__ = "fid_memos"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("fid_customers.id", ondelete="SET NULL"))


class Invoice(Base):
    """An invoice of a customer: ``ON DELETE RESTRICT``, so the customer cannot be deleted while it exists."""

    __tablename__ = "fid_invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int]
    customer_id: Mapped[int] = mapped_column(ForeignKey("fid_customers.id", ondelete="RESTRICT"))


class Address(Base):
    """An address of a customer: ``ON DELETE CASCADE``, and no ORM relationship, so only the database acts."""

    __tablename__ = "fid_addresses"

    id: Mapped[int] = mapped_column(primary_key=True)
    city: Mapped[str] = mapped_column(String(50))
    customer_id: Mapped[int] = mapped_column(ForeignKey("fid_customers.id", ondelete="CASCADE"))


class Slot(Base):
    """A composite UNIQUE constraint on (day, room), and a unique index on code."""

    __tablename__ = "fid_slots"
    __table_args__ = (
        UniqueConstraint("day", "room", name="uq_fid_slot_day_room"),
        Index("ix_fid_slot_code", "code", unique=True),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[str] = mapped_column(String(10))
    room: Mapped[str] = mapped_column(String(10))
    code: Mapped[str] = mapped_column(String(20))


class Product(Base):
    """A key from a ``Sequence``: PostgreSQL and MariaDB create and use it, SQLite ignores it (its rowid numbers)."""

    __tablename__ = "fid_products"

    id: Mapped[int] = mapped_column(Integer, Sequence("fid_product_seq"), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Order(Base):
    """An aggregate: its lines go with it (``all, delete-orphan``), loaded lazily when first read."""

    __tablename__ = "fid_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[str] = mapped_column(String(50))
    lines: Mapped[list[Line]] = relationship(back_populates="order", cascade="all, delete-orphan")


class Line(Base):
    __tablename__ = "fid_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("fid_orders.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(String(50))
    qty: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="lines")


class Stock(Base):
    """A version counter, as the allocation example guards concurrent allocations with."""

    __tablename__ = "fid_stocks"

    sku: Mapped[str] = mapped_column(String(50), primary_key=True)
    qty: Mapped[int]
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": version}


article_tags = Table(
    "fid_article_tags",
    metadata,
    Column("article_id", ForeignKey("fid_articles.id"), primary_key=True),
    Column("tag_id", ForeignKey("fid_tags.id"), primary_key=True),
)


class Tag(Base):
    __tablename__ = "fid_tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


class Article(Base):
    """Many-to-many: its tags are rows of an association table."""

    __tablename__ = "fid_articles"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    tags: Mapped[list[Tag]] = relationship(secondary=article_tags)


class Employee(Base):
    """Joined-table inheritance: an Engineer is a row here and a row in fid_engineers."""

    __tablename__ = "fid_employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "fid_engineers"

    id: Mapped[int] = mapped_column(ForeignKey("fid_employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20), default="python")
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "engineer"}


class Animal(Base):
    """Joined-table inheritance without a discriminator: a query of the base returns base objects."""

    __tablename__ = "fid_animals"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Cat(Animal):
    __tablename__ = "fid_cats"

    id: Mapped[int] = mapped_column(ForeignKey("fid_animals.id"), primary_key=True)
    lives: Mapped[int] = mapped_column(default=9)


class Basket(Base):
    """A parent whose fruit are deleted when they leave it, whatever kind of fruit they are."""

    __tablename__ = "fid_baskets"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    fruit: Mapped[list[Fruit]] = relationship(back_populates="basket", cascade="all, delete-orphan")


class Fruit(Base):
    """The target of a delete-orphan cascade, with a single-table subclass."""

    __tablename__ = "fid_fruit"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    basket_id: Mapped[int] = mapped_column(ForeignKey("fid_baskets.id"))
    basket: Mapped[Basket | None] = relationship(back_populates="fruit")
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "fruit"}


class Apple(Fruit):
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "apple"}


class Vehicle(Base):
    """Single-table inheritance: a Truck is a row of fid_vehicles with kind 'truck'."""

    __tablename__ = "fid_vehicles"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    wheels: Mapped[int]
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Truck(Vehicle):
    payload: Mapped[int | None] = mapped_column(nullable=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "truck"}


class Node(Base):
    """A tree: a self-referential foreign key, children with ``delete-orphan``, a parent by ``remote_side``."""

    __tablename__ = "fid_nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("fid_nodes.id"))
    children: Mapped[list[Node]] = relationship(back_populates="parent", cascade="all, delete-orphan")
    parent: Mapped[Node | None] = relationship(back_populates="children", remote_side=[id])


class Folder(Base):
    """A self-referential foreign key without a relationship: the ORM writes the rows in the order added."""

    __tablename__ = "fid_folders"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("fid_folders.id"))


class Account(Base):
    """A unique handle besides the key: notes refer to the handle."""

    __tablename__ = "fid_accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    handle: Mapped[str] = mapped_column(String(50), unique=True)


class Note(Base):
    """A foreign key to a unique column that is not the primary key."""

    __tablename__ = "fid_notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    handle: Mapped[str] = mapped_column(ForeignKey("fid_accounts.handle"))


#: An association table without a primary key, as SQLAlchemy's documentation writes one.
enrolments = Table(
    "fid_enrolments",
    metadata,
    Column("student_id", ForeignKey("fid_students.id"), nullable=False),
    Column("course_id", ForeignKey("fid_courses.id"), nullable=False),
)


class Student(Base):
    """Many-to-many with ``back_populates`` on both sides, through a table without a primary key."""

    __tablename__ = "fid_students"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    courses: Mapped[list[Course]] = relationship(secondary=enrolments, back_populates="students")


class Course(Base):
    __tablename__ = "fid_courses"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    students: Mapped[list[Student]] = relationship(secondary=enrolments, back_populates="courses")


class FidelityUnitOfWork(uow.UnitOfWork):
    customers = uow.repository(Customer)
    memos = uow.repository(Memo)
    invoices = uow.repository(Invoice)
    addresses = uow.repository(Address)
    slots = uow.repository(Slot)
    products = uow.repository(Product)
    orders = uow.repository(Order)
    lines = uow.repository(Line)
    stocks = uow.repository(Stock)
    tags = uow.repository(Tag)
    articles = uow.repository(Article)
    employees = uow.repository(Employee)
    vehicles = uow.repository(Vehicle)
    nodes = uow.repository(Node)
    folders = uow.repository(Folder)
    animals = uow.repository(Animal)
    cats = uow.repository(Cat)
    baskets = uow.repository(Basket)
    fruit = uow.repository(Fruit)
    students = uow.repository(Student)
    courses = uow.repository(Course)
    accounts = uow.repository(Account)
    notes = uow.repository(Note)


class SqlFidelityUnitOfWork(uow.SqlAlchemyUnitOfWork, FidelityUnitOfWork):
    pass


class FakeFidelityUnitOfWork(uow.FakeUnitOfWork, FidelityUnitOfWork):
    pass


class AsyncFidelityUnitOfWork(uow.AsyncUnitOfWork):
    customers = uow.repository(Customer)
    memos = uow.repository(Memo)
    invoices = uow.repository(Invoice)
    addresses = uow.repository(Address)
    slots = uow.repository(Slot)
    products = uow.repository(Product)
    orders = uow.repository(Order)
    lines = uow.repository(Line)
    stocks = uow.repository(Stock)
    tags = uow.repository(Tag)
    articles = uow.repository(Article)
    employees = uow.repository(Employee)
    vehicles = uow.repository(Vehicle)
    nodes = uow.repository(Node)
    folders = uow.repository(Folder)
    animals = uow.repository(Animal)
    cats = uow.repository(Cat)
    baskets = uow.repository(Basket)
    fruit = uow.repository(Fruit)
    students = uow.repository(Student)
    courses = uow.repository(Course)
    accounts = uow.repository(Account)
    notes = uow.repository(Note)


class AsyncFakeFidelityUnitOfWork(uow.AsyncFakeUnitOfWork, AsyncFidelityUnitOfWork):
    pass


#: The repository of each model, by the name both interfaces declare it under.
REPOSITORIES: dict[type[Any], str] = {
    Customer: "customers",
    Memo: "memos",
    Invoice: "invoices",
    Address: "addresses",
    Slot: "slots",
    Product: "products",
    Order: "orders",
    Line: "lines",
    Stock: "stocks",
    Tag: "tags",
    Article: "articles",
    Employee: "employees",
    Engineer: "employees",
    Vehicle: "vehicles",
    Truck: "vehicles",
    Node: "nodes",
    Folder: "folders",
    Animal: "animals",
    Cat: "cats",
    Basket: "baskets",
    Fruit: "fruit",
    Apple: "fruit",
    Student: "students",
    Course: "courses",
    Account: "accounts",
    Note: "notes",
}


def enforce_foreign_keys(engine: Engine) -> Engine:
    """Make SQLite check foreign keys on every connection of *engine*, as the other databases always do."""

    @event.listens_for(engine, "connect")
    def _foreign_keys_on(dbapi_connection: Any, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine
