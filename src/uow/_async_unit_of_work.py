"""The async unit of work and its blocks: ``_unit_of_work.py`` with ``await``.

The same steps as the sync twin, in the same order; a test compares their
method lists. What differs: the protected hooks are coroutines, cleanup
(rollback, close, ending a savepoint) runs to completion even when the task
is cancelled meanwhile, and hooks may be coroutine functions.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy.orm.exc import StaleDataError

from . import _hooks
from ._hooks import (
    AFTER_COMPLETION,
    BEFORE_COMMIT,
    ON_COMMIT,
    ON_ROLLBACK,
    Completion,
)
from ._machine import _BlockOptions, _committing_error, _UnitOfWorkCore, outcome_unknown, wrong_protocol
from ._observe import COMMITTED, FAILED_COMMIT, ROLLBACK_ONLY, ROLLED_BACK, UNKNOWN
from ._outbox import Inbox, Message, Outbox
from ._ownership import current_task
from ._repository import AsyncRepository
from ._scope import (
    CLOSED,
    CLOSED_EARLY,
    COMMIT,
    JOINED,
    NOTHING,
    OWNER,
    POISONED,
    SAVEPOINT,
    Propagation,
    State,
    _Scope,
    _Transaction,
)
from .errors import ConcurrencyError, OutboxError, _concurrency_error

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncBlock", "AsyncUnitOfWork"]

log = logging.getLogger("uow")


AU = TypeVar("AU", bound="AsyncUnitOfWork")


class AsyncUnitOfWork(_UnitOfWorkCore, abc.ABC):
    """The async twin of :class:`UnitOfWork`, used with ``async with uow:``."""

    _interface = AsyncRepository
    _sync = False
    _here = staticmethod(current_task)
    _here_fast = staticmethod(current_task)

    @abc.abstractmethod
    async def _open(self) -> Any:
        """Create and return the session of a new transaction."""

    @abc.abstractmethod
    async def _flush(self, session: Any) -> None:
        """Send the pending changes to the database."""

    @abc.abstractmethod
    async def _commit(self, session: Any) -> None:
        """Commit the session's transaction."""

    @abc.abstractmethod
    async def _rollback(self, session: Any) -> None:
        """Roll the session's transaction back."""

    @abc.abstractmethod
    async def _close(self, session: Any, *, invalidate: bool) -> None:
        """Release the session; *invalidate* means its connection is broken and must not be reused."""

    @abc.abstractmethod
    async def _begin_savepoint(self, session: Any) -> Any:
        """Begin a savepoint and return its handle."""

    async def _receive(self, session: Any, inbox: Inbox, consumer: str, message_id: str) -> bool:
        """Insert the receipt of *message_id* for *consumer* unless one exists; whether it was inserted."""
        msg = f"{type(self).__name__} cannot keep an inbox: it does not define _receive()"
        raise OutboxError(msg)

    async def _store_messages(self, session: Any, outbox: Outbox, messages: list[tuple[Message, bytes]]) -> None:
        """Write *messages*, with their payloads' bytes, to *outbox* in the session's transaction."""
        msg = f"{type(self).__name__} cannot write an outbox: it does not define _store_messages()"
        raise OutboxError(msg)

    @abc.abstractmethod
    async def _end_savepoint(self, handle: Any, *, release: bool) -> None:
        """Release the savepoint, or roll back to it; a failed release rolls back and raises."""

    # -- blocks --------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._enter_scope(self._plan("required", None, None, frame=sys._getframe(1)))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        frame = sys._getframe(1)
        scopes = self._scopes
        top = scopes[-1] if scopes else None
        if top is not None and top.frame is frame and not self._closed_early:  # the common case of _exiting()
            if top.kind is OWNER:  # and of :meth:`_exit_scope`: the innermost scope, an owner
                await self._exit_owner(top, exc)
            else:
                await self._exit_scope(top, exc)
        else:
            scope = self._exiting(frame)
            if scope is not None:
                await self._exit_scope(scope, exc)
        if exc is not None and isinstance(exc, StaleDataError) and not isinstance(exc, ConcurrencyError):
            raise _concurrency_error(exc) from exc  # an optimistic-lock conflict leaves the block as uow's error

    if not TYPE_CHECKING:  # for mypy, an async unit of work has no sync protocol at all

        def __enter__(self):
            raise wrong_protocol(self)

        def __exit__(self, exc_type, exc, tb):
            return None

    def transaction(
        self,
        *,
        propagation: Propagation = "required",
        read_only: bool | None = None,
        isolation_level: str | None = None,
    ) -> AsyncBlock[Self]:
        """A block with options, for ``async with uow.transaction(...):``; see :meth:`UnitOfWork.transaction`."""
        return AsyncBlock(self, propagation, read_only, isolation_level)

    def savepoint(self) -> AsyncBlock[Self]:
        """A savepoint inside the active block, for ``async with uow.savepoint():``.

        See :meth:`UnitOfWork.savepoint`.
        """
        return AsyncBlock(self, "nested", None, None, savepoint=True)

    async def _enter_scope(self, scope: _Scope) -> None:
        tx = scope.tx
        if scope.kind is OWNER:
            try:
                session = await self._open()
                self._adopt(session, tx.parent)
                tx.session = session
                if tx.isolation_level is not None or tx.read_only:
                    try:
                        self._prepare(tx)
                    except BaseException:
                        try:
                            await _run_to_completion(self._close(session, invalidate=False))
                        except Exception:
                            log.exception("uow: closing the session after a failed start failed")
                        raise
            except BaseException:
                self._abandon()
                raise
        elif scope.kind is SAVEPOINT:
            scope.handle = await self._begin_savepoint(tx.session)
        elif scope.narrows:
            await self._flush(tx.session)  # the writes pending so far are the outer scope's
            self._read_only_scope(tx.session, starts=True)
        self._push(scope)

    async def _exit_scope(self, scope: _Scope, exc: BaseException | None) -> None:
        if scope.state is CLOSED or scope.state is CLOSED_EARLY:
            return
        failure = interrupted = None
        if self._scopes[-1] is not scope:
            above, overlap = self._misnesting(scope)
            if overlap and scope.kind is JOINED:
                self._leave_overlapped(scope, exc)
                return
            for held in above:
                interrupted = await self._close_early(held) or interrupted
            if overlap:
                failure = self._overlap_error(scope, above)
                failure.__context__ = exc
                exc = failure
            elif exc is None:
                exc = interrupted  # cancelled while closing them: this scope does not keep its work either
        if scope.kind is JOINED:
            await self._exit_joined(scope, exc)
        elif scope.kind is SAVEPOINT:
            await self._exit_savepoint(scope, exc)
        else:
            await self._exit_owner(scope, exc)
        if failure is not None:
            self._poison_acting(failure)
            raise failure
        if interrupted is not None:
            raise interrupted

    async def _exit_joined(self, scope: _Scope, exc: BaseException | None, state: State = CLOSED) -> None:
        if isinstance(exc, GeneratorExit):
            exc = None  # a generator closed before its end: not a failure
        try:
            if exc is None and scope.narrows and scope.health.poison is None:
                await self._flush(scope.tx.session)  # a write left pending here is refused now, not at the commit
        except BaseException as error:
            self._pop(scope, state)
            self._poison(scope, error)
            raise
        finally:
            if scope.narrows:
                self._read_only_scope(scope.tx.session, starts=False)
        self._pop(scope, state)
        if exc is not None:
            self._poison(scope, exc)

    async def _exit_savepoint(self, scope: _Scope, exc: BaseException | None, state: State = CLOSED) -> None:
        release = scope.releases(exc)
        try:
            await _run_to_completion(self._end_savepoint(scope.handle, release=release))
        except BaseException as error:
            failure = self._savepoint_ended(scope, exc, release, error, state)
        else:
            failure = self._savepoint_ended(scope, exc, release, None, state)
        if failure is not None:
            raise failure

    async def _exit_owner(self, scope: _Scope, exc: BaseException | None, state: State = CLOSED) -> None:
        tx = scope.tx
        booked = False  # whether the transaction's end was booked
        try:
            if exc is None and tx.read_only and not tx.refused and scope.health.poison is None:
                await self._flush(tx.session)  # a write left pending is refused, not silently dropped
            plan = self._owner_exit_plan(scope, exc)
            if plan is COMMIT:
                booked = True  # a commit that fails books its rollback itself
                await self._commit_scope(scope)
            elif plan is not NOTHING:
                booked = True
                outcome = ROLLBACK_ONLY if plan is POISONED or scope.health.rollback_only else ROLLED_BACK
                self._rolled_back(tx, exc if exc is not None else scope.health.poison, outcome)
            if plan is POISONED:
                raise self._rollback_only_error(scope) from scope.health.poison
        except BaseException as error:
            if not booked and (tx.used or tx.hooks):  # left before its rollback was booked
                self._rolled_back(tx, error)
            await self._release(scope, True, state, ending=True)
            raise
        await self._release(scope, exc is not None, state, ending=True)

    async def _close_early(self, held: _Scope) -> BaseException | None:
        """End *held*, still open above an exiting scope, as if its generator had been closed there.

        Returns a cancellation (or another BaseException) that interrupted it,
        for the exiting scope to raise once it has ended too.
        """
        self._closing_early(held)
        try:
            if held.kind is JOINED:
                await self._exit_joined(held, None, CLOSED_EARLY)
            elif held.kind is SAVEPOINT:
                await self._exit_savepoint(held, GeneratorExit(), CLOSED_EARLY)
            else:
                await self._exit_owner(held, GeneratorExit(), CLOSED_EARLY)
        except Exception as error:
            log.exception("uow: closing a scope left open inside an exiting block failed")
            self._poison_acting(error)
        except BaseException as error:  # handed to the exiting scope, which ends first
            return error
        return None

    async def _release(self, scope: _Scope, quiet: bool, state: State, *, ending: bool = False) -> None:
        """Close the session, then run the rollback hooks if *ending*; see :meth:`UnitOfWork._release`.

        Closing must finish even if this task is cancelled meanwhile, or the
        connection would stay checked out; the hooks run too, and the
        cancellation is re-raised after.
        """
        try:
            await _run_to_completion(self._close(scope.tx.session, invalidate=scope.tx.broken))
        except Exception:
            if not quiet:
                raise
            log.exception("uow: closing the session after an error failed")
        finally:
            try:
                if ending and scope.tx.hooks:
                    await self._run_hooks(scope, ROLLED_BACK)
            finally:
                self._pop(scope, state)

    # -- the transaction -----------------------------------------------------

    async def commit(self) -> None:
        """Commit the work done so far; see :meth:`UnitOfWork.commit`."""
        scope = self._scope_for("commit()")
        if scope.kind is not OWNER or scope.health.rollback_only or scope.tx.read_only:
            self._check_may_commit(scope)
            if scope.kind is not OWNER:
                try:
                    await self._flush(scope.tx.session)  # errors surface here, in the scope that caused them
                except StaleDataError as error:
                    if isinstance(error, ConcurrencyError):
                        raise
                    raise _concurrency_error(error) from error
                return
        await self._commit_scope(scope)

    async def _commit_scope(self, scope: _Scope) -> None:
        tx = scope.tx
        if tx.committing:  # a before_commit hook called commit()
            raise _committing_error("commit()")
        unknown = False
        try:
            if tx.hooks:
                await self._before_commit(scope)
            await self._flush(tx.session)
            outbox = self.outbox
            if outbox is not None and (tx.outbox or outbox.events is not None):
                outgoing = self._outgoing(tx, outbox)
                if outgoing:
                    await self._store_messages(tx.session, outbox, outgoing)
            try:
                await self._commit(tx.session)
            except BaseException as error:
                tx.outcome_unknown = unknown = outcome_unknown(error)
                raise
        except BaseException as error:
            try:
                await _run_to_completion(self._discard(tx, error, UNKNOWN if unknown else FAILED_COMMIT))
            finally:  # a cancellation that came during the rollback is raised once the hooks have run
                if tx.hooks:
                    await self._run_hooks(scope, UNKNOWN if unknown else ROLLED_BACK)
            if isinstance(error, StaleDataError) and not isinstance(error, ConcurrencyError):
                raise _concurrency_error(error) from error
            raise
        self._committed(scope)
        if tx.hooks:
            await self._run_hooks(scope, COMMITTED)

    async def rollback(self) -> None:
        """Discard the uncommitted work of the owner's block now; see :meth:`UnitOfWork.rollback`."""
        scope = self._owner_scope("rollback()")
        await self._rollback(scope.tx.session)
        self._rolled_back_by_owner(scope)
        if scope.tx.hooks:
            await self._run_hooks(scope, ROLLED_BACK)

    async def _discard(self, tx: _Transaction, cause: BaseException | None, outcome: str = ROLLED_BACK) -> None:
        """Roll back after *cause*; log, never raise, if the rollback fails too."""
        try:
            await self._rollback(tx.session)
        except Exception:
            tx.broken = True
            log.exception("uow: rollback after an error failed; the connection will be invalidated")
        self._rolled_back(tx, cause, outcome)

    async def receive(self, message_id: str, *, consumer: str = "default") -> bool:
        """Record that this transaction handles the message *message_id*; False if *consumer* handled it before.

        Call it first in the block that handles a message, and skip the
        work when it returns False: the receipt is written to the inbox in
        the same transaction as the work, so a message delivered twice is
        handled once. A second delivery handled at the same time waits for
        the first transaction, and returns False once it commits, True if it
        rolls back. Needs an :class:`~uow.Inbox` declared on the unit of
        work's class.
        """
        inbox, scope = self._inbox_for(message_id, consumer)
        return await self._receive(scope.tx.session, inbox, consumer, message_id)

    def on_commit(self, callback: Callable[[], object], *, robust: bool = False) -> None:
        """Run *callback* after the outermost real commit; see :meth:`UnitOfWork.on_commit`.

        The callback may be a coroutine function: what it returns is awaited.
        """
        self._add_hook(ON_COMMIT, callback, robust)

    def before_commit(self, callback: Callable[[], object]) -> None:
        """Run *callback* inside the transaction when the owner commits it; see :meth:`UnitOfWork.before_commit`.

        The callback may be a coroutine function: what it returns is awaited.
        """
        self._add_hook(BEFORE_COMMIT, callback)

    def on_rollback(self, callback: Callable[[], object]) -> None:
        """Run *callback* after a real rollback; see :meth:`UnitOfWork.on_rollback`.

        The callback may be a coroutine function: what it returns is awaited.
        """
        self._add_hook(ON_ROLLBACK, callback)

    def after_completion(self, callback: Callable[[Completion], object]) -> None:
        """Run *callback* with the status once the transaction ended; see :meth:`UnitOfWork.after_completion`.

        The callback may be a coroutine function: what it returns is awaited.
        """
        self._add_hook(AFTER_COMPLETION, callback)

    async def _before_commit(self, scope: _Scope) -> None:
        tx = scope.tx
        tx.committing = True
        try:
            await _hooks.run_before_commit_async(tx.hooks)
        finally:
            tx.committing = False
        self._before_commit_ran(scope)

    async def _run_hooks(self, scope: _Scope, status: Completion) -> None:
        started = self._start_hooks(scope, status)
        try:
            await _hooks.run_hooks_async(scope.tx.hooks, status)
        finally:
            self._end_hooks(started)


class AsyncBlock(_BlockOptions, Generic[AU]):
    """A block of an async unit of work, from :meth:`AsyncUnitOfWork.transaction`; use it with ``async with``.

    It holds the scope it entered, and its exit leaves that scope.
    """

    __slots__ = ()

    _unit: AU

    if TYPE_CHECKING:  # the options' __init__ takes the unit of work: no call through super() on every block

        def __init__(self, unit: AU, *args: Any, **kwargs: Any) -> None: ...

    async def __aenter__(self) -> AU:
        scope = self._plan(self._unit, sys._getframe(1))
        await self._unit._enter_scope(scope)
        self._scope = scope
        return self._unit

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope = self._scope
        if scope is None:
            return
        unit = self._unit
        if scope.kind is OWNER and unit._scopes and unit._scopes[-1] is scope:
            await unit._exit_owner(scope, exc)  # the common case of _exit_scope(): the innermost scope, an owner
        elif scope.state is CLOSED_EARLY:  # an outer block's exit closed it while its generator was paused
            unit._forget(scope)
        else:
            await unit._exit_scope(scope, exc)

    if not TYPE_CHECKING:

        def __enter__(self):
            raise wrong_protocol(self._unit)

        def __exit__(self, exc_type, exc, tb):
            return None


T = TypeVar("T")


async def _run_to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* to its end even if this task is cancelled meanwhile, then re-raise the cancellation."""
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError as error:
            if task.done():
                raise
            cancelled = error
        else:
            break
    if cancelled is not None:
        raise cancelled
    return result
