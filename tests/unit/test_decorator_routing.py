"""Which unit of work a decorated call runs in, the options a unit of work carries, and raw-Python traps.

On the in-memory fakes: no database. The same routing on two real databases
is in tests/integration/test_two_databases.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import pytest
from sqlalchemy import exc as sa_exc

import uow as uow_lib
from tests.support.models import Item, Note, Sku
from tests.support.uows import (
    AsyncAuditUnitOfWork,
    AsyncFakeAuditUnitOfWork,
    AsyncFakeShopUnitOfWork,
    AsyncShopUnitOfWork,
    AuditUnitOfWork,
    FakeAuditUnitOfWork,
    FakeShopUnitOfWork,
    ShopUnitOfWork,
)
from uow import NEW_UOW, Retry, current, errors, transactional

if TYPE_CHECKING:
    from tests.support.uows import AsyncShopUnitOfWork as OnlyForTypes


class DriverError(Exception):
    """What a driver raises for a serialization failure: SQLSTATE 40001."""

    sqlstate = "40001"


def serialization_failure() -> sa_exc.OperationalError:
    """A retryable error, as SQLAlchemy raises it."""
    return sa_exc.OperationalError("UPDATE uow_items SET qty=qty + 1", {}, DriverError("could not serialize"))


def notes(unit: FakeAuditUnitOfWork | AsyncFakeAuditUnitOfWork | FakeShopUnitOfWork) -> list[str]:
    """The texts of the notes committed to a fake's database."""
    return sorted(row["text"] for row in unit.database.rows(Note))


class HasNotes(Protocol):
    """A structural type of units of work with notes: it names no unit of work class to route by."""

    notes: Any


class Made:
    """A factory that builds fakes of one class over one shared database, and keeps them."""

    def __init__(self, kind: type[Any]) -> None:
        self.kind = kind
        self.made: list[Any] = []
        self.database = kind().database

    def __call__(self) -> Any:
        unit = self.kind()
        unit.database = self.database
        self.made.append(unit)
        return unit

    @property
    def committed(self) -> list[str]:
        return sorted(row["text"] for row in self.database.rows(Note))


# -- routing by kind -------------------------------------------------------------


def test_service_of_another_kind_runs_in_its_own_unit_of_work() -> None:
    """A service whose factory builds an audit unit of work, called inside a shop block, does not join it."""
    audits = Made(FakeAuditUnitOfWork)

    @transactional(factory=audits.kind)
    def audit(text: str, uow: AuditUnitOfWork = NEW_UOW) -> AuditUnitOfWork:
        uow.notes.add(Note(text=text))
        return uow

    # The factory is the class: its instances share nothing, so give it this test's database.
    audit_class = audits.kind
    shop = FakeShopUnitOfWork()
    with pytest.raises(RuntimeError, match="payment refused"), shop:
        shop.items.add(Item("lamp"))
        ran_in = audit("order attempted")
        raise RuntimeError("payment refused")
    assert isinstance(ran_in, audit_class)
    assert ran_in is not shop
    assert (1, True) == (ran_in.commits, ran_in.committed)
    assert ["order attempted"] == notes(ran_in)
    assert ([], 0) == (notes(shop), shop.commits)


def test_service_with_a_factory_function_routes_by_its_return_annotation() -> None:
    """A factory function annotated to return an audit unit of work routes like the class itself."""
    audits = Made(FakeAuditUnitOfWork)

    def make_audit() -> FakeAuditUnitOfWork:
        return audits()

    @transactional(factory=make_audit)
    def audit(text: str, uow: Any = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    shop = FakeShopUnitOfWork()
    with shop:
        audit("from a shop block")
        shop.commit()
    assert (["from a shop block"], []) == (audits.committed, notes(shop))


def test_factory_without_annotation_routes_by_the_parameter_annotation() -> None:
    """A factory that does not say what it builds leaves the routing to the `uow` parameter's annotation."""
    audits = Made(FakeAuditUnitOfWork)

    @transactional(factory=lambda: audits())
    def audit(text: str, uow: AuditUnitOfWork = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    shop = FakeShopUnitOfWork()
    with shop:
        audit("not in the shop")
        shop.commit()
    assert (["not in the shop"], []) == (audits.committed, notes(shop))

    audit_block = audits()
    with audit_block:
        audit("joined")
        assert ["not in the shop"] == audits.committed  # joined: the block's own commit makes it durable
        audit_block.commit()
    assert ["joined", "not in the shop"] == audits.committed


def test_service_without_factory_refuses_an_active_unit_of_work_of_another_kind() -> None:
    """With no factory, an active unit of work of another kind is not joined: the call says what it needs."""

    @transactional
    def audit(text: str, uow: AuditUnitOfWork = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    shop = FakeShopUnitOfWork()
    with shop:
        with pytest.raises(errors.InactiveUnitOfWorkError, match="none of its kind \\(AuditUnitOfWork\\)"):
            audit("lost?")
        shop.commit()
    assert [] == notes(shop)


def test_a_union_annotation_joins_either_kind() -> None:
    """`uow: ShopUnitOfWork | AuditUnitOfWork` joins an active unit of work of either kind."""

    @transactional
    def write_note(text: str, uow: ShopUnitOfWork | AuditUnitOfWork = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    shop, audit = FakeShopUnitOfWork(), FakeAuditUnitOfWork()
    with shop:
        write_note("shop")
        shop.commit()
    with audit:
        write_note("audit")
        audit.commit()
    assert (["shop"], ["audit"]) == (notes(shop), notes(audit))


def test_a_unit_of_work_passed_in_is_used_whatever_its_kind() -> None:
    """A unit of work given explicitly is joined or owned, as before: routing only decides what is not given."""

    @transactional(factory=FakeAuditUnitOfWork)
    def write_note(text: str, uow: Any = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    shop = FakeShopUnitOfWork()
    with shop:
        write_note("given", uow=shop)
        shop.commit()
    assert ["given"] == notes(shop)


def test_a_service_defined_in_a_function_routes_by_a_class_defined_there() -> None:
    """A decorated function defined inside another one resolves its annotation among that one's local names."""

    class LocalAudit(uow_lib.UnitOfWork):
        notes = uow_lib.repository(Note)

    class FakeLocalAudit(uow_lib.FakeUnitOfWork, LocalAudit):
        pass

    made: list[FakeLocalAudit] = []

    def make() -> Any:
        made.append(FakeLocalAudit())
        return made[-1]

    @transactional(factory=make)
    def audit(text: str, uow: LocalAudit = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    shop = FakeShopUnitOfWork()
    with shop:
        audit("local")  # not the shop's kind: a unit of work of its own
        shop.commit()
    assert ([], ["local"]) == (notes(shop), notes(made[0]))


def test_an_annotation_that_cannot_be_resolved_is_a_configuration_error() -> None:
    """An annotation naming a class imported only for type checkers fails the first call with a clear message."""

    @transactional
    def service(uow: OnlyForTypes = NEW_UOW) -> None:
        """Annotated with a name that exists only under TYPE_CHECKING."""

    with pytest.raises(errors.ConfigurationError, match="could not resolve the annotation of its `uow` parameter"):
        service()


def test_service_joins_its_kind_when_another_kind_is_entered_inside_it() -> None:
    """With an audit block inside a shop block, a shop service joins the shop block, not a new shop unit of work."""
    shops = Made(FakeShopUnitOfWork)

    def make_shop() -> ShopUnitOfWork:
        return shops()

    @transactional(factory=make_shop)
    def add_sku(code: str, uow: ShopUnitOfWork = NEW_UOW) -> None:
        uow.skus.add(Sku(code))

    shop, audit = shops(), FakeAuditUnitOfWork()
    with pytest.raises(RuntimeError), shop:
        with audit:
            add_sku("x")
            assert shop is current(ShopUnitOfWork)
            assert audit is current()
        raise RuntimeError("the shop block fails")
    assert ([], 1) == (sorted(row["code"] for row in shops.database.rows(Sku)), len(shops.made))


@pytest.mark.parametrize("annotation", ["Annotated", "Protocol"])
def test_an_annotation_that_names_no_unit_of_work_class_is_unwrapped_or_refused(annotation: str) -> None:
    """`Annotated[Kind, ...]` routes by Kind; a Protocol, which names no unit of work class, is refused."""
    if annotation == "Annotated":

        @transactional
        def note(text: str, uow: Annotated[AuditUnitOfWork, "the audit trail"] = NEW_UOW) -> None:
            uow.notes.add(Note(text=text))

        shop = FakeShopUnitOfWork()
        with shop, pytest.raises(errors.InactiveUnitOfWorkError, match="AuditUnitOfWork"):
            note("not into the shop")
        return

    @transactional
    def protocol_note(text: str, uow: HasNotes = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    with FakeShopUnitOfWork(), pytest.raises(errors.ConfigurationError, match="names no unit of work class"):
        protocol_note("refused")


async def test_async_service_of_another_kind_runs_in_its_own_unit_of_work() -> None:
    """The routing holds for async services: an audit service inside a shop block runs in its own unit of work."""
    audits = Made(AsyncFakeAuditUnitOfWork)

    @transactional(factory=lambda: audits())
    async def audit(text: str, uow: AsyncAuditUnitOfWork = NEW_UOW) -> None:
        await uow.notes.add(Note(text=text))

    shop = AsyncFakeShopUnitOfWork()
    with pytest.raises(RuntimeError):
        async with shop:
            await shop.items.add(Item("lamp"))
            await audit("order attempted")
            raise RuntimeError("payment refused")
    assert (["order attempted"], []) == (audits.committed, notes(shop))

    @transactional
    async def in_shop(text: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        await uow.notes.add(Note(text=text))

    async with shop:
        await in_shop("joined")
        await shop.commit()
    assert ["joined"] == notes(shop)


# -- options --------------------------------------------------------------------


def test_transactional_called_with_a_function_and_options_applies_them() -> None:
    """transactional(func, factory=..., retries=...) decorates with those options instead of ignoring them."""
    shops = Made(FakeShopUnitOfWork)
    attempts: list[int] = []

    def add_note(text: str, uow: ShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        uow.notes.add(Note(text=text))
        if len(attempts) == 1:
            raise serialization_failure()

    decorated = transactional(add_note, factory=shops, retries=Retry(retries=1, sleep=lambda delay: None))
    decorated("retried once")
    assert (2, ["retried once"]) == (len(attempts), shops.committed)


def test_constructor_options_are_the_defaults_of_owner_blocks() -> None:
    """read_only= given to the constructor makes every owner block read-only unless the block asks otherwise."""
    shop = FakeShopUnitOfWork(read_only=True, isolation_level="SERIALIZABLE")
    with pytest.raises(errors.ReadOnlyError), shop:
        shop.skus.add(Sku("refused"))
        shop.skus.count()
    with shop.transaction(read_only=False):
        shop.skus.add(Sku("allowed"))
        shop.commit()
    with shop:
        assert ["allowed"] == [sku.code for sku in shop.skus.list()]
        with (
            pytest.raises(errors.JoinedScopeError, match="only the owner sets the isolation level"),
            shop.transaction(isolation_level="READ COMMITTED"),
        ):
            pass


def test_decorator_honours_the_options_of_the_unit_of_work_its_factory_builds() -> None:
    """A factory that builds read-only units of work makes decorated calls read-only, unless the decorator says."""
    shops = Made(FakeShopUnitOfWork)

    def read_only_shop() -> FakeShopUnitOfWork:
        unit = shops()
        unit.read_only = True
        return unit

    @transactional(factory=read_only_shop)
    def add_sku(code: str, uow: ShopUnitOfWork = NEW_UOW) -> None:
        uow.skus.add(Sku(code))

    with pytest.raises(errors.ReadOnlyError):
        add_sku("refused")
    transactional(factory=read_only_shop, read_only=False)(add_sku.__wrapped__)("overridden")  # type: ignore[attr-defined]
    assert ["overridden"] == sorted(row["code"] for row in shops.database.rows(Sku))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"read_only": "yes"}, "read_only takes True or False"),
        ({"isolation_level": "SNAPSHOT"}, "isolation_level must be one of"),
    ],
)
def test_bad_constructor_options_raise_configuration_error(options: dict[str, Any], match: str) -> None:
    """A constructor option of the wrong kind raises ConfigurationError when the unit of work is built."""
    with pytest.raises(errors.ConfigurationError, match=match):
        FakeShopUnitOfWork(**options)


# -- retries and durable work in child tasks and threads ------------------------


async def test_retry_does_not_repeat_work_committed_in_a_child_task() -> None:
    """An attempt whose child task (asyncio.gather) committed is not run again: its error is raised instead."""
    mails = Made(AsyncFakeAuditUnitOfWork)
    attempts: list[int] = []

    @transactional(factory=lambda: mails())
    async def send_mail(text: str, uow: AsyncAuditUnitOfWork = NEW_UOW) -> None:
        await uow.notes.add(Note(text=text))

    @transactional(factory=AsyncFakeShopUnitOfWork, retries=Retry(retries=3, sleep=lambda delay: None))
    async def place_order(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        await uow.items.add(Item("order"))
        await asyncio.gather(send_mail("order confirmation"))
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError):
        await place_order()
    assert (1, ["order confirmation"]) == (len(attempts), mails.committed)


async def test_retry_does_not_repeat_work_committed_in_a_thread_of_the_attempt() -> None:
    """Work committed in asyncio.to_thread() during an attempt also stops the retry."""
    mails = Made(FakeAuditUnitOfWork)
    attempts: list[int] = []

    @transactional(factory=lambda: mails())
    def send_mail(text: str, uow: AuditUnitOfWork = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    @transactional(factory=AsyncFakeShopUnitOfWork, retries=Retry(retries=3, sleep=lambda delay: None))
    async def place_order(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        await asyncio.to_thread(send_mail, "sent from a thread")
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError):
        await place_order()
    assert (1, ["sent from a thread"]) == (len(attempts), mails.committed)


def test_retry_does_not_repeat_work_committed_in_a_thread_with_the_attempts_context() -> None:
    """A sync attempt that commits in a thread started with its context (contextvars) is not run again."""
    mails = Made(FakeAuditUnitOfWork)
    attempts: list[int] = []

    @transactional(factory=lambda: mails())
    def send_mail(text: str, uow: AuditUnitOfWork = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    @transactional(factory=FakeShopUnitOfWork, retries=Retry(retries=3, sleep=lambda delay: None))
    def place_order(uow: ShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(functools.partial(send_mail, "mail"),))
        thread.start()
        thread.join()
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError):
        place_order()
    assert (1, ["mail"]) == (len(attempts), mails.committed)


async def test_retry_does_not_repeat_work_a_child_task_commits_during_the_pause() -> None:
    """A child task the attempt did not wait for, which commits during the retry's pause, stops the retry."""
    mails = Made(AsyncFakeAuditUnitOfWork)
    attempts: list[int] = []
    children: list[asyncio.Task[None]] = []
    entered = asyncio.Event()

    async def send_mail() -> None:
        unit = mails()
        async with unit:
            await unit.notes.add(Note(text=f"mail of attempt {len(attempts)}"))
            entered.set()
            await asyncio.sleep(0.01)
            await unit.commit()

    async def pause(delay: float) -> None:
        await asyncio.gather(*children)  # the child commits while the retry waits

    @transactional(factory=AsyncFakeShopUnitOfWork, retries=Retry(retries=3, sleep=pause))
    async def place_order(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        children.append(asyncio.create_task(send_mail()))
        await entered.wait()
        raise serialization_failure()

    with pytest.raises(sa_exc.OperationalError):
        await place_order()
    assert (1, ["mail of attempt 1"]) == (len(attempts), mails.committed)


async def test_retry_still_happens_when_the_child_task_committed_nothing() -> None:
    """A child task whose unit of work rolled back does not stop the retry: nothing durable happened."""
    mails = Made(AsyncFakeAuditUnitOfWork)
    attempts: list[int] = []

    async def count_mails() -> int:
        unit = mails()
        async with unit:  # left without commit(): rolled back
            return int(await unit.notes.count())

    @transactional(factory=AsyncFakeShopUnitOfWork, retries=Retry(retries=3, sleep=lambda delay: None))
    async def place_order(uow: AsyncShopUnitOfWork = NEW_UOW) -> int:
        attempts.append(1)
        await asyncio.gather(count_mails())
        if len(attempts) < 3:
            raise serialization_failure()
        return len(attempts)

    assert 3 == await place_order()


# -- raw-Python traps -------------------------------------------------------------


async def test_with_on_an_async_unit_of_work_says_to_use_async_with() -> None:
    """`with` on an async unit of work, or on one of its blocks, raises ConfigurationError naming `async with`."""
    unit = AsyncFakeShopUnitOfWork()
    for target in (unit, unit.transaction(), unit.savepoint()):
        with (
            pytest.raises(errors.ConfigurationError, match="enter it with `async with uow:`") as raised,
            target,  # type: ignore[attr-defined]
        ):
            pass
        assert isinstance(raised.value, TypeError)
    assert not unit.active


async def test_async_with_on_a_sync_unit_of_work_says_to_use_with() -> None:
    """`async with` on a sync unit of work, or on one of its blocks, raises ConfigurationError naming `with`."""
    unit = FakeShopUnitOfWork()
    for target in (unit, unit.transaction(), unit.savepoint()):
        with pytest.raises(errors.ConfigurationError, match="enter it with `with uow:`"):
            async with target:  # type: ignore[attr-defined]
                pass
    assert not unit.active


@pytest.mark.parametrize(
    ("abstract", "implementations"),
    [(ShopUnitOfWork, "uow.SqlAlchemyUnitOfWork"), (AsyncShopUnitOfWork, "uow.AsyncSqlAlchemyUnitOfWork")],
)
def test_instantiating_an_abstract_unit_of_work_says_what_to_subclass(abstract: Any, implementations: str) -> None:
    """The abstract unit of work refuses instantiation with a message naming the classes to subclass."""
    with pytest.raises(errors.ConfigurationError, match=implementations) as raised:
        abstract()
    assert isinstance(raised.value, TypeError)
    assert "_begin_savepoint" not in str(raised.value)


def test_user_declared_abstract_methods_are_named() -> None:
    """An implementation that leaves the user's own abstract methods open gets them listed."""
    import abc

    class WithQuery(ShopUnitOfWork):
        @abc.abstractmethod
        def best_sellers(self) -> list[Item]: ...

    class FakeWithQuery(FakeShopUnitOfWork, WithQuery):
        pass

    with pytest.raises(errors.ConfigurationError, match="best_sellers"):
        FakeWithQuery()
