"""The registration rules of before_commit, on_rollback and after_completion, on the fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.models import Sku
from tests.support.uows import AsyncFakeShopUnitOfWork, FakeShopUnitOfWork
from uow import errors


class Boom(Exception):
    """Raised by the services of these tests."""


@pytest.mark.parametrize("method", ["before_commit", "on_rollback", "after_completion"])
def test_lifecycle_hooks_take_plain_callables(method: str) -> None:
    """Each registration refuses a non-callable, and a coroutine function on a sync unit of work."""

    async def later(*args: object) -> None:
        pass  # pragma: no cover

    uow = FakeShopUnitOfWork()
    with uow:
        with pytest.raises(errors.ConfigurationError, match=f"{method}\\(\\) takes a callable"):
            getattr(uow, method)("send mail")
        with pytest.raises(errors.ConfigurationError, match="coroutine function"):
            getattr(uow, method)(later)


def test_a_sync_before_commit_hook_that_returns_an_awaitable_vetoes() -> None:
    """A before_commit hook of a sync unit of work that returns an awaitable raises ConfigurationError: no commit."""

    async def later() -> None:
        pass  # pragma: no cover

    uow = FakeShopUnitOfWork()
    with uow:
        uow.skus.add(Sku("a"))
        uow.before_commit(lambda: later())
        with pytest.raises(errors.ConfigurationError, match="returned an awaitable"):
            uow.commit()
    with uow:
        assert [] == uow.skus.list()


async def test_async_lifecycle_hooks_may_be_coroutines() -> None:
    """An async unit of work awaits its before_commit, on_rollback and after_completion coroutines, in order."""
    ran: list[str] = []
    uow = AsyncFakeShopUnitOfWork()

    async def audit() -> None:
        ran.append("before_commit")
        await uow.skus.add(Sku("audit"))

    async def undo() -> None:
        ran.append("on_rollback")

    async def done(status: str) -> None:
        ran.append(status)

    async with uow:
        uow.before_commit(audit)
        uow.after_completion(done)
        await uow.skus.add(Sku("a"))
        await uow.commit()
    with pytest.raises(Boom):
        async with uow:
            uow.on_rollback(undo)
            uow.after_completion(done)
            raise Boom("service")
    assert ["before_commit", "committed", "on_rollback", "rolled_back"] == ran
    async with uow:
        assert ["a", "audit"] == sorted(sku.code for sku in await uow.skus.list())


def test_a_before_commit_hook_registered_by_one_runs_in_the_same_commit() -> None:
    """A before_commit hook that registers another: both run before the flush of that commit."""
    uow = FakeShopUnitOfWork()
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        uow.before_commit(lambda: ran.append("added by first"))

    with uow:
        uow.before_commit(first)
        uow.on_commit(lambda: ran.append("on_commit"))
        uow.skus.add(Sku("a"))
        uow.commit()
    assert ["first", "added by first", "on_commit"] == ran


def test_after_completion_runs_once_per_transaction_of_a_block() -> None:
    """Each real end of a transaction runs the after_completion hooks registered since the previous one, once."""
    uow = FakeShopUnitOfWork()
    ran: list[str] = []
    with uow:
        uow.after_completion(lambda status: ran.append(f"first {status}"))
        uow.skus.add(Sku("a"))
        uow.commit()
        uow.after_completion(lambda status: ran.append(f"second {status}"))
        uow.rollback()
        uow.commit()  # nothing registered since the rollback
    assert ["first committed", "second rolled_back"] == ran


class SlowClosingUnitOfWork(AsyncFakeShopUnitOfWork):
    """Takes a while to close its session, as a rollback round trip does: time for a second cancellation."""

    closing: asyncio.Event

    async def _close(self, session: Any, *, invalidate: bool) -> None:
        self.closing.set()
        await asyncio.sleep(0.05)
        await super()._close(session, invalidate=invalidate)


async def test_a_cancellation_during_the_rollback_still_runs_the_rollback_hooks() -> None:
    """A task cancelled, then cancelled again while its session closes: the rollback hooks run, then it is cancelled."""
    unit = SlowClosingUnitOfWork()
    unit.closing = asyncio.Event()
    ran: list[str] = []
    started = asyncio.Event()

    async def service() -> None:
        async with unit:
            await unit.skus.add(Sku("a"))
            unit.on_rollback(lambda: ran.append("on_rollback"))
            unit.after_completion(ran.append)
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(service())
    await started.wait()
    task.cancel()
    await unit.closing.wait()
    task.cancel()  # a second cancellation, while the session closes
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ["on_rollback", "rolled_back"] == ran
    assert not unit.active


def test_objects_of_a_rolled_back_block_stay_readable_with_hooks() -> None:
    """Registering a hook does not expire what a rolled-back block loaded: its rollback is the session's close."""
    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add(Sku("a", stock=4))
        fake.commit()
    with pytest.raises(Boom), fake:
        sku = fake.skus.get("a")
        fake.on_rollback(lambda: None)
        raise Boom("service")
    assert sku is not None
    assert 4 == sku.stock
