"""Session lifecycle of SqlAlchemyUnitOfWork, observed through a spied session: no database."""

from __future__ import annotations

import asyncio
import logging
import threading
from unittest.mock import Mock

import pytest
from pytest_mock import MockerFixture
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tests.support.uows import AsyncSqlAlchemyShopUnitOfWork, SqlAlchemyShopUnitOfWork
from uow import errors


class Boom(Exception):
    """Raised by service code in the tests."""


@pytest.fixture(name="session")
def _session(mocker: MockerFixture) -> Mock:
    session: Mock = mocker.create_autospec(Session, instance=True)
    session.in_transaction.return_value = False
    session.info = {}
    session.new = session.deleted = session.dirty = ()
    return session


@pytest.fixture(name="async_session")
def _async_session(mocker: MockerFixture) -> Mock:
    session: Mock = mocker.create_autospec(AsyncSession, instance=True)
    session.sync_session = mocker.create_autospec(Session, instance=True)
    session.sync_session.in_transaction.return_value = False
    session.sync_session.info = {}
    session.sync_session.new = session.sync_session.deleted = session.sync_session.dirty = ()
    return session


def test_clean_exit_closes_the_session_without_committing(session: Mock) -> None:
    """Leaving without commit() closes the session, which rolls back, and never commits."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with uow:
        assert session is uow.session
    session.close.assert_called_once_with()
    session.commit.assert_not_called()
    assert uow.rolled_back


def test_each_block_gets_a_fresh_session(mocker: MockerFixture) -> None:
    """The factory is called once per block."""

    def new_session() -> Mock:
        session: Mock = mocker.create_autospec(Session, instance=True)
        session.in_transaction.return_value = False
        session.info = {}
        return session

    factory = mocker.Mock(side_effect=new_session)
    uow = SqlAlchemyShopUnitOfWork(factory)
    sessions = []
    for _ in range(3):
        with uow:
            sessions.append(uow.session)
    assert 3 == factory.call_count
    assert 3 == len({id(s) for s in sessions})


def test_session_is_unavailable_outside_the_block(session: Mock) -> None:
    """uow.session raises InactiveUnitOfWorkError before and after the block."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with pytest.raises(errors.InactiveUnitOfWorkError, match="uow.session"):
        uow.session
    with uow:
        pass
    with pytest.raises(errors.InactiveUnitOfWorkError):
        uow.session


def test_commit_commits_the_session(session: Mock) -> None:
    """commit() commits the session once and counts it."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with uow:
        uow.commit()
        session.in_transaction.return_value = False
    session.commit.assert_called_once_with()
    assert (True, 1, False) == (uow.committed, uow.commits, uow.rolled_back)


def test_error_closes_and_reraises(session: Mock) -> None:
    """An exception in the block closes the session and propagates."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with pytest.raises(Boom), uow:
        raise Boom
    session.close.assert_called_once_with()
    session.invalidate.assert_not_called()
    assert not uow.active


def test_failing_close_after_error_invalidates_and_keeps_the_original(
    session: Mock, caplog: pytest.LogCaptureFixture
) -> None:
    """If rolling back fails after an error, the connection is invalidated and the original error propagates."""
    session.close.side_effect = ConnectionError("server gone")
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with caplog.at_level(logging.ERROR, logger="uow"), pytest.raises(Boom), uow:
        raise Boom
    session.invalidate.assert_called_once_with()
    assert ["uow: closing the session after an error failed"] == [r.getMessage() for r in caplog.records]
    assert not uow.active


def test_failing_close_on_clean_exit_raises(session: Mock) -> None:
    """A close that fails on a clean exit raises its error after invalidating the connection."""
    session.close.side_effect = ConnectionError("server gone")
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with pytest.raises(ConnectionError), uow:
        pass
    session.invalidate.assert_called_once_with()
    assert not uow.active


def test_failed_commit_rolls_back_and_raises(session: Mock) -> None:
    """A commit that fails is rolled back, and its error propagates through the block."""
    session.commit.side_effect = ConnectionError("lost")
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with pytest.raises(ConnectionError), uow:
        uow.commit()
    session.rollback.assert_called_once_with()
    session.close.assert_called_once_with()
    assert (False, True) == (uow.committed, uow.rolled_back)


def test_failed_commit_and_failed_rollback_invalidate(session: Mock, caplog: pytest.LogCaptureFixture) -> None:
    """If the rollback after a failed commit fails too, the commit error propagates; the connection is invalidated."""
    session.commit.side_effect = ConnectionError("lost")
    session.rollback.side_effect = OSError("still lost")
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with caplog.at_level(logging.ERROR, logger="uow"), pytest.raises(ConnectionError), uow:
        uow.commit()
    session.invalidate.assert_called_once_with()
    session.close.assert_not_called()
    assert "rollback after an error failed" in caplog.text


def test_autocommit_failure_closes_and_raises(session: Mock) -> None:
    """With autocommit, a failing commit at exit raises and still releases the session."""
    session.commit.side_effect = ConnectionError("lost")
    uow = SqlAlchemyShopUnitOfWork(lambda: session, autocommit=True)
    with pytest.raises(ConnectionError), uow:
        uow.session.add(object())
    session.close.assert_called_once_with()
    assert not uow.active


def test_failing_factory_leaves_the_uow_inactive(mocker: MockerFixture, session: Mock) -> None:
    """If the session cannot be created, the unit of work stays usable."""
    factory = mocker.Mock(side_effect=[ConnectionError("no server"), session])
    uow = SqlAlchemyShopUnitOfWork(factory)
    with pytest.raises(ConnectionError), uow:
        pass  # pragma: no cover
    assert not uow.active
    with uow:
        assert uow.active


def test_reentry_joins_the_active_session(session: Mock) -> None:
    """Entering an active unit of work joins it: same session, no commit and no close until the owner leaves."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    commit, close = session.commit, session.close  # uow guards these on the session while it holds it
    with uow:
        with uow:
            assert session is uow.session
            uow.commit()
        commit.assert_not_called()
        close.assert_not_called()
        uow.commit()
        commit.assert_called_once_with()
    close.assert_called_once_with()


async def test_async_clean_exit_closes(async_session: Mock) -> None:
    """The async unit of work closes its session on a clean exit."""
    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session)
    async with uow:
        assert async_session is uow.session
    async_session.close.assert_awaited_once_with()
    async_session.commit.assert_not_awaited()


async def test_async_failing_close_after_error_invalidates(async_session: Mock) -> None:
    """A failing close after an error invalidates the async session and keeps the original error."""
    async_session.close.side_effect = ConnectionError("server gone")
    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session)
    with pytest.raises(Boom):
        async with uow:
            raise Boom
    async_session.invalidate.assert_awaited_once_with()


async def test_async_failed_commit_and_rollback_invalidate(async_session: Mock) -> None:
    """A failed async commit whose rollback fails too invalidates the connection."""
    async_session.commit.side_effect = ConnectionError("lost")
    async_session.rollback.side_effect = OSError("still lost")
    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session, autocommit=True)
    with pytest.raises(ConnectionError):
        async with uow:
            uow.session.add(object())
    async_session.invalidate.assert_awaited_once_with()
    assert not uow.active


async def test_async_failing_close_on_clean_exit_raises(async_session: Mock) -> None:
    """A failing async close on a clean exit raises after invalidating."""
    async_session.close.side_effect = ConnectionError("server gone")
    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session)
    with pytest.raises(ConnectionError):
        async with uow:
            pass
    async_session.invalidate.assert_awaited_once_with()


async def test_async_session_outside_block_raises(async_session: Mock) -> None:
    """The async uow.session raises InactiveUnitOfWorkError outside the block."""
    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session)
    with pytest.raises(errors.InactiveUnitOfWorkError):
        uow.session


async def test_async_failing_factory_leaves_the_uow_inactive(mocker: MockerFixture) -> None:
    """If the async session cannot be created, the unit of work stays inactive."""
    uow = AsyncSqlAlchemyShopUnitOfWork(mocker.Mock(side_effect=ConnectionError("no server")))
    with pytest.raises(ConnectionError):
        async with uow:
            pass  # pragma: no cover
    assert not uow.active


def test_repr_shows_state(session: Mock) -> None:
    """repr() of a unit of work tells whether it is active and its counters."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    assert "<SqlAlchemyShopUnitOfWork idle, commits=0, rollbacks=0>" == repr(uow)
    with uow:
        assert repr(uow).startswith("<SqlAlchemyShopUnitOfWork active")


def test_failed_rollback_to_a_savepoint_leaves_only_a_rollback(session: Mock) -> None:
    """If rolling back to a savepoint fails, the error inside propagates and the owner can only roll back."""
    session.begin_nested.return_value.rollback.side_effect = ConnectionError("server gone")
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    invalidate = session.invalidate
    with pytest.raises(errors.RollbackOnlyError), uow:
        with pytest.raises(Boom), uow.savepoint():
            raise Boom
        uow.commit()
    invalidate.assert_called_once_with()
    assert not uow.active


def test_failed_rollback_to_a_savepoint_on_a_clean_exit_raises_it(session: Mock) -> None:
    """A savepoint that must roll back (set_rollback_only) and cannot raises that failure from its exit."""
    session.begin_nested.return_value.rollback.side_effect = ConnectionError("server gone")
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with pytest.raises(ConnectionError), uow, uow.savepoint():
        uow.set_rollback_only()
    assert not uow.active


def test_on_commit_takes_a_plain_callable(session: Mock) -> None:
    """on_commit() refuses something that is not callable, and a coroutine function on a sync unit of work."""

    async def later() -> None:
        pass  # pragma: no cover

    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    with uow:
        with pytest.raises(errors.ConfigurationError, match="callable"):
            uow.on_commit("send mail")  # type: ignore[arg-type]
        with pytest.raises(errors.ConfigurationError, match="coroutine function"):
            uow.on_commit(later)


async def test_async_hooks_may_be_coroutines(async_session: Mock) -> None:
    """An async unit of work awaits what its hooks return, in registration order."""
    ran: list[str] = []

    async def first() -> None:
        ran.append("first")

    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session)
    async with uow:
        uow.on_commit(first)
        uow.on_commit(lambda: ran.append("second"))
        await uow.commit()
    assert ["first", "second"] == ran


def test_rollback_from_another_thread_raises(session: Mock) -> None:
    """rollback() from a thread that did not enter the unit of work raises OwnershipError."""
    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    raised: list[BaseException] = []

    def other() -> None:
        try:
            uow.rollback()
        except errors.OwnershipError as error:
            raised.append(error)

    with uow:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert 1 == len(raised)
    assert "thread" in str(raised[0])


async def test_async_rollback_from_another_task_raises(async_session: Mock) -> None:
    """An async rollback() from a task that did not enter the unit of work raises OwnershipError."""
    uow = AsyncSqlAlchemyShopUnitOfWork(lambda: async_session)
    async with uow:
        with pytest.raises(errors.OwnershipError, match="task"):
            await asyncio.create_task(uow.rollback())


def test_sync_hooks_may_be_mocks_but_not_awaitables(session: Mock, mocker: MockerFixture) -> None:
    """A sync unit of work runs a mock hook, and refuses, when it runs, a hook that returns an awaitable."""

    async def later() -> None:
        pass  # pragma: no cover

    uow = SqlAlchemyShopUnitOfWork(lambda: session)
    stub = mocker.MagicMock(spec=lambda: None)
    with uow:
        uow.on_commit(stub)
        uow.on_commit(lambda: later())
        with pytest.raises(errors.ConfigurationError, match="returned an awaitable"):
            uow.commit()
    stub.assert_called_once_with()
