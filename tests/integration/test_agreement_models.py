"""Hypothesis drives the fake and a real database through the fidelity models; they must agree.

The machine runs each step, one action, on ``FakeFidelityUnitOfWork`` and on
``SqlFidelityUnitOfWork`` over SQLite (foreign keys on), PostgreSQL and
MariaDB, and asserts the same outcome: the same plain value, or an exception
of the same type. After every step the committed rows of every fidelity
table must agree: the database's read through a separate connection, the
fake's with ``database.rows``.

Generated keys are numbered differently (the fake numbers one past the
highest key ever held; sequences skip the numbers of rolled-back inserts),
so the machine never shows or compares a generated key: every object carries
a natural label that the machine makes unique (an email, a code, a ref, a
title...), actions find objects by label on each side, and committed rows
are compared with each foreign key replaced by the label of the row it
refers to.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import Engine, Table
from sqlalchemy.exc import SAWarning

from tests.support.databases import Database, Provisioner
from tests.support.fidelity import (
    Address,
    Animal,
    Article,
    Cat,
    Customer,
    Employee,
    Engineer,
    FakeFidelityUnitOfWork,
    Folder,
    Invoice,
    Line,
    Memo,
    Order,
    Product,
    Slot,
    SqlFidelityUnitOfWork,
    Stock,
    Tag,
    Truck,
    Vehicle,
    enforce_foreign_keys,
    metadata,
)

#: A key that no generated key of a run reaches: a reference to a row that does not exist.
MISSING_KEY = 999_999

EMAILS = st.sampled_from(["ada@example.com", "bob@example.com", "cy@example.com"])
NAMES = st.sampled_from(["Ada", "Bob", "Cy", None])
DAYS = st.sampled_from(["mon", "tue"])
ROOMS = st.sampled_from(["a", "b"])
CODES = st.sampled_from(["s1", "s2", "s3"])
SKUS = st.sampled_from(["lamp", "desk"])
QUANTITIES = st.sampled_from([1, 2, 3, 0, None])
TAG_NAMES = st.sampled_from(["t1", "t2", "t3"])
LANGUAGES = st.sampled_from(["rust", "go", None])
PAYLOADS = st.sampled_from([1, 2, None])
#: Which labelled object an action is about: counting back from the newest label, and MISSING_PICK for none.
PICKS = st.integers(min_value=0, max_value=3)
MISSING_PICK = 3
REFERENCES = st.sampled_from(["memo", "invoice", "address"])
#: Where a memo, invoice or address points: a customer by email, a missing key, or NULL.
TARGETS = st.sampled_from(["ada@example.com", "bob@example.com", "cy@example.com", "missing", "null"])


#: Outcomes after which the transaction refuses work until it is rolled back.
POISONING = frozenset(("IntegrityError", "StaleDataError", "PendingRollbackError", "ObjectDeletedError"))


class Boom(Exception):
    """Raised inside a block to make it fail."""


def outcome(action: Callable[[], Any]) -> Any:
    """What an action returned (plain data), or the name of the exception it raised."""
    try:
        with warnings.catch_warnings():
            # SQLAlchemy warns when a rollback discards objects added after a
            # failed flush; the fake does the same without the warning.
            warnings.filterwarnings("ignore", "Session's state has been changed on a non-active", SAWarning)
            return action()
    except Exception as error:
        return ("raised", type(error).__name__)


def raised(found: Any) -> str | None:
    """The name of the exception an outcome is, or None for a value."""
    if isinstance(found, tuple) and len(found) == 2 and found[0] == "raised":
        return str(found[1])
    return None


# -- committed state, without generated keys -------------------------------------


def canonical(rows_of: Callable[[Table], list[dict[str, Any]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Every fidelity table's rows as sorted tuples, each generated key replaced by the label of its row."""
    raw = {table.name: rows_of(table) for table in metadata.sorted_tables}

    def labels(table: str, column: str) -> Callable[[Any], Any]:
        by_key = {row["id"]: row[column] for row in raw[table]}
        return lambda key: None if key is None else by_key.get(key, ("dangling", key))

    customer = labels("fid_customers", "email")
    order = labels("fid_orders", "ref")
    article = labels("fid_articles", "title")
    tag = labels("fid_tags", "name")
    employee = labels("fid_employees", "name")
    shapes: dict[str, Callable[[dict[str, Any]], tuple[Any, ...]]] = {
        "fid_customers": lambda r: (r["email"], r["name"]),
        "fid_memos": lambda r: (r["text"], customer(r["customer_id"])),
        "fid_invoices": lambda r: (r["total"], customer(r["customer_id"])),
        "fid_addresses": lambda r: (r["city"], customer(r["customer_id"])),
        "fid_slots": lambda r: (r["day"], r["room"], r["code"]),
        "fid_products": lambda r: (r["name"],),
        "fid_orders": lambda r: (r["ref"],),
        "fid_lines": lambda r: (r["sku"], r["qty"], order(r["order_id"])),
        "fid_stocks": lambda r: (r["sku"], r["qty"], r["version"]),
        "fid_tags": lambda r: (r["name"],),
        "fid_articles": lambda r: (r["title"],),
        "fid_article_tags": lambda r: (article(r["article_id"]), tag(r["tag_id"])),
        "fid_employees": lambda r: (r["name"], r["kind"]),
        "fid_engineers": lambda r: (employee(r["id"]), r["language"]),
        "fid_vehicles": lambda r: (r["kind"], r["wheels"], r["payload"]),
    }
    # A table the machine never writes is compared as it is: it stays empty.
    return {
        name: sorted((shapes.get(name, lambda r: tuple(sorted(r.items())))(row) for row in rows), key=repr)
        for name, rows in raw.items()
    }


def empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            own = [fk.parent for fk in table.foreign_keys if fk.column.table is table]
            if own:  # MariaDB checks a foreign key row by row: a parent deleted before its child is refused
                conn.execute(table.update().values({column.key: None for column in own}))
            conn.execute(table.delete())


# -- reading objects as plain data -------------------------------------------------


def customer_of(unit: Any, key: int | None) -> str | None:
    """The email of the customer with *key*, as this unit of work sees it, or None."""
    if key is None:
        return None
    found = unit.customers.get(key)
    return None if found is None else found.email


def order_shown(order: Order) -> tuple[Any, ...]:
    return (order.ref, sorted((line.sku, line.qty) for line in order.lines))


def employee_shown(employee: Employee) -> tuple[Any, ...]:
    return (type(employee).__name__, employee.name, getattr(employee, "language", None))


def vehicle_shown(vehicle: Vehicle) -> tuple[Any, ...]:
    return (type(vehicle).__name__, vehicle.wheels, getattr(vehicle, "payload", None))


#: What each part of the model set lists, through the repositories, as plain data.
LISTINGS: dict[str, Callable[[Any], dict[str, list[Any]]]] = {
    "customers": lambda unit: {
        "customers": [(c.email, c.name) for c in unit.customers.list()],
        "memos": [(m.text, customer_of(unit, m.customer_id)) for m in unit.memos.list()],
        "invoices": [(i.total, customer_of(unit, i.customer_id)) for i in unit.invoices.list()],
        "addresses": [(a.city, customer_of(unit, a.customer_id)) for a in unit.addresses.list()],
    },
    "orders": lambda unit: {
        "orders": [order_shown(o) for o in unit.orders.list()],
        "lines": [(line.sku, line.qty, line.order.ref) for line in unit.lines.list()],
    },
    "stock": lambda unit: {
        "slots": [(s.day, s.room, s.code) for s in unit.slots.list()],
        "products": [p.name for p in unit.products.list()],
        "stocks": [(s.sku, s.qty, s.version) for s in unit.stocks.list()],
    },
    "catalog": lambda unit: {
        "tags": [t.name for t in unit.tags.list()],
        "articles": [(a.title, sorted(t.name for t in a.tags)) for a in unit.articles.list()],
    },
    "staff": lambda unit: {
        "employees": [employee_shown(e) for e in unit.employees.list()],
        "vehicles": [vehicle_shown(v) for v in unit.vehicles.list()],
    },
    "trees": lambda unit: {
        "folders": [(f.id, f.parent_id) for f in unit.folders.list()],
        "animals": [(type(a).__name__, a.id, a.name) for a in unit.animals.list()],
        "cats": [(type(c).__name__, c.id, c.lives) for c in unit.cats.list()],
    },
}


class Side:
    """One implementation in the machine: its unit of work, and the order the machine holds from it."""

    def __init__(self, unit: Any) -> None:
        self.unit = unit
        self.held: Order | None = None


REFERENCE_MODELS: dict[str, tuple[type[Any], str, str]] = {
    "memo": (Memo, "memos", "text"),
    "invoice": (Invoice, "invoices", "total"),
    "address": (Address, "addresses", "city"),
}


#: The kinds of objects whose labels are numbers: the invoices' totals, the vehicles' wheels, and the keys
#: that folders and animals are given (not generated, so both sides have the same).
NUMBERED = ("invoice", "vehicle", "folder", "animal")


def make_machine(engine: Engine) -> type[RuleBasedStateMachine]:
    class ModelAgreement(RuleBasedStateMachine):
        """The same random sequence of operations on the fidelity models, on the fake and on SQLAlchemy."""

        def __init__(self) -> None:
            super().__init__()
            empty_tables(engine)
            self.sides = (Side(FakeFidelityUnitOfWork()), Side(SqlFidelityUnitOfWork(engine)))
            self.in_block = False
            #: Whether the open transaction may have written: a requires_new block then waits on its locks.
            self.wrote = False
            #: Stock keys this block has loaded or added: adding a new object with such a key is a
            #: misuse SQLAlchemy warns about, and when its error surfaces depends on the identity map.
            self.stocks_seen: set[str] = set()
            #: Whether the last step raised an error that leaves the transaction to be rolled back:
            #: until a rollback, only the rules that end or probe the transaction run.
            self.poisoned = False
            self.counter = 0
            #: The committed rows both sides had at the last comparison, and whether a step committed since.
            self.agreed: dict[str, list[tuple[Any, ...]]] | None = None
            self.committed = True
            self.labels: dict[str, list[Any]] = {
                "memo": [],
                "invoice": [],
                "address": [],
                "order": [],
                "line": [],
                "article": [],
                "employee": [],
                "vehicle": [],
                "folder": [],
                "animal": [],
            }
            self.seed()

        def seed(self) -> None:
            """The same committed rows on both sides to start from: a few objects of every model."""
            memos = [self.fresh("memo") for _ in range(3)]
            invoice, address = self.fresh("invoice"), self.fresh("address")
            orders = [self.fresh("order") for _ in range(3)]
            lines = [self.fresh("line") for _ in range(3)]
            articles = [self.fresh("article") for _ in range(2)]
            employees = [self.fresh("employee") for _ in range(2)]
            vehicles = [self.fresh("vehicle") for _ in range(2)]
            for side in self.sides:
                unit = side.unit
                with unit:
                    ada = Customer(email="ada@example.com", name="Ada")
                    bob = Customer(email="bob@example.com", name="Bob")
                    unit.customers.add_all([ada, bob])
                    first, second = Tag(name="t1"), Tag(name="t2")
                    unit.tags.add_all([first, second])
                    unit.slots.add_all([Slot(day="mon", room="a", code="s1"), Slot(day="tue", room="b", code="s2")])
                    unit.products.add(Product(name="lamp"))
                    unit.orders.add_all(
                        [
                            Order(ref=orders[0], lines=[Line(sku=lines[0], qty=1), Line(sku=lines[1], qty=2)]),
                            Order(ref=orders[1], lines=[Line(sku=lines[2], qty=1)]),
                            Order(ref=orders[2]),
                        ]
                    )
                    unit.stocks.add(Stock(sku="lamp", qty=3))
                    unit.articles.add_all([Article(title=articles[0], tags=[first]), Article(title=articles[1])])
                    unit.employees.add_all([Employee(name=employees[0]), Engineer(name=employees[1])])
                    unit.vehicles.add_all([Vehicle(wheels=vehicles[0]), Truck(wheels=vehicles[1], payload=2)])
                    unit.customers.count()  # a flush: the customers get their keys
                    unit.memos.add_all(
                        [
                            Memo(text=memos[0], customer_id=ada.id),
                            Memo(text=memos[1], customer_id=bob.id),
                            Memo(text=memos[2], customer_id=None),
                        ]
                    )
                    unit.invoices.add(Invoice(total=invoice, customer_id=bob.id))
                    unit.addresses.add(Address(city=address, customer_id=ada.id))
                    unit.commit()

        # -- helpers -------------------------------------------------------

        def fresh(self, kind: str) -> Any:
            """A label never used before, for a new object or a renamed one."""
            self.counter += 1
            label: Any = self.counter if kind in NUMBERED else f"{kind}{self.counter}"
            self.labels[kind].append(label)
            return label

        def pick(self, kind: str, pick: int) -> Any:
            """A label given out before (counting back from the newest), or one that names nothing."""
            found = self.labels[kind]
            if found and pick < MISSING_PICK:
                return found[-1 - pick % len(found)]
            return -1 if kind in NUMBERED else "nothing"

        @property
        def ready(self) -> bool:
            return self.in_block and not self.poisoned

        @property
        def holding(self) -> bool:
            return any(side.held is not None for side in self.sides)

        def both(self, action: Callable[[Side], Any]) -> Any:
            fake, real = (outcome(lambda side=side: action(side)) for side in self.sides)
            assert fake == real
            if raised(fake) in POISONING:
                self.poisoned = True
            return fake

        def write(self, action: Callable[[Side], Any]) -> Any:
            self.wrote = True
            return self.both(action)

        # -- blocks and transactions ------------------------------------------

        @precondition(lambda self: not self.in_block)
        @rule()
        def enter(self) -> None:
            for side in self.sides:
                side.unit.__enter__()
            self.in_block = True
            self.wrote = False
            self.poisoned = False

        @precondition(lambda self: self.in_block)
        @rule(fail=st.booleans())
        def leave(self, fail: bool) -> None:
            error = Boom() if fail else None
            self.both(lambda side: side.unit.__exit__(type(error) if error else None, error, None))
            self.in_block = False
            self.stocks_seen.clear()
            assert self.sides[0].unit.rolled_back == self.sides[1].unit.rolled_back

        @precondition(lambda self: self.in_block)
        @rule(commit=st.booleans())
        def end_transaction(self, commit: bool) -> None:
            """Commit or roll back; the block goes on in a new transaction."""
            result = self.both(lambda side: side.unit.commit() if commit else side.unit.rollback())
            if not raised(result):
                self.committed = self.committed or (commit and self.wrote)
                self.wrote = False
                self.poisoned = False

        @precondition(lambda self: self.ready)
        @rule(part=st.sampled_from(sorted(LISTINGS)))
        def compare_repositories(self, part: str) -> None:
            """What the repositories of a part of the models list, with relationships, in primary-key order."""
            found = self.both(lambda side: LISTINGS[part](side.unit))
            if part == "stock" and not raised(found):
                self.stocks_seen.update(sku for sku, _, _ in found["stocks"])

        # -- customers: UNIQUE, NOT NULL, an Identity() key ----------------------------

        @precondition(lambda self: self.ready)
        @rule(email=EMAILS, name=NAMES)
        def add_customer(self, email: str, name: str | None) -> None:
            self.write(lambda side: side.unit.customers.add(Customer(email=email, name=name)))

        @precondition(lambda self: self.ready)
        @rule(email=EMAILS, name=NAMES)
        def rename_customer(self, email: str, name: str | None) -> None:
            def action(side: Side) -> Any:
                found = side.unit.customers.get_by(email=email)
                if found is not None:
                    found.name = name
                return found is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(email=EMAILS)
        def remove_customer(self, email: str) -> None:
            def action(side: Side) -> Any:
                found = side.unit.customers.get_by(email=email)
                if found is not None:
                    side.unit.customers.remove(found)
                return found is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(name=NAMES)
        def list_customers(self, name: str | None) -> None:
            filters = {} if name is None else {"name": name}
            self.both(lambda side: [(c.email, c.name) for c in side.unit.customers.list(**filters)])
            self.both(lambda side: side.unit.customers.count(**filters))

        @precondition(lambda self: self.ready)
        @rule(email=EMAILS)
        def get_with_a_string_key(self, email: str) -> None:
            """get() with the key as a string finds the row; a missing key as a string finds nothing."""

            def action(side: Side) -> Any:
                found = side.unit.customers.get_by(email=email)
                key = MISSING_KEY if found is None else found.id
                by_string = side.unit.customers.get(str(key))
                return None if by_string is None else (by_string.email, by_string.name, by_string is found)

            self.both(action)

        # -- memos (SET NULL), invoices (RESTRICT), addresses (CASCADE) ----------------

        def customer_key(self, side: Side, target: str) -> int | None:
            if target == "null":
                return None
            found = side.unit.customers.get_by(email=target) if target != "missing" else None
            return MISSING_KEY if found is None else found.id

        @precondition(lambda self: self.ready)
        @rule(kind=REFERENCES, points_to=TARGETS)
        def add_reference(self, kind: str, points_to: str) -> None:
            model, repository, field = REFERENCE_MODELS[kind]
            label = self.fresh(kind)

            def action(side: Side) -> Any:
                obj = model(**{field: label, "customer_id": self.customer_key(side, points_to)})
                getattr(side.unit, repository).add(obj)

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(kind=REFERENCES, pick=PICKS, points_to=st.none() | TARGETS)
        def change_reference(self, kind: str, pick: int, points_to: str | None) -> None:
            """Give a memo, invoice or address a new label, and maybe point it at another customer."""
            _, repository, field = REFERENCE_MODELS[kind]
            label = self.pick(kind, pick)
            new_label = self.fresh(kind)

            def action(side: Side) -> Any:
                found = getattr(side.unit, repository).get_by(**{field: label})
                if found is None:
                    return False
                setattr(found, field, new_label)
                if points_to is not None:
                    found.customer_id = self.customer_key(side, points_to)
                return True

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(kind=REFERENCES, pick=PICKS)
        def remove_reference(self, kind: str, pick: int) -> None:
            _, repository, field = REFERENCE_MODELS[kind]
            label = self.pick(kind, pick)

            def action(side: Side) -> Any:
                repo = getattr(side.unit, repository)
                found = repo.get_by(**{field: label})
                if found is not None:
                    repo.remove(found)
                return found is not None

            self.write(action)

        # -- slots: a composite UNIQUE constraint and a unique index ---------------------

        @precondition(lambda self: self.ready)
        @rule(day=DAYS, room=ROOMS, code=CODES)
        def add_slot(self, day: str, room: str, code: str) -> None:
            self.write(lambda side: side.unit.slots.add(Slot(day=day, room=room, code=code)))

        @precondition(lambda self: self.ready)
        @rule(
            changes=st.lists(
                st.tuples(CODES, st.just("code"), CODES)
                | st.tuples(CODES, st.just("day"), DAYS)
                | st.tuples(CODES, st.just("room"), ROOMS),
                max_size=3,
            )
        )
        def change_slots(self, changes: list[tuple[str, str, str]]) -> None:
            """Load some slots by code, change them, then flush the changes together."""

            def action(side: Side) -> Any:
                loaded = [(side.unit.slots.get_by(code=code), field, value) for code, field, value in changes]
                for slot, field, value in loaded:
                    if slot is not None:
                        setattr(slot, field, value)
                return side.unit.slots.count()

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(descending=st.booleans())
        def shift_codes(self, descending: bool) -> None:
            """Load the slots by code, in one order or the other, give each the next code, then flush."""
            codes = ["s1", "s2", "s3"]

            def action(side: Side) -> Any:
                loaded = [side.unit.slots.get_by(code=code) for code in sorted(codes, reverse=descending)]
                for slot in loaded:
                    if slot is not None:
                        slot.code = f"s{int(slot.code[1:]) + 1}"
                return side.unit.slots.count()

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(code=CODES)
        def remove_slot(self, code: str) -> None:
            def action(side: Side) -> Any:
                found = side.unit.slots.get_by(code=code)
                if found is not None:
                    side.unit.slots.remove(found)
                return found is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(day=st.none() | DAYS)
        def list_slots(self, day: str | None) -> None:
            filters = {} if day is None else {"day": day}
            self.both(lambda side: [(s.day, s.room, s.code) for s in side.unit.slots.list(**filters)])

        # -- products: a Sequence key --------------------------------------------------

        @precondition(lambda self: self.ready)
        @rule(named=st.booleans())
        def add_product(self, named: bool) -> None:
            name = f"product{self.counter}" if named else None
            self.counter += 1
            self.write(lambda side: side.unit.products.add(Product(name=name)))

        # -- orders and lines: one-to-many, delete and delete-orphan -------------------

        @precondition(lambda self: self.ready)
        @rule(quantities=st.lists(QUANTITIES, max_size=3))
        def add_order(self, quantities: list[int | None]) -> None:
            ref = self.fresh("order")
            skus = [self.fresh("line") for _ in quantities]

            def action(side: Side) -> None:
                order = Order(ref=ref)
                side.unit.orders.add(order)
                for sku, qty in zip(skus, quantities, strict=True):
                    order.lines.append(Line(sku=sku, qty=qty))

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, qty=QUANTITIES, directly=st.booleans())
        def add_line(self, pick: int, qty: int | None, directly: bool) -> None:
            """Append a line to an order's lines, or add it through the lines repository with the order's key."""
            ref = self.pick("order", pick)
            sku = self.fresh("line")

            def action(side: Side) -> Any:
                order = side.unit.orders.get_by(ref=ref)
                if directly:
                    key = MISSING_KEY if order is None else order.id
                    side.unit.lines.add(Line(sku=sku, qty=qty, order_id=key))
                elif order is not None:
                    order.lines.append(Line(sku=sku, qty=qty))
                return order is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, index=st.integers(min_value=0, max_value=3))
        def remove_line(self, pick: int, index: int) -> None:
            """Remove a line from its order's collection: delete-orphan deletes it."""
            ref = self.pick("order", pick)

            def action(side: Side) -> Any:
                order = side.unit.orders.get_by(ref=ref)
                if order is None or not order.lines:
                    return None
                line = sorted(order.lines, key=lambda each: each.sku)[index % len(order.lines)]
                order.lines.remove(line)
                return line.sku

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(source=PICKS, destination=PICKS, index=st.integers(min_value=0, max_value=3))
        def move_line(self, source: int, destination: int, index: int) -> None:
            """Append a line of one order to another order's lines."""
            source_ref, target_ref = self.pick("order", source), self.pick("order", destination)

            def action(side: Side) -> Any:
                source_order = side.unit.orders.get_by(ref=source_ref)
                target_order = side.unit.orders.get_by(ref=target_ref)
                if source_order is None or target_order is None or not source_order.lines:
                    return None
                line = sorted(source_order.lines, key=lambda each: each.sku)[index % len(source_order.lines)]
                target_order.lines.append(line)
                return line.sku

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS)
        def remove_order(self, pick: int) -> None:
            ref = self.pick("order", pick)

            def action(side: Side) -> Any:
                found = side.unit.orders.get_by(ref=ref)
                if found is not None:
                    side.unit.orders.remove(found)
                return found is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, hold=st.booleans())
        def read_order(self, pick: int, hold: bool) -> None:
            """Read an order and its lines; maybe hold it for later steps, in this block or after it."""
            ref = self.pick("order", pick)

            def action(side: Side) -> Any:
                found = side.unit.orders.get_by(ref=ref)
                if hold:
                    side.held = found
                return None if found is None else order_shown(found)

            self.both(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS)
        def hold_order_unread(self, pick: int) -> None:
            """Hold an order without reading its lines, which stay unloaded."""
            ref = self.pick("order", pick)

            def action(side: Side) -> Any:
                side.held = side.unit.orders.get_by(ref=ref)
                return side.held is not None

            self.both(action)

        @precondition(lambda self: self.holding)
        @rule()
        def read_held(self) -> None:
            """Read the held order, in its block, in a later transaction, or after its block."""
            self.both(lambda side: None if side.held is None else order_shown(side.held))

        @precondition(lambda self: self.holding)
        @rule()
        def rename_held(self) -> None:
            """Change the held order: stored by its block's commit, ignored after its block."""
            ref = self.fresh("order")

            def action(side: Side) -> Any:
                if side.held is not None:
                    side.held.ref = ref
                return side.held is not None

            self.write(action)

        @precondition(lambda self: self.ready and self.holding)
        @rule()
        def remove_held(self) -> None:
            def action(side: Side) -> Any:
                if side.held is not None:
                    side.unit.orders.remove(side.held)
                return side.held is not None

            self.write(action)

        # -- stocks: a version counter -------------------------------------------------

        @precondition(lambda self: self.ready)
        @rule(sku=SKUS, qty=QUANTITIES)
        def add_stock(self, sku: str, qty: int | None) -> None:
            if sku in self.stocks_seen:
                return
            self.stocks_seen.add(sku)
            self.write(lambda side: side.unit.stocks.add(Stock(sku=sku, qty=qty)))

        @precondition(lambda self: self.ready)
        @rule(sku=SKUS, qty=QUANTITIES)
        def replace_stock(self, sku: str, qty: int | None) -> None:
            """Remove a stock and add a new one with the same key, flushed together."""
            self.stocks_seen.add(sku)

            def action(side: Side) -> Any:
                found = side.unit.stocks.get(sku)
                if found is not None:
                    side.unit.stocks.remove(found)
                side.unit.stocks.add(Stock(sku=sku, qty=qty))
                return (found is not None, side.unit.stocks.count())

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(sku=SKUS, qty=QUANTITIES, remove=st.booleans())
        def change_stock(self, sku: str, qty: int | None, remove: bool) -> None:
            self.stocks_seen.add(sku)

            def action(side: Side) -> Any:
                found = side.unit.stocks.get(sku)
                if found is None:
                    return None
                if remove:
                    side.unit.stocks.remove(found)
                else:
                    found.qty = qty
                return found.version

            self.write(action)

        @precondition(lambda self: self.ready and not self.wrote)
        @rule(
            sku=SKUS,
            inner_qty=st.integers(min_value=0, max_value=3),
            outer=st.sampled_from(["read", "change", "remove"]),
        )
        def stale_stock(self, sku: str, inner_qty: int, outer: str) -> None:
            """The block reads a stock, a requires_new block changes and commits it, then the block writes it."""
            self.committed = True
            self.stocks_seen.add(sku)

            def action(side: Side) -> Any:
                unit = side.unit
                found = unit.stocks.get(sku)
                with unit.transaction(propagation="requires_new"):
                    inner = unit.stocks.get(sku)
                    if inner is not None:
                        inner.qty = inner_qty
                    unit.commit()
                if found is not None and outer == "change":
                    found.qty = inner_qty + 1
                elif found is not None and outer == "remove":
                    unit.stocks.remove(found)
                unit.commit()
                return None if found is None else found.version

            if not raised(self.write(action)):
                self.wrote = False

        # -- articles and tags: many-to-many -------------------------------------------

        @precondition(lambda self: self.ready)
        @rule(name=TAG_NAMES)
        def add_tag(self, name: str) -> None:
            self.write(lambda side: side.unit.tags.add(Tag(name=name)))

        @precondition(lambda self: self.ready)
        @rule(names=st.lists(TAG_NAMES, max_size=2))
        def add_article(self, names: list[str]) -> None:
            title = self.fresh("article")

            def action(side: Side) -> Any:
                tags = [side.unit.tags.get_by(name=name) for name in names]
                side.unit.articles.add(Article(title=title, tags=[tag for tag in tags if tag is not None]))
                return [tag is not None for tag in tags]

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, name=TAG_NAMES, again=st.booleans())
        def link(self, pick: int, name: str, again: bool) -> None:
            """Append a tag to an article's tags; with *again*, even if it is there already."""
            title = self.pick("article", pick)

            def action(side: Side) -> Any:
                article = side.unit.articles.get_by(title=title)
                tag = side.unit.tags.get_by(name=name)
                if article is None or tag is None:
                    return None
                if again or tag not in article.tags:
                    article.tags.append(tag)
                return len(article.tags)

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, name=TAG_NAMES)
        def unlink(self, pick: int, name: str) -> None:
            title = self.pick("article", pick)

            def action(side: Side) -> Any:
                article = side.unit.articles.get_by(title=title)
                tag = side.unit.tags.get_by(name=name)
                if article is None or tag is None or tag not in article.tags:
                    return None
                article.tags.remove(tag)
                return len(article.tags)

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, name=TAG_NAMES, article=st.booleans())
        def remove_article_or_tag(self, pick: int, name: str, article: bool) -> None:
            """Remove an article (its links go with it) or a tag (refused while an article links it)."""
            title = self.pick("article", pick)

            def action(side: Side) -> Any:
                if article:
                    repo, found = side.unit.articles, side.unit.articles.get_by(title=title)
                else:
                    repo, found = side.unit.tags, side.unit.tags.get_by(name=name)
                if found is not None:
                    repo.remove(found)
                return found is not None

            self.write(action)

        # -- employees and engineers: joined-table inheritance ------------------------------

        # -- a table that refers to itself without a relationship; a hierarchy without a discriminator --

        @precondition(lambda self: self.ready)
        @rule(parent=PICKS, child_first=st.booleans())
        def add_folders(self, parent: int, child_first: bool) -> None:
            """A new folder under an existing one (or at the top), and a child of it, added in either order."""
            above = None if parent == MISSING_PICK or not self.labels["folder"] else self.pick("folder", parent)
            middle, below = self.fresh("folder"), self.fresh("folder")

            def action(side: Side) -> Any:
                folders = [Folder(id=middle, parent_id=above), Folder(id=below, parent_id=middle)]
                side.unit.folders.add_all(folders[::-1] if child_first else folders)
                return side.unit.folders.count()  # a flush: the rows go in the order added

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS)
        def remove_folder(self, pick: int) -> None:
            """Remove a folder: refused while another folder refers to it."""
            key = self.pick("folder", pick)

            def action(side: Side) -> Any:
                found = side.unit.folders.get(key)
                if found is None:
                    return None
                side.unit.folders.remove(found)
                return side.unit.folders.count()

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(cat=st.booleans())
        def add_animal(self, cat: bool) -> None:
            key = self.fresh("animal")

            def action(side: Side) -> None:
                side.unit.animals.add(Cat(id=key, name=f"a{key}", lives=7) if cat else Animal(id=key, name=f"a{key}"))

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, as_cat=st.booleans())
        def read_animal(self, pick: int, as_cat: bool) -> None:
            """get() through the subclass's repository or the base's: each class has its own identities."""
            key = self.pick("animal", pick)

            def action(side: Side) -> Any:
                found = (side.unit.cats if as_cat else side.unit.animals).get(key)
                return None if found is None else (type(found).__name__, found.id, found.name)

            self.both(action)

        @precondition(lambda self: self.ready)
        @rule(engineer=st.booleans(), named=st.booleans(), language=LANGUAGES)
        def add_employee(self, engineer: bool, named: bool, language: str | None) -> None:
            name = self.fresh("employee") if named else None

            def action(side: Side) -> None:
                if engineer:
                    side.unit.employees.add(Engineer(name=name, language=language))
                else:
                    side.unit.employees.add(Employee(name=name))

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, rename=st.booleans(), language=LANGUAGES)
        def change_employee(self, pick: int, rename: bool, language: str | None) -> None:
            """Rename an employee, or set an engineer's language (None is refused: the column is NOT NULL)."""
            name = self.pick("employee", pick)
            new_name = self.fresh("employee") if rename else None

            def action(side: Side) -> Any:
                found = side.unit.employees.get_by(name=name)
                if found is None:
                    return None
                if new_name is not None:
                    found.name = new_name
                elif isinstance(found, Engineer):
                    found.language = language
                return employee_shown(found)

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS)
        def remove_employee(self, pick: int) -> None:
            name = self.pick("employee", pick)

            def action(side: Side) -> Any:
                found = side.unit.employees.get_by(name=name)
                if found is not None:
                    side.unit.employees.remove(found)
                return found is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(kind=st.none() | st.sampled_from(["employee", "engineer"]))
        def list_employees(self, kind: str | None) -> None:
            filters = {} if kind is None else {"kind": kind}
            self.both(lambda side: [employee_shown(e) for e in side.unit.employees.list(**filters)])
            self.both(lambda side: side.unit.employees.count(**filters))

        # -- vehicles and trucks: single-table inheritance ------------------------------

        @precondition(lambda self: self.ready)
        @rule(truck=st.booleans(), wheeled=st.booleans(), payload=PAYLOADS)
        def add_vehicle(self, truck: bool, wheeled: bool, payload: int | None) -> None:
            wheels = self.fresh("vehicle") if wheeled else None

            def action(side: Side) -> None:
                if truck:
                    side.unit.vehicles.add(Truck(wheels=wheels, payload=payload))
                else:
                    side.unit.vehicles.add(Vehicle(wheels=wheels))

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS, rewheel=st.sampled_from(["fresh", "null", "keep"]), payload=PAYLOADS)
        def change_vehicle(self, pick: int, rewheel: str, payload: int | None) -> None:
            wheels = self.pick("vehicle", pick)
            new_wheels = self.fresh("vehicle") if rewheel == "fresh" else None

            def action(side: Side) -> Any:
                found = side.unit.vehicles.get_by(wheels=wheels)
                if found is None:
                    return None
                if rewheel != "keep":
                    found.wheels = new_wheels
                if isinstance(found, Truck):
                    found.payload = payload
                return vehicle_shown(found)

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(pick=PICKS)
        def remove_vehicle(self, pick: int) -> None:
            wheels = self.pick("vehicle", pick)

            def action(side: Side) -> Any:
                found = side.unit.vehicles.get_by(wheels=wheels)
                if found is not None:
                    side.unit.vehicles.remove(found)
                return found is not None

            self.write(action)

        @precondition(lambda self: self.ready)
        @rule(kind=st.none() | st.sampled_from(["vehicle", "truck"]))
        def list_vehicles(self, kind: str | None) -> None:
            filters = {} if kind is None else {"kind": kind}
            self.both(lambda side: [vehicle_shown(v) for v in side.unit.vehicles.list(**filters)])

        # -- the committed rows ----------------------------------------------------------

        @invariant()
        def committed_rows_agree(self) -> None:
            # The database's committed rows change only when a step commits what it wrote:
            # read them again after such a step, or when the fake's committed rows changed.
            fake = canonical(self.sides[0].unit.database.rows)
            if fake == self.agreed and not self.committed:
                return
            with engine.connect() as conn:
                real = canonical(lambda table: [dict(row._mapping) for row in conn.execute(table.select())])
            assert fake == real
            self.agreed, self.committed = fake, False

        def teardown(self) -> None:
            if self.in_block:
                exits = [outcome(lambda side=side: side.unit.__exit__(None, None, None)) for side in self.sides]
                assert exits == [None, None]

    return ModelAgreement


LOCK_TIMEOUTS: dict[str, dict[str, Any]] = {
    "postgresql": {"options": "-c lock_timeout=5000"},
    "mariadb": {"init_command": "SET SESSION innodb_lock_wait_timeout = 5"},
}


@pytest.fixture(scope="module")
def fidelity_engines() -> dict[str, Engine]:
    """The engines with the fidelity tables made so far in this module, by backend."""
    return {}


@pytest.fixture
def fidelity_engine(database: Database, provisioner: Provisioner, fidelity_engines: dict[str, Engine]) -> Engine:
    """An engine on the run's database with the fidelity tables, created once per backend (the machine empties them)."""
    eng = fidelity_engines.get(database.backend)
    if eng is None:
        # A wait for a lock fails after a few seconds instead of hanging the run.
        eng = provisioner.track(database.engine(connect_args=LOCK_TIMEOUTS.get(database.backend, {})))
        if database.backend == "sqlite":
            enforce_foreign_keys(eng)
        metadata.create_all(eng)
        fidelity_engines[database.backend] = eng
    return eng


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_fake_and_database_agree_on_the_fidelity_models(fidelity_engine: Engine) -> None:
    """Random operations on constrained, related and inherited models give the same results on fake and database."""
    machine = make_machine(fidelity_engine)
    machine.TestCase.settings = settings(
        max_examples=50,
        derandomize=True,
        stateful_step_count=30,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
