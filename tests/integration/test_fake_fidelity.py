"""What a real database does, stated once and run on every implementation: the fakes must do the same.

Each test runs on the sync fake, the async fake, and ``SqlAlchemyUnitOfWork``
on SQLite (with foreign keys enforced), PostgreSQL and MariaDB. The test
bodies are sync: the async fake is driven through :class:`SyncUnit`, which
runs every call in one asyncio task. On a database, what a test stored is read
back through a separate connection; on a fake, in a new block.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect as pyinspect
from collections.abc import Callable, Coroutine, Iterator
from operator import attrgetter
from typing import Any

import attrs
import pytest
from sqlalchemy import Engine, event, inspect, select
from sqlalchemy.exc import IntegrityError, PendingRollbackError, ProgrammingError
from sqlalchemy.orm.exc import DetachedInstanceError, StaleDataError

import uow
from tests.integration.conftest import rows
from tests.support.databases import Provisioner
from tests.support.fidelity import (
    REPOSITORIES,
    Account,
    Address,
    Animal,
    Apple,
    Article,
    AsyncFakeFidelityUnitOfWork,
    Basket,
    Cat,
    Course,
    Customer,
    Employee,
    Engineer,
    FakeFidelityUnitOfWork,
    Folder,
    Fruit,
    Invoice,
    Line,
    Memo,
    Node,
    Note,
    Order,
    Product,
    Slot,
    SqlFidelityUnitOfWork,
    Stock,
    Student,
    Tag,
    Truck,
    Vehicle,
    enforce_foreign_keys,
    metadata,
)
from uow import errors

IMPLEMENTATIONS = ("fake", "async-fake", "sqlite", "postgresql", "mariadb")
FAKES = ("fake", "async-fake")


# -- driving the async fake with sync calls ------------------------------------


class TaskRunner:
    """Runs coroutines one after the other in one long-lived asyncio task.

    An async unit of work belongs to the task that entered it, so every call
    of a test, from ``__aenter__`` to ``__aexit__``, must run in the same
    task: this one. The loop runs only while a call is waited for.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._jobs: asyncio.Queue[tuple[Coroutine[Any, Any, Any], asyncio.Future[Any]]] = asyncio.Queue()
        self._worker = self.loop.create_task(self._work())

    async def _work(self) -> None:
        while True:
            coro, done = await self._jobs.get()
            try:
                result = await coro
            except Exception as error:
                done.set_exception(error)
            else:
                done.set_result(result)

    async def _submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        done = asyncio.get_running_loop().create_future()
        await self._jobs.put((coro, done))
        return await done

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(self._submit(coro))

    def close(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._worker)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


async def _read(obj: object, name: str) -> Any:
    return getattr(obj, name)


class SyncRepository:
    """An async repository whose methods are called like sync ones."""

    def __init__(self, repo: uow.AsyncRepository[Any], runner: TaskRunner) -> None:
        self._repo = repo
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._repo, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            return self._runner.run(result) if pyinspect.iscoroutine(result) else result

        return call


class SyncBlock:
    """``with unit.transaction(...):`` on an async unit of work."""

    def __init__(self, block: Any, owner: SyncUnit) -> None:
        self._block = block
        self._owner = owner

    def __enter__(self) -> SyncUnit:
        self._owner.runner.run(self._block.__aenter__())
        return self._owner

    def __exit__(self, *exc_info: Any) -> None:
        self._owner.runner.run(self._block.__aexit__(*exc_info))


class SyncUnit:
    """An async unit of work used with ``with``, ``commit()`` and sync repositories; each call runs in the runner."""

    def __init__(self, unit: uow.AsyncUnitOfWork, runner: TaskRunner) -> None:
        self.wrapped = unit
        self.runner = runner

    def __enter__(self) -> SyncUnit:
        self.runner.run(self.wrapped.__aenter__())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.runner.run(self.wrapped.__aexit__(*exc_info))

    def commit(self) -> None:
        self.runner.run(self.wrapped.commit())

    def rollback(self) -> None:
        self.runner.run(self.wrapped.rollback())

    def transaction(self, **kwargs: Any) -> SyncBlock:
        return SyncBlock(self.wrapped.transaction(**kwargs), self)

    def savepoint(self) -> SyncBlock:
        return SyncBlock(self.wrapped.savepoint(), self)

    def __getattr__(self, name: str) -> Any:
        attr = self.runner.run(_read(self.wrapped, name))  # the repositories answer only in the owner's task
        return SyncRepository(attr, self.runner) if isinstance(attr, uow.AsyncRepository) else attr


# -- the implementations -------------------------------------------------------


@attrs.define
class Implementation:
    """One implementation under test: its unit of work, used with sync calls, and how to read what it stored."""

    name: str
    uow: Any
    engine: Engine | None = None
    #: Builds another unit of work of this implementation, on the same data, with the options given.
    build: Callable[..., Any] | None = None

    def stored_rows(self, sql: str, read: Callable[[Any], list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        """Stored rows, sorted: on a database *sql* through a separate connection, on a fake *read* in a new block."""
        if self.engine is not None:
            found = rows(self.engine, sql)
        else:
            with self.uow as unit:
                found = read(unit)
        return sorted(found, key=repr)

    def stored(self, model: type[Any], *fields: str) -> list[tuple[Any, ...]]:
        """The stored rows of *model* (a root model, or a joined subclass), as tuples of *fields*, sorted."""
        mapper = inspect(model)
        statement = select(*(mapper.columns[field] for field in fields)).select_from(mapper.selectable)
        sql = str(statement.compile(self.engine)) if self.engine is not None else ""

        def read(unit: Any) -> list[tuple[Any, ...]]:
            found = getattr(unit, REPOSITORIES[model]).list()
            return [tuple(getattr(obj, field) for field in fields) for obj in found if isinstance(obj, model)]

        return self.stored_rows(sql, read)


def fidelity_engine(backend: str, provisioner: Provisioner, engines: dict[str, Engine]) -> Engine:
    """The backend's engine with the fidelity tables, created on first use in this run and emptied now."""
    eng = engines.get(backend)
    if eng is None:
        eng = provisioner.track(provisioner.database(backend).engine())
        if backend == "sqlite":
            enforce_foreign_keys(eng)
        metadata.create_all(eng)
        engines[backend] = eng
    with eng.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            own = [fk.parent for fk in table.foreign_keys if fk.column.table is table]
            if own:  # MariaDB checks a foreign key row by row: a parent deleted before its child is refused
                conn.execute(table.update().values({column.key: None for column in own}))
            conn.execute(table.delete())
    return eng


@pytest.fixture(scope="module")
def fidelity_engines() -> dict[str, Engine]:
    """The engines made so far in this run, by backend; the run's database drop removes their tables."""
    return {}


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(
    request: pytest.FixtureRequest, provisioner: Provisioner, fidelity_engines: dict[str, Engine]
) -> Iterator[Implementation]:
    """Each implementation in turn, empty."""
    name: str = request.param
    if name == "fake":
        fake = FakeFidelityUnitOfWork()

        def build_fake(**options: Any) -> Any:
            other = FakeFidelityUnitOfWork(**options)
            other.database = fake.database  # the same data, as a second unit of work on one database
            return other

        yield Implementation(name, fake, build=build_fake)
    elif name == "async-fake":
        runner = TaskRunner()
        async_fake = AsyncFakeFidelityUnitOfWork()

        def build_async_fake(**options: Any) -> Any:
            other = AsyncFakeFidelityUnitOfWork(**options)
            other.database = async_fake.database
            return SyncUnit(other, runner)

        try:
            yield Implementation(name, SyncUnit(async_fake, runner), build=build_async_fake)
        finally:
            runner.close()
    else:
        eng = fidelity_engine(name, provisioner, fidelity_engines)
        yield Implementation(
            name, SqlFidelityUnitOfWork(eng), eng, build=lambda **options: SqlFidelityUnitOfWork(eng, **options)
        )


def seed(unit: Any, *objs: object) -> None:
    """Add *objs* through their repositories and commit; their generated keys are set afterwards."""
    with unit:
        for obj in objs:
            getattr(unit, REPOSITORIES[type(obj)]).add(obj)
        unit.commit()


def refused_at_flush(unit: Any) -> None:
    """The next query flushes and raises IntegrityError; the block refuses queries until rolled back."""
    with pytest.raises(IntegrityError):
        unit.customers.count()
    with pytest.raises(PendingRollbackError):
        unit.customers.count()
    unit.rollback()
    unit.customers.count()
    unit.commit()  # commits nothing: the rollback discarded the refused work


# -- constraints -----------------------------------------------------------------


def test_duplicate_unique_column_is_refused(implementation: Implementation) -> None:
    """A value already in a UNIQUE column raises IntegrityError at flush, and the block must roll back."""
    unit = implementation.uow
    seed(unit, Customer(email="ada@example.com", name="Ada"))
    with unit:
        unit.customers.add(Customer(email="ada@example.com", name="Another Ada"))
        refused_at_flush(unit)
    assert [("ada@example.com", "Ada")] == implementation.stored(Customer, "email", "name")


def test_duplicate_composite_unique_is_refused(implementation: Implementation) -> None:
    """A (day, room) pair already taken raises IntegrityError at flush; the same day in another room does not."""
    unit = implementation.uow
    seed(unit, Slot(day="mon", room="a", code="s1"), Slot(day="mon", room="b", code="s2"))
    with unit:
        unit.slots.add(Slot(day="mon", room="a", code="s3"))
        refused_at_flush(unit)
    assert [("mon", "a", "s1"), ("mon", "b", "s2")] == implementation.stored(Slot, "day", "room", "code")


def test_duplicate_unique_index_value_is_refused(implementation: Implementation) -> None:
    """A value already in a column with a unique index raises IntegrityError at flush."""
    unit = implementation.uow
    seed(unit, Slot(day="mon", room="a", code="s1"))
    with unit:
        unit.slots.add(Slot(day="tue", room="a", code="s1"))
        refused_at_flush(unit)
    assert [("mon", "a", "s1")] == implementation.stored(Slot, "day", "room", "code")


def test_null_in_not_null_column_is_refused(implementation: Implementation) -> None:
    """None in a NOT NULL column raises IntegrityError at flush."""
    unit = implementation.uow
    with unit:
        unit.stocks.add(Stock(sku="lamp", qty=None))  # the key is given: only the NULL can be refused
        refused_at_flush(unit)
    assert [] == implementation.stored(Stock, "sku")


def test_foreign_key_to_a_missing_row_is_refused(implementation: Implementation) -> None:
    """A foreign key that names no row raises IntegrityError at flush."""
    unit = implementation.uow
    with unit:
        unit.invoices.add(Invoice(total=10, customer_id=999_999))
        refused_at_flush(unit)
    assert [] == implementation.stored(Invoice, "total")


def test_deleting_a_row_still_referenced_is_refused(implementation: Implementation) -> None:
    """Deleting a row that an ON DELETE RESTRICT foreign key still references raises IntegrityError at flush."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    seed(unit, Invoice(total=10, customer_id=customer.id))
    with unit:
        unit.customers.remove(unit.customers.get(customer.id))
        refused_at_flush(unit)
    assert [("ada@example.com",)] == implementation.stored(Customer, "email")
    assert [(10, customer.id)] == implementation.stored(Invoice, "total", "customer_id")


def test_a_child_before_its_parent_in_a_self_referencing_table_is_refused(implementation: Implementation) -> None:
    """Without a relationship, rows go in the order added: a child written before its parent is refused at flush."""
    unit = implementation.uow
    with unit:
        unit.folders.add_all([Folder(id=2, parent_id=1), Folder(id=1)])
        refused_at_flush(unit)
    seed(unit, Folder(id=1), Folder(id=2, parent_id=1))  # parents first: accepted
    assert [(1, None), (2, 1)] == implementation.stored(Folder, "id", "parent_id")


def test_on_delete_cascade_deletes_the_referencing_rows(implementation: Implementation) -> None:
    """Deleting a row deletes the rows whose ON DELETE CASCADE foreign key refers to it; no ORM relationship acts."""
    unit = implementation.uow
    customer, other = Customer(email="ada@example.com", name="Ada"), Customer(email="bob@example.com", name="Bob")
    seed(unit, customer, other)
    seed(unit, Address(city="London", customer_id=customer.id), Address(city="Paris", customer_id=other.id))
    with unit:
        unit.customers.remove(unit.customers.get(customer.id))
        unit.commit()
    assert [("Paris", other.id)] == implementation.stored(Address, "city", "customer_id")


def test_on_delete_set_null_clears_the_referencing_column(implementation: Implementation) -> None:
    """Deleting a row sets NULL in the ON DELETE SET NULL foreign keys that refer to it; no ORM relationship acts."""
    unit = implementation.uow
    customer, other = Customer(email="ada@example.com", name="Ada"), Customer(email="bob@example.com", name="Bob")
    seed(unit, customer, other)
    seed(unit, Memo(text="call back", customer_id=customer.id), Memo(text="vip", customer_id=other.id))
    with unit:
        unit.customers.remove(unit.customers.get(customer.id))
        unit.commit()
    assert [("call back", None), ("vip", other.id)] == implementation.stored(Memo, "text", "customer_id")


# -- concurrent transactions -----------------------------------------------------


def test_version_counter_refuses_a_stale_update(implementation: Implementation) -> None:
    """An update of a row whose version another transaction changed since it was read raises StaleDataError."""
    unit = implementation.uow
    seed(unit, Stock(sku="lamp", qty=10))
    with unit:
        outer = unit.stocks.get("lamp")
        with unit.transaction(propagation="requires_new"):
            unit.stocks.get("lamp").qty = 7
            unit.commit()
        outer.qty = 5
        with pytest.raises(errors.ConcurrencyError) as raised:
            unit.commit()
        assert isinstance(raised.value.__cause__, StaleDataError)
    assert [("lamp", 7, 2)] == implementation.stored(Stock, "sku", "qty", "version")


def test_a_stale_update_leaving_the_block_is_a_concurrency_error(implementation: Implementation) -> None:
    """A StaleDataError that a flush raises inside a block leaves it as ConcurrencyError, with it as the cause."""
    unit = implementation.uow
    seed(unit, Stock(sku="lamp", qty=10))
    with pytest.raises(errors.ConcurrencyError) as raised, unit:
        outer = unit.stocks.get("lamp")
        with unit.transaction(propagation="requires_new"):
            unit.stocks.get("lamp").qty = 7
            unit.commit()
        outer.qty = 5
        unit.stocks.list()  # the autoflush finds the conflict
    assert isinstance(raised.value.__cause__, StaleDataError)
    assert [("lamp", 7, 2)] == implementation.stored(Stock, "sku", "qty", "version")


def test_upsert_moves_the_version_counter_and_stales_a_loaded_copy(implementation: Implementation) -> None:
    """An upsert inserts version 1 and counts it up on a conflict, so a copy read before it is stale."""
    unit = implementation.uow
    with unit:
        assert 1 == unit.stocks.upsert(Stock(sku="lamp", qty=10)).version
        unit.commit()
    with unit:
        outer = unit.stocks.get("lamp")
        with unit.transaction(propagation="requires_new"):
            assert (2, 4) == attrgetter("version", "qty")(unit.stocks.upsert({"sku": "lamp", "qty": 4}))
            unit.commit()
        outer.qty = 5
        with pytest.raises(StaleDataError):
            unit.commit()
    assert [("lamp", 4, 2)] == implementation.stored(Stock, "sku", "qty", "version")


def test_requires_new_changes_survive_the_outer_commit(implementation: Implementation) -> None:
    """What a requires_new block committed stays when the outer block, which only read, commits after it."""
    unit = implementation.uow
    first, second = Customer(email="ada@example.com", name="Ada"), Customer(email="bob@example.com", name="Bob")
    seed(unit, first, second)
    with unit:
        assert "Ada" == unit.customers.get(first.id).name
        with unit.transaction(propagation="requires_new"):
            unit.customers.get(first.id).name = "Ada Lovelace"
            unit.customers.remove(unit.customers.get(second.id))
            unit.commit()
        unit.commit()
    assert [("ada@example.com", "Ada Lovelace")] == implementation.stored(Customer, "email", "name")


def test_an_update_writes_only_the_columns_it_changed(implementation: Implementation) -> None:
    """An outer block's update of one column keeps what a requires_new block committed to another column of the row."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        outer = unit.customers.get(customer.id)
        with unit.transaction(propagation="requires_new"):
            unit.customers.get(customer.id).email = "lovelace@example.com"
            unit.commit()
        outer.name = "Ada Lovelace"
        unit.commit()
    assert [("lovelace@example.com", "Ada Lovelace")] == implementation.stored(Customer, "email", "name")


# -- generated keys --------------------------------------------------------------


def test_identity_key_is_generated(implementation: Implementation) -> None:
    """An Identity() key left unset gets an integer at the flush, and the row is stored with it."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    with unit:
        unit.customers.add(customer)
        unit.commit()
    assert isinstance(customer.id, int)
    assert [(customer.id, "ada@example.com")] == implementation.stored(Customer, "id", "email")


def test_a_generated_key_is_set_without_an_attribute_event(implementation: Implementation) -> None:
    """The key a flush generates is not a "set" event, as the ORM stores the key its INSERT returned."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    keys_set: list[Any] = []

    def record(target: object, value: Any, old: Any, initiator: object) -> None:
        keys_set.append(value)

    event.listen(Customer.id, "set", record)
    try:
        with unit:
            unit.customers.add(customer)
            unit.commit()
    finally:
        event.remove(Customer.id, "set", record)
    assert isinstance(customer.id, int)
    assert keys_set == []
    assert not inspect(customer).attrs.id.history.has_changes()


#: Where two transactions write at once and a number a rollback gave up is not handed out again. SQLite lets one
#: transaction write at a time, and numbers a row one past the highest stored, so it reuses a rolled-back number.
SEQUENCES = ("fake", "async-fake", "postgresql", "mariadb")


@pytest.mark.parametrize("implementation", SEQUENCES, indirect=True)
def test_two_open_transactions_get_generated_keys_of_their_own(implementation: Implementation) -> None:
    """A requires_new block inserting beside the outer block's new, uncommitted row gets a different key.

    On a table with no unique column but its key: MariaDB's next-key locks on a unique index can make the
    second INSERT wait for the first transaction, which is not about the keys.
    """
    unit = implementation.uow
    outer, inner = Product(name="lamp"), Product(name="desk")
    with unit:
        unit.products.add(outer)
        assert unit.products.count() == 1  # its autoflush numbers the outer row, which stays uncommitted
        with unit.transaction(propagation="requires_new"):
            unit.products.add(inner)
            unit.commit()
        unit.commit()
    assert outer.id != inner.id
    assert sorted([(outer.id, "lamp"), (inner.id, "desk")]) == sorted(implementation.stored(Product, "id", "name"))


@pytest.mark.parametrize("implementation", SEQUENCES, indirect=True)
def test_a_generated_key_given_up_by_a_rollback_is_not_handed_out_again(implementation: Implementation) -> None:
    """The number of an insert that rolled back is not given to the next insert, as a sequence does."""
    unit = implementation.uow
    dropped = Product(name="lamp")
    with unit:
        unit.products.add(dropped)
        assert unit.products.count() == 1
        unit.rollback()
    kept = Product(name="desk")
    seed(unit, kept)
    assert dropped.id is not None
    assert kept.id > dropped.id
    assert [(kept.id, "desk")] == implementation.stored(Product, "id", "name")


def test_objects_of_a_failed_flush_can_be_added_again(implementation: Implementation) -> None:
    """A flush refused by NOT NULL leaves its new objects without a key; added again later, they are stored."""
    unit = implementation.uow
    ada, nameless = Customer(email="ada@example.com", name="Ada"), Customer(email="bob@example.com", name=None)
    with unit:
        unit.customers.add_all([ada, nameless])
        with pytest.raises(IntegrityError):
            unit.commit()
    assert ada.id is None
    seed(unit, Customer(email="cy@example.com", name="Cy"))
    seed(unit, ada)
    assert ["ada@example.com", "cy@example.com"] == sorted(
        email for (email,) in implementation.stored(Customer, "email")
    )


def test_values_of_another_python_type_are_stored_as_their_columns_store_them(implementation: Implementation) -> None:
    """'30' for an integer column is stored as 30, a key given as '2' as 2: queries by the integers find them."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    seed(
        unit, Invoice(id=1, total="30", customer_id=str(customer.id)), Invoice(id="2", total=5, customer_id=customer.id)
    )
    with unit:
        found = unit.invoices.get_by(total=30)
        assert found is not None
        assert (found.id, found.total) == (1, 30)
        assert [1, 2] == [each.id for each in unit.invoices.list(customer_id=customer.id)]
        assert unit.invoices.get(2).total == 5
    assert [(1, 30), (2, 5)] == implementation.stored(Invoice, "id", "total")


def test_changing_a_unique_value_that_a_foreign_key_refers_to_is_refused(implementation: Implementation) -> None:
    """A unique column that another table's foreign key refers to keeps its value: changing it raises at flush."""
    unit = implementation.uow
    seed(unit, Account(id=1, handle="ada"))
    seed(unit, Note(id=1, handle="ada"))
    with unit:
        unit.accounts.get(1).handle = "bob"
        with pytest.raises(IntegrityError):
            unit.commit()
    with unit:  # a value nobody refers to may change
        unit.accounts.add(Account(id=2, handle="cy"))
        unit.commit()
    with unit:
        unit.accounts.get(2).handle = "dan"
        unit.commit()
    assert [(1, "ada"), (2, "dan")] == implementation.stored(Account, "id", "handle")
    assert [(1, "ada")] == implementation.stored(Note, "id", "handle")


def test_a_collection_first_read_in_a_rolled_back_savepoint_is_read_again_after_it(
    implementation: Implementation,
) -> None:
    """A lazy collection first loaded inside a savepoint that rolls back loads again when read after it."""
    unit = implementation.uow
    seed(unit, Order(id=1, ref="o1", lines=[Line(id=1, sku="a", qty=1), Line(id=2, sku="b", qty=2)]))
    with unit:
        order = unit.orders.get(1)
        with pytest.raises(ValueError, match="undo"), unit.savepoint():
            assert len(order.lines) == 2
            raise ValueError("undo")
        assert sorted(line.sku for line in order.lines) == ["a", "b"]


def test_a_version_counter_set_by_the_program_is_counted_on_insert_and_written_on_update(
    implementation: Implementation,
) -> None:
    """An INSERT writes the counter's first value whatever the object held; an UPDATE writes a value the program set."""
    unit = implementation.uow
    stock = Stock(sku="S", qty=1, version=7)
    seed(unit, stock)
    assert [("S", 1)] == implementation.stored(Stock, "sku", "version")
    with unit:
        loaded = unit.stocks.get("S")
        loaded.version = 10
        loaded.qty = 5
        unit.commit()
    assert [("S", 5, 10)] == implementation.stored(Stock, "sku", "qty", "version")
    with unit:
        unit.stocks.get("S").qty = 6
        unit.commit()
    assert [("S", 6, 11)] == implementation.stored(Stock, "sku", "qty", "version")


def test_a_bulk_insert_writes_the_version_counters_first_value(implementation: Implementation) -> None:
    """add_all(bulk=True) writes the counter's first value whatever the objects held, as the ORM's bulk INSERT."""
    unit = implementation.uow
    with unit:
        unit.stocks.add_all([Stock(sku="A", qty=1, version=7), Stock(sku="B", qty=2)], bulk=True)
        unit.commit()
    assert [("A", 1), ("B", 1)] == implementation.stored(Stock, "sku", "version")


def test_a_row_switch_writes_a_version_the_program_set(implementation: Implementation) -> None:
    """Removing a versioned row and adding one with its key in one flush is an UPDATE that writes the version given."""
    unit = implementation.uow
    seed(unit, Stock(sku="S", qty=1))
    with unit:
        unit.stocks.remove(unit.stocks.get("S"))
        unit.stocks.add(Stock(sku="S", qty=5, version=40))
        unit.commit()
    assert [("S", 5, 40)] == implementation.stored(Stock, "sku", "qty", "version")


def test_sequence_key_is_generated(implementation: Implementation) -> None:
    """A Sequence key left unset gets an integer at the flush, and the row is stored with it."""
    unit = implementation.uow
    product = Product(name="lamp")
    with unit:
        unit.products.add(product)
        unit.commit()
    assert isinstance(product.id, int)
    assert [(product.id, "lamp")] == implementation.stored(Product, "id", "name")


# -- relationships ---------------------------------------------------------------


def test_child_of_a_new_parent_gets_its_foreign_key(implementation: Implementation) -> None:
    """A line appended to a new order gets the order's key in its foreign key at the flush, and queries find it."""
    unit = implementation.uow
    with unit:
        order, line = Order(ref="o1"), Line(sku="lamp", qty=1)
        order.lines.append(line)
        unit.orders.add(order)
        unit.commit()
        assert order.id == line.order_id
        assert [line.id] == [found.id for found in unit.lines.list(order_id=order.id)]
    assert [(order.id, "lamp")] == implementation.stored(Line, "order_id", "sku")


def test_child_appended_to_a_loaded_parent_gets_its_foreign_key(implementation: Implementation) -> None:
    """A line appended to an order loaded from the database is added with the order's key, and queries find it."""
    unit = implementation.uow
    order = Order(ref="o1", lines=[Line(sku="lamp", qty=1)])
    seed(unit, order)
    with unit:
        loaded = unit.orders.get(order.id)
        line = Line(sku="desk", qty=2)
        loaded.lines.append(line)
        assert ["desk", "lamp"] == sorted(found.sku for found in unit.lines.list(order_id=order.id))
        assert order.id == line.order_id
        unit.commit()
    assert [(order.id, "desk"), (order.id, "lamp")] == implementation.stored(Line, "order_id", "sku")


def test_unloaded_relationship_is_unreadable_after_the_block(implementation: Implementation) -> None:
    """After a block, a lazy relationship it never read raises DetachedInstanceError; one it read stays readable."""
    unit = implementation.uow
    first, second = Order(ref="o1", lines=[Line(sku="lamp", qty=1)]), Order(ref="o2", lines=[Line(sku="desk", qty=1)])
    seed(unit, first, second)
    with unit:
        untouched = unit.orders.get(first.id)
        touched = unit.orders.get(second.id)
        assert ["desk"] == [line.sku for line in touched.lines]
    with pytest.raises(DetachedInstanceError):
        untouched.lines
    assert ["desk"] == [line.sku for line in touched.lines]


def test_removing_a_parent_deletes_its_children(implementation: Implementation) -> None:
    """Removing an order deletes its lines, through the relationship's delete cascade."""
    unit = implementation.uow
    first, second = Order(ref="o1", lines=[Line(sku="lamp", qty=1)]), Order(ref="o2", lines=[Line(sku="desk", qty=1)])
    seed(unit, first, second)
    with unit:
        unit.orders.remove(unit.orders.get(first.id))
        unit.commit()
    assert [(second.id, "desk")] == implementation.stored(Line, "order_id", "sku")


def test_child_removed_from_its_collection_is_deleted(implementation: Implementation) -> None:
    """A line removed from its order's lines is deleted at the flush (delete-orphan)."""
    unit = implementation.uow
    order = Order(ref="o1", lines=[Line(sku="lamp", qty=1), Line(sku="desk", qty=2)])
    seed(unit, order)
    with unit:
        loaded = unit.orders.get(order.id)
        loaded.lines.remove(next(line for line in loaded.lines if line.sku == "lamp"))
        unit.commit()
    assert [(order.id, "desk")] == implementation.stored(Line, "order_id", "sku")


def test_many_to_many_link_is_a_stored_row(implementation: Implementation) -> None:
    """Appending a tag to an article stores an association row; removing it deletes that row, not the tag."""
    unit = implementation.uow
    article, tag = Article(title="Fakes"), Tag(name="testing")
    seed(unit, article, tag)

    def links() -> list[tuple[Any, ...]]:
        return implementation.stored_rows(
            "SELECT article_id, tag_id FROM fid_article_tags",
            lambda unit: [(found.id, linked.id) for found in unit.articles.list() for linked in found.tags],
        )

    with unit:
        unit.articles.get(article.id).tags.append(unit.tags.get(tag.id))
        unit.commit()
    assert [(article.id, tag.id)] == links()
    with unit:
        loaded = unit.articles.get(article.id)
        loaded.tags.remove(loaded.tags[0])
        unit.commit()
    assert [] == links()
    assert [(tag.id, "testing")] == implementation.stored(Tag, "id", "name")


# -- inheritance -----------------------------------------------------------------


def test_joined_subclass_is_stored_and_returned_whole(implementation: Implementation) -> None:
    """An Engineer gets its Python default, a later change to its own column is stored, the base repository finds it."""
    unit = implementation.uow
    engineer, clerk = Engineer(name="Ada"), Employee(name="Bob")
    with unit:
        unit.employees.add_all([engineer, clerk])
        unit.commit()
        assert "python" == engineer.language
    with unit:
        loaded = unit.employees.get(engineer.id)
        assert Engineer is type(loaded)
        loaded.language = "rust"
        unit.commit()
    with unit:
        assert {("Ada", Engineer), ("Bob", Employee)} == {(found.name, type(found)) for found in unit.employees.list()}
    assert [("Ada", "rust")] == implementation.stored(Engineer, "name", "language")
    assert [("Ada", "engineer"), ("Bob", "employee")] == implementation.stored(Employee, "name", "kind")


def test_joined_subclass_without_a_discriminator_is_found_by_its_own_repository(
    implementation: Implementation,
) -> None:
    """Without a discriminator, a subclass's get() and list() find it whole, the base's find base objects, apart."""
    unit = implementation.uow
    seed(unit, Cat(id=3, name="tom", lives=7), Animal(id=4, name="rex"))
    with unit:
        cat = unit.cats.get(3)
        assert (Cat, "tom", 7) == (type(cat), cat.name, cat.lives)
        assert [3] == [each.id for each in unit.cats.list()]
        assert unit.cats.get(4) is None  # an Animal, not a Cat
    with unit:
        assert [(Animal, 3), (Animal, 4)] == [(type(each), each.id) for each in unit.animals.list()]
        # The base object loaded first does not hide the subclass's: each class has its own identity.
        cat = unit.cats.get(3)
        assert (Cat, 7) == (type(cat), cat.lives)
        assert [Cat] == [type(each) for each in unit.cats.list()]
        assert Animal is type(unit.animals.get(3))
    assert [(3, "tom"), (4, "rex")] == implementation.stored(Animal, "id", "name")
    assert [(3, 7)] == implementation.stored(Cat, "id", "lives")


def test_a_subclass_object_that_leaves_its_parent_is_deleted_as_an_orphan(implementation: Implementation) -> None:
    """The delete-orphan cascade of a base class reaches its subclasses: an Apple let go by its basket is deleted."""
    unit = implementation.uow
    seed(unit, Basket(id=1, fruit=[Apple(id=1), Fruit(id=2)]))
    with unit:
        basket = unit.baskets.get(1)
        apple = next(each for each in basket.fruit if each.id == 1)
        assert Apple is type(apple)
        basket.fruit.remove(apple)
        unit.commit()
    assert [(2, "fruit")] == implementation.stored(Fruit, "id", "kind")


def test_autocommit_stores_a_change_to_a_joined_subclass_column(implementation: Implementation) -> None:
    """With autocommit=True, a change to a column of a joined subclass's own table is committed at the block's end."""
    seed(implementation.uow, Engineer(name="Ada"))
    assert implementation.build is not None
    auto = implementation.build(autocommit=True)
    with auto:
        [loaded] = auto.employees.list()
        loaded.language = "rust"
    assert [("Ada", "rust")] == implementation.stored(Engineer, "name", "language")


def test_single_table_subclass_is_returned_by_the_base_repository(implementation: Implementation) -> None:
    """The base class's repository returns subclass instances of a single-table hierarchy, with their columns."""
    unit = implementation.uow
    seed(unit, Vehicle(wheels=2), Truck(wheels=6, payload=10))
    with unit:
        assert {(2, Vehicle, None), (6, Truck, 10)} == {
            (found.wheels, type(found), getattr(found, "payload", None)) for found in unit.vehicles.list()
        }
    assert [("truck", 6), ("vehicle", 2)] == implementation.stored(Vehicle, "kind", "wheels")


# -- type conversion -------------------------------------------------------------


def test_get_with_a_string_for_an_integer_key_finds_the_row(implementation: Implementation) -> None:
    """get("1") on an integer key converts the string, as the database does, and returns the row."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        found = unit.customers.get(str(customer.id))
        assert found is not None
        assert "ada@example.com" == found.email


def test_filter_with_a_string_on_an_integer_column(implementation: Implementation) -> None:
    """A string filter on an integer column finds the row on SQLite, MariaDB and the fakes; PostgreSQL refuses it."""
    unit = implementation.uow
    seed(unit, Stock(sku="lamp", qty=3))
    with unit:
        if implementation.name == "postgresql":
            with pytest.raises(ProgrammingError) as raised:
                unit.stocks.list(qty="3")
            assert "42883" == raised.value.orig.sqlstate  # type: ignore[union-attr]  # operator does not exist
        else:
            assert ["lamp"] == [found.sku for found in unit.stocks.list(qty="3")]


def test_filter_with_a_decimal_or_exponent_string_on_an_integer_column(implementation: Implementation) -> None:
    """'3.0' and '3e0' find qty 3 and '3.5' finds nothing on SQLite, MariaDB and the fakes; PostgreSQL refuses."""
    unit = implementation.uow
    seed(unit, Stock(sku="lamp", qty=3))
    with unit:
        if implementation.name == "postgresql":
            with pytest.raises(ProgrammingError):
                unit.stocks.list(qty="3.0")
        else:
            assert ["lamp"] == [found.sku for found in unit.stocks.list(qty="3.0")]
            assert ["lamp"] == [found.sku for found in unit.stocks.list(qty="3e0")]
            assert [] == unit.stocks.list(qty="3.5")


# -- the fake's own messages -----------------------------------------------------


@pytest.mark.parametrize("implementation", FAKES, indirect=True)
def test_fake_errors_name_no_private_module(implementation: Implementation) -> None:
    """The fake's IntegrityError message names nothing private of uow."""
    unit = implementation.uow
    seed(unit, Stock(sku="lamp", qty=3))
    with unit:
        unit.stocks.add(Stock(sku="lamp", qty=4))
        with pytest.raises(IntegrityError) as raised:
            unit.commit()
    message = str(raised.value)
    assert "uow._" not in message
    assert "_DuplicateKey" not in message


def test_autocommit_stores_a_many_to_many_change_alone(implementation: Implementation) -> None:
    """With autocommit=True, a block whose only change is a many-to-many link commits it at its end."""
    article, tag = Article(title="uow"), Tag(name="testing")
    seed(implementation.uow, article, tag)
    assert implementation.build is not None
    auto = implementation.build(autocommit=True)
    with auto:
        loaded = auto.articles.get(article.id)
        loaded.tags.append(auto.tags.get(tag.id))
    with implementation.uow as unit:
        assert ["testing"] == [each.name for each in unit.articles.get(article.id).tags]


# -- what a cold review found ----------------------------------------------------


def test_a_reference_set_to_none_unread_clears_the_foreign_key(implementation: Implementation) -> None:
    """Setting a many-to-one to None without reading it first clears the foreign key at the flush."""
    unit = implementation.uow
    root = Node(name="root", children=[Node(name="leaf")])
    seed(unit, root)
    with unit:
        [leaf] = unit.nodes.list(name="leaf")
        leaf.parent = None
        unit.commit()
    assert [("leaf", None), ("root", None)] == implementation.stored(Node, "name", "parent_id")


def test_a_loaded_child_let_go_by_its_parent_is_deleted_as_an_orphan(implementation: Implementation) -> None:
    """A child whose loaded parent reference is set to None is an orphan: delete-orphan deletes it."""
    unit = implementation.uow
    seed(unit, Node(name="root", children=[Node(name="leaf")]))
    with unit:
        [leaf] = unit.nodes.list(name="leaf")
        assert leaf.parent is not None
        leaf.parent = None
        unit.commit()
    assert [("root", None)] == implementation.stored(Node, "name", "parent_id")


def test_an_object_loaded_before_a_rollback_still_saves_its_changes(implementation: Implementation) -> None:
    """After rollback(), an object loaded before it is reloaded, and a change made to it then is committed."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        loaded = unit.customers.get(customer.id)
        loaded.name = "discarded"
        unit.rollback()
        assert "Ada" == loaded.name
        loaded.name = "Ada Lovelace"
        unit.commit()
    assert [("Ada Lovelace",)] == implementation.stored(Customer, "name")


def test_an_object_first_loaded_in_a_rolled_back_savepoint_still_saves_its_changes(
    implementation: Implementation,
) -> None:
    """An object loaded inside a savepoint that rolls back stays in the block, and its later change is committed."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        with contextlib.suppress(RuntimeError), unit.savepoint():
            loaded = unit.customers.get(customer.id)
            loaded.name = "discarded"
            raise RuntimeError
        loaded.name = "Ada Lovelace"
        unit.commit()
    assert [("Ada Lovelace",)] == implementation.stored(Customer, "name")


def test_a_changed_primary_key_moves_the_object_in_the_identity_map(implementation: Implementation) -> None:
    """After a flush that changed a key, get(new key) returns the same object and get(old key) None."""
    unit = implementation.uow
    seed(unit, Tag(id=1, name="one"))
    with unit:
        tag = unit.tags.get(1)
        tag.id = 10
        unit.tags.count()  # flushes
        assert (unit.tags.get(10), unit.tags.get(1)) == (tag, None)
        unit.commit()
    assert [(10, "one")] == implementation.stored(Tag, "id", "name")


def test_many_to_many_on_both_sides_through_a_table_without_a_key(implementation: Implementation) -> None:
    """Links through a table without a primary key, from either side of back_populates, are one row each."""
    unit = implementation.uow
    ada, bob, maths = Student(name="Ada"), Student(name="Bob"), Course(title="maths")
    seed(unit, ada, bob, maths)
    with unit:
        unit.students.get(ada.id).courses.append(unit.courses.get(maths.id))
        unit.courses.get(maths.id).students.append(unit.students.get(bob.id))
        unit.commit()
    with unit:
        assert ["Ada", "Bob"] == sorted(student.name for student in unit.courses.get(maths.id).students)
        unit.courses.get(maths.id).students.remove(unit.students.get(ada.id))
        unit.commit()
    with unit:
        assert [["maths"], []] == [
            [course.title for course in unit.students.get(each.id).courses] for each in (bob, ada)
        ]


def test_removing_and_adding_the_same_key_in_one_flush_replaces_the_row(implementation: Implementation) -> None:
    """remove() then add() of an object with the same key, committed together, leaves the new row."""
    unit = implementation.uow
    seed(unit, Tag(id=1, name="old"))
    with unit:
        unit.tags.remove(unit.tags.get(1))
        unit.tags.add(Tag(id=1, name="new"))
        unit.commit()
    assert [(1, "new")] == implementation.stored(Tag, "id", "name")


def test_a_tree_is_inserted_and_deleted_in_one_flush(implementation: Implementation) -> None:
    """A three-level tree added through its leaf is inserted parents first; deleting the root deletes it all."""
    unit = implementation.uow
    root, middle, leaf = Node(name="root"), Node(name="middle"), Node(name="leaf")
    middle.children.append(leaf)
    root.children.append(middle)
    with unit:
        unit.nodes.add(leaf)
        unit.commit()
    assert 3 == len(implementation.stored(Node, "name"))
    with unit:
        unit.nodes.remove(unit.nodes.get(root.id))
        unit.commit()
    assert [] == implementation.stored(Node, "name")


@pytest.mark.parametrize("implementation", FAKES, indirect=True)
def test_a_child_committed_under_a_parent_deleted_meanwhile_is_refused(implementation: Implementation) -> None:
    """A child flushed under a parent that a requires_new block deletes and commits is refused at the outer commit."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        unit.invoices.add(Invoice(total=10, customer_id=customer.id))
        unit.invoices.count()  # flushed: on a database its row lock would make the delete below wait
        with unit.transaction(propagation="requires_new"):
            unit.customers.remove(unit.customers.get(customer.id))
            unit.commit()
        with pytest.raises(IntegrityError):
            unit.commit()
    assert ([], []) == (implementation.stored(Customer, "email"), implementation.stored(Invoice, "total"))


def test_a_lazy_load_after_a_failed_flush_needs_the_rollback(implementation: Implementation) -> None:
    """After a flush failed, reading an unloaded relationship raises PendingRollbackError until the rollback."""
    unit = implementation.uow
    order = Order(ref="o1", lines=[Line(sku="lamp", qty=1)])
    seed(unit, order, Customer(email="ada@example.com", name="Ada"))
    with unit:
        loaded = unit.orders.get(order.id)
        unit.customers.add(Customer(email="ada@example.com", name="Ada again"))
        with pytest.raises(IntegrityError):
            unit.customers.count()
        with pytest.raises(PendingRollbackError):
            _ = loaded.lines
        unit.rollback()
        assert ["lamp"] == [line.sku for line in loaded.lines]


def test_an_object_expired_by_a_rollback_is_unreadable_after_the_block(implementation: Implementation) -> None:
    """An object loaded before a rollback and not read since raises DetachedInstanceError after the block."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        loaded = unit.customers.get(customer.id)
        unit.rollback()
    with pytest.raises(DetachedInstanceError):
        _ = loaded.name


def test_a_loaded_column_after_a_failed_flush_needs_the_rollback(implementation: Implementation) -> None:
    """After a flush failed, reading a column of a loaded object raises PendingRollbackError until the rollback."""
    unit = implementation.uow
    customer = Customer(email="ada@example.com", name="Ada")
    seed(unit, customer)
    with unit:
        loaded = unit.customers.get(customer.id)
        unit.customers.add(Customer(email="ada@example.com", name="Ada again"))
        with pytest.raises(IntegrityError):
            unit.customers.count()
        with pytest.raises(PendingRollbackError):
            _ = loaded.name
        unit.rollback()
        assert "Ada" == loaded.name
