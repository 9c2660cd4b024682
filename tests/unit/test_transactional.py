"""The @transactional decorator, retries, uow.current() and ownership, on the in-memory fakes: no database."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import inspect
import logging
import pickle
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pytest_mock import MockerFixture
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

from tests.support.models import Item
from tests.support.uows import AsyncFakeShopUnitOfWork, AsyncShopUnitOfWork, FakeShopUnitOfWork, ShopUnitOfWork
from uow import NEW_UOW, Retry, current, errors, transactional

# -- helpers ------------------------------------------------------------------


class Boom(Exception):
    """Raised by service code in the tests."""


class DriverError(Exception):
    """Stands in for the exception a DBAPI driver raises; attributes are set per test."""


def db_error(*args: object, **attributes: object) -> sa_exc.OperationalError:
    """An OperationalError as SQLAlchemy raises it, wrapping a driver error with *args* and *attributes*."""
    orig = DriverError(*args)
    for name, value in attributes.items():
        setattr(orig, name, value)
    return sa_exc.OperationalError("UPDATE uow_items SET qty=qty + 1", {}, orig)


def serialization_failure() -> sa_exc.OperationalError:
    """A retryable error: PostgreSQL's serialization failure."""
    return db_error("could not serialize access due to concurrent update", sqlstate="40001")


def caused_by(error: BaseException, cause: BaseException) -> BaseException:
    """*error*, raised ``from`` *cause*."""
    error.__cause__ = cause
    return error


def committed_names(unit: FakeShopUnitOfWork | AsyncFakeShopUnitOfWork) -> list[str]:
    """The names of the items committed to the fake's database."""
    return sorted(row["name"] for row in unit.database.rows(Item))


class Factory:
    """Makes fake units of work over one shared database, and keeps them."""

    def __init__(self, kind: type[Any] = FakeShopUnitOfWork) -> None:
        self.kind = kind
        self.made: list[Any] = []

    def __call__(self) -> Any:
        unit = self.kind()
        if self.made:
            unit.database = self.made[0].database
        self.made.append(unit)
        return unit

    @property
    def committed(self) -> list[str]:
        return committed_names(self.made[0]) if self.made else []


class FlakyCommitShopUnitOfWork(FakeShopUnitOfWork):
    """A fake whose COMMIT raises the given errors, one per commit, before it commits normally."""

    def __init__(self, *failures: Exception) -> None:
        super().__init__()
        self.failures = list(failures)

    def _commit(self, session: Any) -> None:
        if self.failures:
            raise self.failures.pop(0)
        super()._commit(session)


class AsyncFlakyCommitShopUnitOfWork(AsyncFakeShopUnitOfWork):
    """The async twin of FlakyCommitShopUnitOfWork."""

    def __init__(self, *failures: Exception) -> None:
        super().__init__()
        self.failures = list(failures)

    async def _commit(self, session: Any) -> None:
        if self.failures:
            raise self.failures.pop(0)
        await super()._commit(session)


def in_thread(action: Callable[[], Any]) -> Any:
    """Run *action* in a new thread, in a copy of this context; return its result or raise its error here."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = action()
        except BaseException as error:  # handed back to the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,))
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@transactional
def add_item(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
    """Add an item; return the unit of work the call ran in."""
    uow.items.add(Item(name))
    return uow


@transactional
def add_then_fail(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
    """Add and flush an item, then raise Boom."""
    uow.items.add(Item(name))
    uow.items.count()
    raise Boom(name)


@transactional
async def add_item_async(name: str, uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> AsyncFakeShopUnitOfWork:
    """Add an item; return the unit of work the call ran in."""
    await uow.items.add(Item(name))
    return uow


def positional_only(uow: FakeShopUnitOfWork, /) -> None:
    """Its uow cannot be passed by keyword."""


def var_positional(*uow: FakeShopUnitOfWork) -> None:
    """Its uow is a tuple of arguments."""


def var_keyword(**uow: FakeShopUnitOfWork) -> None:
    """Its uow is a dict of arguments."""


def generator(uow: FakeShopUnitOfWork = NEW_UOW) -> Any:
    """A generator function."""
    yield uow


async def async_generator(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> Any:
    """An async generator function."""
    yield uow


@pytest.fixture(name="fake")
def _fake() -> FakeShopUnitOfWork:
    return FakeShopUnitOfWork()


@pytest.fixture(name="afake")
def _afake() -> AsyncFakeShopUnitOfWork:
    return AsyncFakeShopUnitOfWork()


@pytest.fixture(name="sleeps")
def _sleeps() -> list[float]:
    return []


# -- decoration -----------------------------------------------------------------


def test_function_without_uow_parameter_is_rejected_at_decoration() -> None:
    """A function with no `uow` parameter raises ConfigurationError, a TypeError, when decorated."""

    def place(name: str, unit: FakeShopUnitOfWork) -> None:
        """Takes its unit of work under another name."""

    with pytest.raises(errors.ConfigurationError, match="place to take a parameter named `uow`") as excinfo:
        transactional(place)
    assert isinstance(excinfo.value, TypeError)
    with pytest.raises(errors.ConfigurationError):
        transactional(factory=FakeShopUnitOfWork)(place)


@pytest.mark.parametrize("func", [positional_only, var_positional, var_keyword])
def test_uow_parameter_that_cannot_be_passed_by_keyword_is_rejected(func: Callable[..., None]) -> None:
    """A positional-only, *uow or **uow parameter is refused at decoration."""
    with pytest.raises(errors.ConfigurationError, match="passed by keyword"):
        transactional(func)


def test_keyword_only_uow_is_accepted(fake: FakeShopUnitOfWork) -> None:
    """A keyword-only `uow` parameter works like any other."""

    @transactional
    def add(name: str, *, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    add("kw", uow=fake)
    assert ["kw"] == committed_names(fake)


@pytest.mark.parametrize("func", [generator, async_generator])
def test_generators_are_rejected(func: Callable[..., Any]) -> None:
    """Generators cannot be decorated: the transaction would end at the first yield."""
    with pytest.raises(errors.ConfigurationError, match="generator"):
        transactional(func)


def test_non_callable_is_rejected() -> None:
    """Decorating something that is not callable raises ConfigurationError."""
    with pytest.raises(errors.ConfigurationError, match="decorates a function"):
        transactional(property(lambda self: None))


def test_wrapper_keeps_name_doc_signature_and_wrapped() -> None:
    """functools.wraps keeps __name__, __doc__, __wrapped__ and the signature; async stays a coroutine function."""

    def place(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> str:
        """Place an order."""
        return name

    async def place_async(name: str, uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> str:
        """Place an order, asynchronously."""
        return name

    decorated = transactional(place)
    decorated_async = transactional(place_async)
    assert ("place", "Place an order.", place) == (decorated.__name__, decorated.__doc__, decorated.__wrapped__)
    assert inspect.signature(place) == inspect.signature(decorated)
    assert place_async is decorated_async.__wrapped__
    assert inspect.iscoroutinefunction(decorated_async)
    assert not inspect.iscoroutinefunction(decorated)


def test_binding_is_computed_at_decoration_not_per_call(mocker: MockerFixture, fake: FakeShopUnitOfWork) -> None:
    """Calls do not inspect the signature again: where `uow` goes is worked out once."""

    @transactional
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    signature = mocker.patch("inspect.signature")
    add("a", fake)
    add("b", uow=fake)
    with fake:
        add("c")
        fake.commit()
    assert 0 == signature.call_count
    assert ["a", "b", "c"] == committed_names(fake)


def test_bare_and_called_decorator_forms_are_equivalent(fake: FakeShopUnitOfWork) -> None:
    """@transactional and @transactional() decorate the same way."""

    @transactional()
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    add("called", fake)
    add_item("bare", fake)
    assert ["bare", "called"] == committed_names(fake)


def test_new_uow_is_a_singleton_that_survives_copy_and_pickle() -> None:
    """NEW_UOW keeps its identity through copy, deepcopy and pickle, and shows as NEW_UOW."""
    assert NEW_UOW is copy.copy(NEW_UOW)
    assert NEW_UOW is copy.deepcopy(NEW_UOW)
    assert NEW_UOW is pickle.loads(pickle.dumps(NEW_UOW))
    assert "NEW_UOW" == repr(NEW_UOW)


# -- which unit of work a call runs in ---------------------------------------------


@pytest.mark.parametrize("by", ["position", "keyword"])
def test_idle_uow_passed_is_owned_and_committed_on_return(fake: FakeShopUnitOfWork, by: str) -> None:
    """An idle unit of work passed in is entered for the call and committed once on return."""
    used = add_item("passed", fake) if by == "position" else add_item("passed", uow=fake)
    assert fake is used
    assert (1, ["passed"]) == (fake.commits, committed_names(fake))
    assert not fake.active


def test_idle_uow_that_was_not_used_is_not_committed(fake: FakeShopUnitOfWork) -> None:
    """A call that never touches its unit of work neither commits nor rolls back."""

    @transactional
    def answer(uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        return 42

    assert 42 == answer(fake)
    assert (0, 0) == (fake.commits, fake.rollbacks)


def test_explicit_commit_inside_an_owned_call_is_not_repeated(fake: FakeShopUnitOfWork) -> None:
    """A function that commits itself is not committed a second time by the decorator."""

    @transactional
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))
        uow.commit()

    add("self-committed", fake)
    assert (1, ["self-committed"]) == (fake.commits, committed_names(fake))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("x",), {}),
        (("x", None), {}),
        (("x", NEW_UOW), {}),
        (("x",), {"uow": None}),
        (("x",), {"uow": NEW_UOW}),
    ],
    ids=["omitted", "None by position", "NEW_UOW by position", "None by keyword", "NEW_UOW by keyword"],
)
def test_no_uow_and_none_active_creates_one_from_the_factory(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """With no unit of work given and none active, the factory's new one is passed in, owned and committed."""
    factory = Factory()

    @transactional(factory=factory)
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        assert uow is current()
        return uow

    used = add(*args, **kwargs)
    assert [used] == factory.made
    assert (1, ["x"], False) == (used.commits, committed_names(used), used.active)


def test_active_uow_passed_is_joined_and_not_committed(fake: FakeShopUnitOfWork) -> None:
    """An active unit of work passed in is joined: only its owner's commit counts, and its block goes on."""
    with fake:
        assert fake is add_item("joined", fake)
        assert (0, True) == (fake.commits, fake.active)
        assert fake is current()
        fake.items.add(Item("owner"))
        fake.commit()
    assert (1, ["joined", "owner"]) == (fake.commits, committed_names(fake))


def test_no_uow_joins_the_one_active_in_this_thread(fake: FakeShopUnitOfWork) -> None:
    """Called without a unit of work inside `with uow:`, the call joins it; the factory is not used."""
    factory = Factory()

    @transactional(factory=factory)
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        return uow

    with fake:
        assert fake is add("joined")
        assert 0 == fake.commits
        fake.commit()
    assert ([], ["joined"]) == (factory.made, committed_names(fake))


def test_no_uow_none_active_and_no_factory_raises_inactive() -> None:
    """Without a unit of work, an active one or a factory, the call raises InactiveUnitOfWorkError."""
    with pytest.raises(errors.InactiveUnitOfWorkError, match="add_item was called without a unit of work"):
        add_item("orphan")


async def test_async_no_uow_none_active_and_no_factory_raises_inactive() -> None:
    """The async decorator raises InactiveUnitOfWorkError likewise."""
    with pytest.raises(errors.InactiveUnitOfWorkError):
        await add_item_async("orphan")


def test_async_uow_passed_to_a_sync_function_raises_configuration_error(afake: AsyncFakeShopUnitOfWork) -> None:
    """A sync function given an async unit of work raises ConfigurationError."""
    with pytest.raises(errors.ConfigurationError, match="not a UnitOfWork"):
        add_item("x", afake)  # type: ignore[arg-type]


async def test_sync_uow_passed_to_an_async_function_raises_configuration_error(fake: FakeShopUnitOfWork) -> None:
    """An async function given a sync unit of work raises ConfigurationError."""
    with pytest.raises(errors.ConfigurationError, match="not a AsyncUnitOfWork"):
        await add_item_async("x", fake)  # type: ignore[arg-type]


def test_factory_returning_the_wrong_kind_raises_configuration_error() -> None:
    """A factory that makes an async unit of work for a sync function raises ConfigurationError."""

    @transactional(factory=AsyncFakeShopUnitOfWork)
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    with pytest.raises(errors.ConfigurationError, match="factory"):
        add("x")


async def test_async_factory_returning_the_wrong_kind_raises_configuration_error() -> None:
    """A factory that makes a sync unit of work for an async function raises ConfigurationError, and writes nothing."""
    made: list[FakeShopUnitOfWork] = []

    def factory() -> FakeShopUnitOfWork:
        made.append(FakeShopUnitOfWork())
        return made[-1]

    @transactional(factory=factory)
    async def add(name: str, uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> None:
        await uow.items.add(Item(name))

    with pytest.raises(errors.ConfigurationError, match="factory"):
        await add("x")
    [unit] = made
    assert unit.commits == 0
    assert not unit.active


def test_exception_rolls_back_and_propagates_unchanged(fake: FakeShopUnitOfWork) -> None:
    """An exception in an owned call rolls back, commits nothing and reaches the caller as raised."""
    with pytest.raises(Boom) as excinfo:
        add_then_fail("lost", fake)
    assert ("lost",) == excinfo.value.args
    assert (0, 1, [], False) == (fake.commits, fake.rollbacks, committed_names(fake), fake.active)


def test_swallowed_failure_of_a_joined_call_poisons_the_callers_transaction() -> None:
    """A joined call that raised, caught by the caller, makes the owner roll back and raise RollbackOnlyError."""
    fake = FakeShopUnitOfWork(autocommit=True)
    caught: list[Boom] = []
    with pytest.raises(errors.RollbackOnlyError) as excinfo, fake:
        fake.items.add(Item("order"))
        try:
            add_then_fail("reservation", fake)
        except Boom as error:
            caught.append(error)
    assert caught[0] is excinfo.value.__cause__
    assert (0, [], False) == (fake.commits, committed_names(fake), fake.active)


# -- kinds of callables --------------------------------------------------------------


async def test_async_function_owns_or_joins_like_a_sync_one(afake: AsyncFakeShopUnitOfWork) -> None:
    """An async def owns an idle unit of work passed in, makes one from its factory, and joins an active one."""
    factory = Factory(AsyncFakeShopUnitOfWork)

    @transactional(factory=factory)
    async def add(name: str, uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> AsyncFakeShopUnitOfWork:
        await uow.items.add(Item(name))
        return uow

    assert afake is await add("owned", afake)
    made = await add("made")
    async with afake:
        assert afake is await add("joined")
        assert 1 == afake.commits
        await afake.commit()
    assert [made] == factory.made
    assert (2, ["joined", "owned"]) == (afake.commits, committed_names(afake))
    assert (1, ["made"]) == (made.commits, committed_names(made))


def test_methods_get_self_and_the_uow_in_place(fake: FakeShopUnitOfWork) -> None:
    """On a method, the unit of work is found after self, by position or keyword, and NEW_UOW is replaced."""
    factory = Factory()

    class Shop:
        prefix = "shop"

        @transactional(factory=factory)
        def add(self, name: str, uow: FakeShopUnitOfWork = NEW_UOW, suffix: str = "") -> FakeShopUnitOfWork:
            uow.items.add(Item(f"{self.prefix} {name}{suffix}"))
            return uow

    shop = Shop()
    assert fake is shop.add("a", fake, "!")
    assert fake is shop.add("b", uow=fake)
    made = shop.add("c", None, "?")
    assert ["shop a!", "shop b"] == committed_names(fake)
    assert ([made], ["shop c?"]) == (factory.made, committed_names(made))


async def test_async_methods_get_self_and_the_uow(afake: AsyncFakeShopUnitOfWork) -> None:
    """An async method receives self and the unit of work passed by position."""

    class Shop:
        @transactional
        async def add(self, name: str, uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> Shop:
            await uow.items.add(Item(name))
            return self

    shop = Shop()
    assert shop is await shop.add("a", afake)
    assert ["a"] == committed_names(afake)


class Catalog:
    """Class and static methods decorated in both orders."""

    @transactional
    @classmethod
    def outer_classmethod(cls, name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> type[Catalog]:
        uow.items.add(Item(name))
        return cls

    @classmethod
    @transactional
    def inner_classmethod(cls, name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> type[Catalog]:
        uow.items.add(Item(name))
        return cls

    @transactional
    @staticmethod
    def outer_staticmethod(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        return uow

    @staticmethod
    @transactional
    def inner_staticmethod(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        return uow


class SubCatalog(Catalog):
    """To see that a decorated classmethod gets the class it was called on."""


@pytest.mark.parametrize("method", ["outer_classmethod", "inner_classmethod"])
def test_classmethods_in_either_decorator_order(fake: FakeShopUnitOfWork, method: str) -> None:
    """A classmethod gets its class and the unit of work, by position or keyword, from the class or an instance."""
    assert SubCatalog is getattr(SubCatalog, method)("a", fake)
    assert Catalog is getattr(Catalog(), method)("b", uow=fake)
    assert (2, ["a", "b"]) == (fake.commits, committed_names(fake))


@pytest.mark.parametrize("method", ["outer_staticmethod", "inner_staticmethod"])
def test_staticmethods_in_either_decorator_order(fake: FakeShopUnitOfWork, method: str) -> None:
    """A staticmethod gets the unit of work by position or keyword, from the class or an instance."""
    assert fake is getattr(Catalog, method)("a", fake)
    assert fake is getattr(Catalog(), method)("b", uow=fake)
    with fake:
        assert fake is getattr(Catalog, method)("c")
        fake.commit()
    assert ["a", "b", "c"] == committed_names(fake)


# -- options --------------------------------------------------------------------------


def test_requires_new_with_factory_commits_apart_from_the_caller(fake: FakeShopUnitOfWork) -> None:
    """requires_new with a factory runs in a new unit of work that commits even if the caller then rolls back."""
    factory = Factory()
    factory.made.append(fake)  # the new one shares the caller's database

    @transactional(factory=factory, propagation="requires_new")
    def audit(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        assert uow is current()
        return uow

    with pytest.raises(Boom), fake:
        fake.items.add(Item("order"))
        inner = audit("audit")
        assert fake is current()
        raise Boom
    assert [fake, inner] == factory.made
    assert (1, 0) == (inner.commits, fake.commits)
    assert ["audit"] == committed_names(fake)


def test_requires_new_without_factory_suspends_the_active_uow(fake: FakeShopUnitOfWork) -> None:
    """requires_new without a factory runs a transaction of its own on the active unit of work."""

    @transactional(propagation="requires_new")
    def audit(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        return uow

    with pytest.raises(Boom), fake:
        fake.items.add(Item("order"))
        assert fake is audit("audit")
        assert (1, True) == (fake.commits, fake.active)
        raise Boom
    assert ["audit"] == committed_names(fake)


def test_nested_failure_rolls_back_only_its_own_work(fake: FakeShopUnitOfWork) -> None:
    """propagation='nested' runs in a savepoint: a failure undoes its work only, the caller goes on."""

    @transactional(propagation="nested")
    def reserve(name: str, fail: bool, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))
        uow.items.count()
        if fail:
            raise Boom(name)

    with fake:
        fake.items.add(Item("order"))
        reserve("kept", False)
        with pytest.raises(Boom):
            reserve("undone", True)
        assert ["kept", "order"] == sorted(item.name for item in fake.items.list())
        fake.commit()
    assert ["kept", "order"] == committed_names(fake)


def test_nested_with_none_active_owns_a_new_transaction() -> None:
    """propagation='nested' with nothing active makes, owns and commits a unit of work."""
    factory = Factory()

    @transactional(factory=factory, propagation="nested")
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    add("owned")
    assert ["owned"] == factory.committed


@pytest.mark.parametrize("passed", [False, True], ids=["from factory", "idle passed"])
def test_mandatory_raises_with_none_active(fake: FakeShopUnitOfWork, passed: bool) -> None:
    """propagation='mandatory' raises InactiveUnitOfWorkError when there is nothing to join."""
    factory = Factory()

    @transactional(factory=factory, propagation="mandatory")
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    with pytest.raises(errors.InactiveUnitOfWorkError, match="mandatory"):
        add("x", fake if passed else NEW_UOW)
    assert ([], 0) == (factory.made, fake.commits)


def test_mandatory_joins_the_active_uow(fake: FakeShopUnitOfWork) -> None:
    """propagation='mandatory' joins the active unit of work."""

    @transactional(propagation="mandatory")
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    with fake:
        add("joined")
        assert 0 == fake.commits
        fake.commit()
    assert ["joined"] == committed_names(fake)


def test_never_raises_when_a_uow_is_active_and_owns_one_otherwise(fake: FakeShopUnitOfWork) -> None:
    """propagation='never' raises ActiveUnitOfWorkError inside a block, and owns a new one outside."""
    factory = Factory()

    @transactional(factory=factory, propagation="never")
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    with fake:
        with pytest.raises(errors.ActiveUnitOfWorkError):
            add("inside")
        with pytest.raises(errors.ActiveUnitOfWorkError):
            add("inside", fake)
        fake.commit()
    add("outside")
    assert ([], ["outside"]) == (committed_names(fake), factory.committed)


def test_read_only_refuses_writes_and_never_commits() -> None:
    """read_only=True: a flush with writes raises ReadOnlyError, reads work, and nothing is committed."""
    factory = Factory()

    @transactional(factory=factory, read_only=True)
    def sneak(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        uow.items.add(Item(name))
        return uow.items.count()

    @transactional(factory=factory, read_only=True)
    def count(uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        return uow.items.count()

    with pytest.raises(errors.ReadOnlyError):
        sneak("x")
    assert 0 == count()
    assert [0, 0] == [unit.commits for unit in factory.made]
    assert [] == factory.committed


def test_read_only_call_joined_into_a_read_write_block(fake: FakeShopUnitOfWork) -> None:
    """A read_only call may join a read-write block: it reads, cannot write, and the owner writes after it."""

    @transactional(read_only=True)
    def count(uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        return uow.items.count()

    @transactional(read_only=True)
    def sneak(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        uow.items.add(Item(name))
        return uow.items.count()

    with fake:
        fake.items.add(Item("before"))
        fake.items.count()
        assert 1 == count()
        fake.items.add(Item("after"))
        fake.commit()
    with pytest.raises(errors.ReadOnlyError), fake:
        sneak("sneaked")
    assert (1, ["after", "before"]) == (fake.commits, committed_names(fake))


def test_configured_decorator_is_reusable_and_keeps_its_options() -> None:
    """tx = transactional(factory=...) decorates many functions; tx(read_only=True) keeps the factory."""
    factory = Factory()
    tx = transactional(factory=factory)
    read_only_tx = tx(read_only=True)

    @tx
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    @read_only_tx
    def count(uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        return uow.items.count()

    @read_only_tx
    def sneak(uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        uow.items.add(Item("sneaked"))
        return uow.items.count()

    add("a")
    assert 1 == count()
    with pytest.raises(errors.ReadOnlyError):
        sneak()
    add("b")
    assert 4 == len(factory.made)
    assert ["a", "b"] == factory.committed


@pytest.mark.parametrize(
    "options",
    [
        {"propagation": "sometimes"},
        {"isolation_level": "serializable"},
        {"isolation_level": "SNAPSHOT"},
        {"retries": -1},
        {"retries": True},
        {"retries": 1.5},
        {"retries": "3"},
        {"factory": FakeShopUnitOfWork()},
    ],
    ids=repr,
)
def test_invalid_options_raise_configuration_error_at_configuration(options: dict[str, Any]) -> None:
    """Bad options raise ConfigurationError when the decorator is configured, before any function is decorated."""
    with pytest.raises(errors.ConfigurationError):
        transactional(**options)
    with pytest.raises(errors.ConfigurationError):
        transactional(factory=FakeShopUnitOfWork)(**options)


@pytest.mark.parametrize("field", ["retries", "backoff", "max_backoff"])
@pytest.mark.parametrize("value", [-1, True, "1"])
def test_retry_with_a_bad_number_raises_configuration_error(field: str, value: object) -> None:
    """Retry() refuses negative, boolean and non-numeric settings with ConfigurationError."""
    with pytest.raises(errors.ConfigurationError, match=field):
        Retry(**{field: value})


# -- is_retryable and Retry -------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        db_error("could not serialize access", sqlstate="40001"),
        db_error("deadlock detected", sqlstate="40P01"),
        db_error("could not serialize access", pgcode="40001"),
        db_error("deadlock detected", pgcode="40P01"),
        db_error(1213, "Deadlock found when trying to get lock"),
        db_error(1205, "Lock wait timeout exceeded"),
        sa_exc.DBAPIError("COMMIT", {}, DriverError(1213, "Deadlock found")),
        orm_exc.StaleDataError("UPDATE statement on table 'uow_items' expected to update 1 row(s); 0 were matched."),
        caused_by(Boom("service failed"), db_error("deadlock detected", sqlstate="40P01")),
        caused_by(Boom("outer"), caused_by(RuntimeError("middle"), orm_exc.StaleDataError("stale"))),
        caused_by(errors.RollbackOnlyError("poisoned"), serialization_failure()),
    ],
    ids=[
        "sqlstate 40001",
        "sqlstate 40P01",
        "pgcode 40001",
        "pgcode 40P01",
        "mysql 1213",
        "mysql 1205",
        "DBAPIError",
        "StaleDataError",
        "cause",
        "cause of cause",
        "RollbackOnlyError from one",
    ],
)
def test_is_retryable_recognises_serialization_failures_and_deadlocks(error: BaseException) -> None:
    """Serialization failures, deadlocks, lock timeouts and stale data are retryable, also as a __cause__."""
    assert errors.is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.IntegrityError("INSERT", {}, DriverError("duplicate key", 1062)),
        db_error("duplicate key value violates unique constraint", sqlstate="23505"),
        db_error(1062, "Duplicate entry"),
        db_error("1213", "a code that is a string"),
        sa_exc.DBAPIError("COMMIT", {}, None),  # type: ignore[arg-type]
        Boom("service failed"),
        caused_by(errors.RollbackOnlyError("poisoned"), Boom("service failed")),
        DriverError("not wrapped by SQLAlchemy"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
    ],
    ids=[
        "integrity",
        "sqlstate 23505",
        "mysql 1062",
        "mysql code as text",
        "no orig",
        "plain",
        "RollbackOnlyError from plain",
        "bare driver error",
        "CancelledError",
        "KeyboardInterrupt",
    ],
)
def test_is_retryable_rejects_other_errors(error: BaseException) -> None:
    """Other database errors, plain exceptions and cancellations are not retryable."""
    assert not errors.is_retryable(error)


def test_is_retryable_stops_on_a_cause_cycle() -> None:
    """A __cause__ cycle without a retryable error ends with False."""
    first, second = Boom("first"), Boom("second")
    caused_by(first, caused_by(second, first))
    assert not errors.is_retryable(first)


def test_retry_delay_is_jittered_between_half_and_all_of_the_capped_backoff() -> None:
    """The pause before retry n lies in [cap/2, cap], cap = min(max_backoff, backoff * 2**(n-1))."""
    retry = Retry(backoff=0.125, max_backoff=1.0)
    for attempt, cap in [(1, 0.125), (2, 0.25), (3, 0.5), (4, 1.0), (5, 1.0), (30, 1.0)]:
        delays = {retry.delay(attempt) for _ in range(50)}
        assert all(cap / 2 <= delay <= cap for delay in delays)
        assert len(delays) > 1
    assert 0.0 == Retry(backoff=0).delay(3)


def test_retry_delay_stays_capped_for_very_late_attempts() -> None:
    """However many retries came before, the pause is capped at max_backoff instead of failing."""
    retry = Retry(retries=5000, backoff=0.125, max_backoff=1.0)
    assert 0.5 <= retry.delay(2000) <= 1.0


# -- retries --------------------------------------------------------------------------


def test_retries_until_success_with_backoff_delays(sleeps: list[float]) -> None:
    """A call failing retryably three times succeeds on the fourth attempt, after three capped, jittered pauses."""
    factory = Factory()
    attempts: list[FakeShopUnitOfWork] = []

    @transactional(factory=factory, retries=Retry(retries=4, backoff=0.125, max_backoff=0.25, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> int:
        attempts.append(uow)
        if len(attempts) < 4:
            raise serialization_failure()
        return len(attempts)

    assert 4 == place()
    assert factory.made * 4 == attempts
    assert 3 == len(sleeps)
    for cap, delay in zip([0.125, 0.25, 0.25], sleeps, strict=True):
        assert cap / 2 <= delay <= cap


def test_each_attempt_runs_in_a_fresh_block(sleeps: list[float]) -> None:
    """Work and on_commit hooks of failed attempts are dropped; each attempt has new repositories."""
    factory = Factory()
    repositories: list[Any] = []
    hooks_run: list[int] = []

    @transactional(factory=factory, retries=Retry(retries=3, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempt = len(repositories) + 1
        repositories.append(uow.items)
        assert 0 == uow.items.count()  # the rows of failed attempts are gone
        uow.items.add(Item(f"attempt {attempt}"))
        assert 1 == uow.items.count()
        uow.on_commit(functools.partial(hooks_run.append, attempt))
        if attempt < 3:
            raise serialization_failure()

    place()
    assert ["attempt 3"] == factory.committed
    assert [3] == hooks_run
    assert 3 == len({id(repository) for repository in repositories})
    with pytest.raises(errors.InactiveUnitOfWorkError):
        repositories[0].count()
    assert (1, 2) == (factory.made[0].commits, factory.made[0].rollbacks)


def test_each_retry_logs_a_warning(sleeps: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """Every retry logs one WARNING on logger "uow" naming the function, the error's class and code, and the pause."""
    caplog.set_level(logging.WARNING, logger="uow")
    failures = [serialization_failure(), db_error(1213, "Deadlock found when trying to get lock")]

    @transactional(factory=Factory(), retries=Retry(retries=3, sleep=sleeps.append))
    def flaky_place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        if failures:
            raise failures.pop(0)

    flaky_place()
    records = [record for record in caplog.records if "uow" == record.name]
    assert [logging.WARNING, logging.WARNING] == [record.levelno for record in records]
    for number, (record, delay) in enumerate(zip(records, sleeps, strict=True), start=1):
        message = record.getMessage()
        assert "flaky_place failed with OperationalError" in message
        assert f"retry {number} of 3 in {delay:.3f} s" in message
    # The code names the error; the driver's message, which may hold the refused values, is left out.
    assert "OperationalError (40001)" in records[0].getMessage()
    assert "OperationalError (1213)" in records[1].getMessage()
    assert "Deadlock found" not in records[1].getMessage()


def test_gives_up_after_the_retries_and_raises_the_last_error(sleeps: list[float]) -> None:
    """After `retries` retries the last error is raised and nothing is committed."""
    factory = Factory()
    raised: list[Exception] = []

    @transactional(factory=factory, retries=Retry(retries=2, sleep=sleeps.append))
    def doomed(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item("doomed"))
        raised.append(serialization_failure())
        raise raised[-1]

    with pytest.raises(sa_exc.OperationalError) as excinfo:
        doomed()
    assert raised[-1] is excinfo.value
    assert (3, 2) == (len(raised), len(sleeps))
    assert [] == factory.committed


def test_int_retries_use_the_default_backoff_and_time_sleep(mocker: MockerFixture) -> None:
    """retries=2 means Retry(retries=2): default backoff, paused with time.sleep."""
    sleep = mocker.patch("time.sleep")
    failures = [serialization_failure(), serialization_failure()]

    @transactional(factory=Factory(), retries=2)
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    assert "done" == place()
    delays = [call.args[0] for call in sleep.call_args_list]
    assert 2 == len(delays)
    for cap, delay in zip([0.05, 0.1], delays, strict=True):
        assert cap / 2 <= delay <= cap


def test_retry_if_predicate_can_retry_more(sleeps: list[float]) -> None:
    """A custom retry_if makes the decorator retry errors is_retryable would not."""
    attempts: list[int] = []

    def worth_retrying(error: BaseException) -> bool:
        return isinstance(error, Boom) or errors.is_retryable(error)

    @transactional(factory=Factory(), retries=Retry(retries=2, retry_if=worth_retrying, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise Boom("flaky service")

    place()
    assert (2, 1) == (len(attempts), len(sleeps))


def test_retry_if_predicate_can_refuse_retryable_errors(sleeps: list[float]) -> None:
    """A retry_if that says no stops the retry of an error is_retryable accepts."""
    attempts: list[int] = []

    @transactional(factory=Factory(), retries=Retry(retries=2, retry_if=lambda error: False, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError):
        place()
    assert (1, []) == (len(attempts), sleeps)


def test_non_retryable_error_is_raised_at_once(sleeps: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """An error that is not retryable is raised after one attempt, without a pause or a warning."""
    caplog.set_level(logging.WARNING, logger="uow")
    attempts: list[int] = []

    @transactional(factory=Factory(), retries=Retry(retries=3, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        raise Boom("bad input")

    with pytest.raises(Boom):
        place()
    assert (1, [], []) == (len(attempts), sleeps, caplog.records)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, asyncio.CancelledError, SystemExit])
def test_base_exceptions_are_never_retried(sleeps: list[float], interruption: type[BaseException]) -> None:
    """A BaseException such as KeyboardInterrupt is raised at once, even with a retry_if that accepts anything."""
    factory = Factory()
    attempts: list[int] = []

    @transactional(factory=factory, retries=Retry(retries=3, retry_if=lambda error: True, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        uow.items.add(Item("interrupted"))
        uow.items.count()
        raise interruption

    with pytest.raises(interruption):
        place()
    assert (1, []) == (len(attempts), sleeps)
    assert ([], False) == (factory.committed, factory.made[0].active)


@pytest.mark.parametrize("propagation", ["required", "mandatory", "nested"])
def test_a_call_that_does_not_own_the_transaction_never_retries(
    fake: FakeShopUnitOfWork, sleeps: list[float], propagation: Any
) -> None:
    """Joined or savepoint calls raise a retryable error at once: only the owner of the transaction retries."""
    attempts: list[int] = []

    @transactional(propagation=propagation, retries=Retry(retries=3, sleep=sleeps.append))
    def flaky(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError), fake:
        flaky()
    assert (1, []) == (len(attempts), sleeps)


def test_the_owner_retries_the_whole_unit_including_joined_calls(sleeps: list[float]) -> None:
    """A joined call's retryable error reaches the owner, which runs everything again once."""
    factory = Factory()
    reservations: list[str] = []

    @transactional(retries=Retry(retries=5, sleep=sleeps.append))
    def reserve(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        reservations.append(name)
        uow.items.add(Item(name))
        if len(reservations) == 1:
            raise serialization_failure()

    @transactional(factory=factory, retries=Retry(retries=2, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item("order"))
        reserve("reservation", uow)

    place()
    assert (2, 1) == (len(reservations), len(sleeps))
    assert ["order", "reservation"] == factory.committed


def test_owner_retries_a_rollback_only_error_caused_by_a_retryable_one(
    sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A swallowed retryable failure of a joined call poisons the owner, which retries on the RollbackOnlyError."""
    caplog.set_level(logging.WARNING, logger="uow")
    factory = Factory()
    reservations: list[str] = []

    @transactional
    def reserve(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        reservations.append(name)
        uow.items.add(Item(name))
        if len(reservations) == 1:
            raise serialization_failure()

    @transactional(factory=factory, retries=Retry(retries=2, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item("order"))
        with contextlib.suppress(sa_exc.OperationalError):
            reserve("reservation")

    place()
    assert (2, 1) == (len(reservations), len(sleeps))
    assert ["order", "reservation"] == factory.committed
    assert "failed with RollbackOnlyError" in caplog.records[0].getMessage()


def test_requires_new_call_retries_on_its_own(fake: FakeShopUnitOfWork, sleeps: list[float]) -> None:
    """A requires_new call owns its transaction, so it retries it without disturbing the caller's."""
    factory = Factory()
    attempts: list[FakeShopUnitOfWork] = []

    @transactional(factory=factory, propagation="requires_new", retries=Retry(retries=2, sleep=sleeps.append))
    def audit(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(uow)
        uow.items.add(Item("audit"))
        if len(attempts) == 1:
            raise serialization_failure()

    with fake:
        fake.items.add(Item("order"))
        audit()
        assert fake is current()
        fake.commit()
    assert (factory.made * 2, 1) == (attempts, len(sleeps))
    assert (["audit"], ["order"]) == (factory.committed, committed_names(fake))


def test_commit_failing_with_a_non_retryable_error_is_never_retried(sleeps: list[float]) -> None:
    """A COMMIT that failed non-retryably may have been applied, so it is not retried even if retry_if says yes."""
    lost = db_error("server closed the connection unexpectedly", sqlstate="08006")
    unit = FlakyCommitShopUnitOfWork(lost)
    attempts: list[int] = []

    @transactional(retries=Retry(retries=3, retry_if=lambda error: True, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        uow.items.add(Item("order"))

    with pytest.raises(sa_exc.OperationalError) as excinfo:
        place(unit)
    assert lost is excinfo.value
    assert (1, [], [], False) == (len(attempts), sleeps, committed_names(unit), unit.active)


def test_commit_failing_with_a_retryable_error_is_retried(sleeps: list[float]) -> None:
    """A COMMIT refused with a serialization failure did not apply, so the whole call runs again."""
    unit = FlakyCommitShopUnitOfWork(serialization_failure())
    attempts: list[int] = []

    @transactional(retries=Retry(retries=3, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        uow.items.add(Item("order"))

    place(unit)
    assert (2, 1) == (len(attempts), len(sleeps))
    assert (["order"], 1, 1) == (committed_names(unit), unit.commits, unit.rollbacks)


def test_a_non_retryable_commit_failure_does_not_stop_later_calls_retrying(sleeps: list[float]) -> None:
    """After a COMMIT failed non-retryably, the next call on the same unit of work retries as usual."""
    unit = FlakyCommitShopUnitOfWork(db_error("connection reset", sqlstate="08006"))
    failures = [serialization_failure()]

    @transactional(retries=Retry(retries=2, sleep=sleeps.append))
    def place(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))
        if name == "second" and failures:
            raise failures.pop(0)

    with pytest.raises(sa_exc.OperationalError):
        place("first", unit)
    place("second", unit)
    assert (["second"], 1) == (committed_names(unit), len(sleeps))


# -- async retries -------------------------------------------------------------------


def async_recorder(sleeps: list[float]) -> Callable[[float], Awaitable[None]]:
    """An async sleep that records its delays without pausing."""

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    return sleep


async def test_async_retries_until_success_with_an_async_sleep(sleeps: list[float]) -> None:
    """An async call is retried in fresh blocks; the injected async sleep is awaited with capped delays."""
    factory = Factory(AsyncFakeShopUnitOfWork)
    hooks_run: list[int] = []
    attempts: list[AsyncFakeShopUnitOfWork] = []
    retry = Retry(retries=3, backoff=0.125, max_backoff=0.25, sleep=async_recorder(sleeps))

    @transactional(factory=factory, retries=retry)
    async def place(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> int:
        attempts.append(uow)
        attempt = len(attempts)
        assert 0 == await uow.items.count()
        await uow.items.add(Item(f"attempt {attempt}"))
        assert 1 == await uow.items.count()
        uow.on_commit(functools.partial(hooks_run.append, attempt))
        if attempt < 3:
            raise serialization_failure()
        return attempt

    assert 3 == await place()
    assert factory.made * 3 == attempts
    assert (["attempt 3"], [3]) == (factory.committed, hooks_run)
    for cap, delay in zip([0.125, 0.25], sleeps, strict=True):
        assert cap / 2 <= delay <= cap


async def test_async_accepts_a_sync_sleep(sleeps: list[float]) -> None:
    """An injected sleep that returns nothing works for an async call too."""
    failures = [db_error("deadlock detected", sqlstate="40P01")]

    @transactional(factory=Factory(AsyncFakeShopUnitOfWork), retries=Retry(retries=1, sleep=sleeps.append))
    async def place(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    assert "done" == await place()
    assert 1 == len(sleeps)


async def test_async_gives_up_after_the_retries(sleeps: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """An async call that keeps failing raises its last error after `retries` retries, each logged."""
    caplog.set_level(logging.WARNING, logger="uow")
    raised: list[Exception] = []

    @transactional(factory=Factory(AsyncFakeShopUnitOfWork), retries=Retry(retries=2, sleep=async_recorder(sleeps)))
    async def doomed(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> None:
        raised.append(db_error(1205, "Lock wait timeout exceeded"))
        raise raised[-1]

    with pytest.raises(sa_exc.OperationalError) as excinfo:
        await doomed()
    assert raised[-1] is excinfo.value
    assert (3, 2) == (len(raised), len(sleeps))
    assert 2 == len([record for record in caplog.records if "uow" == record.name])


async def test_async_cancellation_is_never_retried(sleeps: list[float]) -> None:
    """A cancelled async call is not retried, even with a retry_if that accepts anything, and rolls back."""
    factory = Factory(AsyncFakeShopUnitOfWork)
    attempts: list[int] = []
    started = asyncio.Event()

    @transactional(factory=factory, retries=Retry(retries=3, retry_if=lambda error: True, sleep=async_recorder(sleeps)))
    async def wait_forever(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        await uow.items.add(Item("never"))
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(wait_forever())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (1, []) == (len(attempts), sleeps)
    assert ([], False) == (factory.committed, factory.made[0].active)


async def test_async_commit_failing_with_a_non_retryable_error_is_never_retried(sleeps: list[float]) -> None:
    """An async COMMIT that failed non-retryably is not retried even if retry_if says yes."""
    lost = db_error("server closed the connection unexpectedly", sqlstate="08006")
    unit = AsyncFlakyCommitShopUnitOfWork(lost)
    attempts: list[int] = []

    @transactional(retries=Retry(retries=3, retry_if=lambda error: True, sleep=async_recorder(sleeps)))
    async def place(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        await uow.items.add(Item("order"))

    with pytest.raises(sa_exc.OperationalError) as excinfo:
        await place(unit)
    assert lost is excinfo.value
    assert (1, [], []) == (len(attempts), sleeps, committed_names(unit))


async def test_async_joined_call_never_retries(afake: AsyncFakeShopUnitOfWork, sleeps: list[float]) -> None:
    """An async call that joins its caller's unit of work raises a retryable error at once."""
    attempts: list[int] = []

    @transactional(retries=Retry(retries=3, sleep=async_recorder(sleeps)))
    async def flaky(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError):
        async with afake:
            await flaky()
    assert (1, []) == (len(attempts), sleeps)


# -- uow.current() --------------------------------------------------------------------


def test_current_raises_when_none_is_active(fake: FakeShopUnitOfWork) -> None:
    """uow.current() raises InactiveUnitOfWorkError before any block and after the block ends."""
    with pytest.raises(errors.InactiveUnitOfWorkError, match="no unit of work is active"):
        current()
    with fake:
        pass
    with pytest.raises(errors.InactiveUnitOfWorkError):
        current()


def test_current_is_the_active_uow_in_joined_and_nested_blocks(fake: FakeShopUnitOfWork) -> None:
    """Inside `with uow:`, current() returns it, also in joined scopes and savepoints, until the owner exits."""
    with fake:
        assert fake is current()
        with fake, fake.savepoint():
            assert fake is current()
        assert fake is current()
    with pytest.raises(errors.InactiveUnitOfWorkError):
        current()


async def test_current_is_the_active_async_uow(afake: AsyncFakeShopUnitOfWork) -> None:
    """Inside `async with uow:`, current() returns the async unit of work."""
    async with afake:
        assert afake is current()
        assert afake is current(AsyncShopUnitOfWork)
    with pytest.raises(errors.InactiveUnitOfWorkError):
        current()


def test_current_with_a_kind_narrows_or_raises(fake: FakeShopUnitOfWork) -> None:
    """current(Kind) returns the active unit of work if it is a Kind, else raises InactiveUnitOfWorkError."""
    with fake:
        assert fake is current(ShopUnitOfWork)
        assert fake is current(FakeShopUnitOfWork)
        with pytest.raises(errors.InactiveUnitOfWorkError, match="not a AsyncShopUnitOfWork"):
            current(AsyncShopUnitOfWork)


def test_thread_started_in_a_block_neither_sees_nor_joins_it(fake: FakeShopUnitOfWork) -> None:
    """In a thread running a copy of the block's context, current() raises and the decorator makes its own."""
    factory = Factory()

    @transactional(factory=factory)
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        return uow

    def worker() -> FakeShopUnitOfWork:
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        return add("from the thread")

    with fake:
        made = in_thread(worker)
        assert fake is current()
        fake.items.add(Item("from the block"))
        fake.commit()
    assert ([made], ["from the thread"]) == (factory.made, committed_names(made))
    assert ["from the block"] == committed_names(fake)


async def test_child_task_neither_sees_nor_joins_the_parents_uow(afake: AsyncFakeShopUnitOfWork) -> None:
    """In a task created inside a block, current() raises and the decorator makes its own unit of work."""
    factory = Factory(AsyncFakeShopUnitOfWork)

    @transactional(factory=factory)
    async def add(name: str, uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> AsyncFakeShopUnitOfWork:
        await uow.items.add(Item(name))
        return uow

    async def child() -> AsyncFakeShopUnitOfWork:
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        return await add("from the task")

    async with afake:
        made = await asyncio.create_task(child())
        assert afake is current()
        await afake.items.add(Item("from the parent"))
        await afake.commit()
    assert made is not afake
    assert ([made], ["from the task"]) == (factory.made, committed_names(made))
    assert ["from the parent"] == committed_names(afake)


async def test_to_thread_worker_neither_sees_nor_joins_the_callers_uow(fake: FakeShopUnitOfWork) -> None:
    """In an asyncio.to_thread worker, current() raises and the decorator makes its own unit of work."""
    factory = Factory()

    @transactional(factory=factory)
    def add(name: str, uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item(name))
        return uow

    def worker() -> FakeShopUnitOfWork:
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        return add("from the worker")

    with fake:
        made = await asyncio.to_thread(worker)
        assert fake is current()
        fake.items.add(Item("from the caller"))
        fake.commit()
    assert made is not fake
    assert ([made], ["from the worker"]) == (factory.made, committed_names(made))
    assert ["from the caller"] == committed_names(fake)


async def test_async_uow_is_not_current_in_a_to_thread_worker(afake: AsyncFakeShopUnitOfWork) -> None:
    """An async unit of work active in a task is not returned by current() in a to_thread worker."""

    def worker() -> str:
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        return "checked"

    async with afake:
        assert "checked" == await asyncio.to_thread(worker)
        assert afake is current()


# -- ownership ----------------------------------------------------------------------


def _enter_and_leave(unit: FakeShopUnitOfWork) -> None:
    with unit:
        pass


def _enter_requires_new(unit: FakeShopUnitOfWork) -> None:
    with unit.transaction(propagation="requires_new"):
        pass


@pytest.mark.parametrize(
    "action",
    [
        lambda unit: unit.items.list(),
        lambda unit: unit.commit(),
        _enter_and_leave,
        _enter_requires_new,
        lambda unit: add_item("stranger", unit),
    ],
    ids=["repository", "commit", "with", "requires_new", "decorated call"],
)
def test_sync_uow_used_from_another_thread_raises_ownership_error(
    fake: FakeShopUnitOfWork, action: Callable[[FakeShopUnitOfWork], object]
) -> None:
    """A sync unit of work entered in one thread refuses use from another; the owner carries on."""
    with fake:
        fake.items.add(Item("mine"))
        with pytest.raises(errors.OwnershipError, match="thread"):
            in_thread(lambda: action(fake))
        fake.commit()
    assert ["mine"] == committed_names(fake)


def test_sync_uow_may_be_entered_by_another_thread_once_idle(fake: FakeShopUnitOfWork) -> None:
    """Ownership ends with the owner's block: another thread may then enter the unit of work."""
    add_item("first", fake)
    in_thread(lambda: add_item("second", fake))
    assert ["first", "second"] == committed_names(fake)


async def _use_repository(unit: AsyncFakeShopUnitOfWork) -> None:
    await unit.items.list()


async def _commit(unit: AsyncFakeShopUnitOfWork) -> None:
    await unit.commit()


async def _async_enter_and_leave(unit: AsyncFakeShopUnitOfWork) -> None:
    async with unit:
        pass


async def _decorated_call(unit: AsyncFakeShopUnitOfWork) -> None:
    await add_item_async("stranger", unit)


@pytest.mark.parametrize(
    "action",
    [_use_repository, _commit, _async_enter_and_leave, _decorated_call],
    ids=["repository", "commit", "async with", "decorated call"],
)
async def test_async_uow_used_from_another_task_raises_ownership_error(
    afake: AsyncFakeShopUnitOfWork, action: Callable[[AsyncFakeShopUnitOfWork], Awaitable[None]]
) -> None:
    """An async unit of work entered in one task refuses use from another task; the owner carries on."""
    async with afake:
        await afake.items.add(Item("mine"))
        with pytest.raises(errors.OwnershipError, match="task"):
            await asyncio.create_task(action(afake))  # type: ignore[arg-type]
        await afake.commit()
    assert ["mine"] == committed_names(afake)


# -- what the review of the transaction rules found --------------------------------


def test_an_attempt_that_committed_is_not_run_again(fake: FakeShopUnitOfWork, sleeps: list[float]) -> None:
    """A retryable error after an explicit commit() in the attempt is raised, not retried: the work is durable."""
    calls: list[int] = []

    @transactional(retries=Retry(retries=3, sleep=sleeps.append))
    def import_chunks(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        uow.items.add(Item("chunk 1"))
        uow.commit()
        raise db_error("could not serialize access", sqlstate="40001")

    with pytest.raises(sa_exc.OperationalError):
        import_chunks(uow=fake)
    assert ([1], [], ["chunk 1"]) == (calls, sleeps, committed_names(fake))


def test_a_hook_failing_after_the_commit_is_not_retried(fake: FakeShopUnitOfWork, sleeps: list[float]) -> None:
    """A retryable error raised by an on_commit hook after the decorator's commit does not run the function again."""
    calls: list[int] = []

    def flaky_hook() -> None:
        raise db_error("deadlock detected", sqlstate="40P01")

    @transactional(retries=Retry(retries=3, sleep=sleeps.append))
    def place_order(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        uow.items.add(Item("order"))
        uow.on_commit(flaky_hook)

    with pytest.raises(sa_exc.OperationalError):
        place_order(uow=fake)
    assert ([1], [], ["order"]) == (calls, sleeps, committed_names(fake))


def test_a_hook_calling_a_decorated_service_gets_its_own_unit_of_work(fake: FakeShopUnitOfWork) -> None:
    """A @transactional service called from an on_commit hook runs in a unit of work of its own, and commits."""
    factory = Factory()

    @transactional(factory=factory)
    def record_mail(uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item("mail sent"))
        return uow

    made: list[FakeShopUnitOfWork] = []

    @transactional
    def place_order(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item("order"))
        uow.on_commit(lambda: made.append(record_mail()))

    place_order(uow=fake)
    assert ["order"] == committed_names(fake)
    assert [made[0]] == factory.made
    assert ["mail sent"] == committed_names(made[0])


async def test_sync_uow_is_not_joined_from_a_child_task(fake: FakeShopUnitOfWork) -> None:
    """A sync unit of work entered by one task is neither current nor joined in a task it starts."""
    factory = Factory()

    @transactional(factory=factory)
    def audit(uow: FakeShopUnitOfWork = NEW_UOW) -> FakeShopUnitOfWork:
        uow.items.add(Item("audit"))
        return uow

    async def child() -> FakeShopUnitOfWork:
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        return audit()

    with fake:
        made = await asyncio.create_task(child())
        assert fake is current()
        with pytest.raises(errors.OwnershipError):
            await asyncio.create_task(asyncio.to_thread(fake.items.count))
    assert made is not fake
    assert ["audit"] == committed_names(made)
    assert [] == committed_names(fake)


def test_durable_work_of_a_nested_unit_of_work_is_not_repeated(sleeps: list[float]) -> None:
    """A retryable error after a requires_new call committed through its own unit of work is not retried."""
    factory = Factory()
    calls: list[int] = []

    @transactional(factory=factory, propagation="requires_new")
    def audit(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(f"audit {len(calls)}"))

    @transactional(factory=factory, retries=Retry(retries=3, sleep=sleeps.append))
    def place(uow: FakeShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        audit()
        raise db_error("could not serialize access", sqlstate="40001")

    with pytest.raises(sa_exc.OperationalError):
        place()
    assert ([1], [], ["audit 1"]) == (calls, sleeps, factory.committed)


async def test_async_hook_that_enters_the_same_unit_of_work_commits_on_its_own(afake: AsyncFakeShopUnitOfWork) -> None:
    """An async hook running `async with uow:` on the unit of work that committed owns a new transaction."""

    async def record() -> None:
        async with afake:
            await afake.items.add(Item("hook"))
            await afake.commit()

    @transactional
    async def place(uow: AsyncFakeShopUnitOfWork = NEW_UOW) -> None:
        await uow.items.add(Item("order"))
        uow.on_commit(record)

    await place(uow=afake)
    assert ["hook", "order"] == committed_names(afake)
    assert 2 == afake.commits
