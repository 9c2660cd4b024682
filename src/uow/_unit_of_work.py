"""The sync unit of work and its blocks: they drive the state machine and do the I/O it calls for.

Every method asks ``_UnitOfWorkCore`` (``_machine.py``) what to do, calls
the protected hooks that an implementation fills (``_open``, ``_flush``,
``_commit``, ``_rollback``, ``_close``, the savepoint hooks), and reports
back. ``_async_unit_of_work.py`` is the same file with ``await``: a test
compares their method lists.
"""

from __future__ import annotations

import abc
import logging
import sys
import threading
from collections.abc import Callable
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
from ._ownership import thread_and_task
from ._repository import Repository
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

__all__ = ["Block", "UnitOfWork"]

log = logging.getLogger("uow")


U = TypeVar("U", bound="UnitOfWork")


class UnitOfWork(_UnitOfWorkCore, abc.ABC):
    """The abstract unit of work that services are typed against.

    Subclass it to declare repositories with :func:`repository`, then build
    each implementation from that one declaration::

        class AllocationUnitOfWork(uow.UnitOfWork):
            batches = uow.repository(Batch)

        class SqlAlchemyAllocationUnitOfWork(uow.SqlAlchemyUnitOfWork, AllocationUnitOfWork):
            pass

        class FakeAllocationUnitOfWork(uow.FakeUnitOfWork, AllocationUnitOfWork):
            pass

    *autocommit* makes the owner's block commit on a clean exit.
    *read_only* and *isolation_level* are the defaults of the transactions
    that this unit of work starts; ``uow.transaction(...)`` overrides them
    for one block.
    """

    _interface = Repository
    _sync = True
    _here = staticmethod(thread_and_task)
    _here_fast = staticmethod(threading.get_ident)

    @abc.abstractmethod
    def _open(self) -> Any:
        """Create and return the session of a new transaction."""

    @abc.abstractmethod
    def _flush(self, session: Any) -> None:
        """Send the pending changes to the database."""

    @abc.abstractmethod
    def _commit(self, session: Any) -> None:
        """Commit the session's transaction."""

    @abc.abstractmethod
    def _rollback(self, session: Any) -> None:
        """Roll the session's transaction back."""

    @abc.abstractmethod
    def _close(self, session: Any, *, invalidate: bool) -> None:
        """Release the session; *invalidate* means its connection is broken and must not be reused."""

    @abc.abstractmethod
    def _begin_savepoint(self, session: Any) -> Any:
        """Begin a savepoint and return its handle."""

    def _receive(self, session: Any, inbox: Inbox, consumer: str, message_id: str) -> bool:
        """Insert the receipt of *message_id* for *consumer* unless one exists; whether it was inserted."""
        msg = f"{type(self).__name__} cannot keep an inbox: it does not define _receive()"
        raise OutboxError(msg)

    def _store_messages(self, session: Any, outbox: Outbox, messages: list[tuple[Message, bytes]]) -> None:
        """Write *messages*, with their payloads' bytes, to *outbox* in the session's transaction."""
        msg = f"{type(self).__name__} cannot write an outbox: it does not define _store_messages()"
        raise OutboxError(msg)

    @abc.abstractmethod
    def _end_savepoint(self, handle: Any, *, release: bool) -> None:
        """Release the savepoint, or roll back to it; a failed release rolls back and raises."""

    # -- blocks --------------------------------------------------------------

    def __enter__(self) -> Self:
        self._enter_scope(self._plan("required", None, None, frame=sys._getframe(1)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        frame = sys._getframe(1)
        scopes = self._scopes
        top = scopes[-1] if scopes else None
        if top is not None and top.frame is frame and not self._closed_early:  # the common case of _exiting()
            if top.kind is OWNER:  # and of :meth:`_exit_scope`: the innermost scope, an owner
                self._exit_owner(top, exc)
            else:
                self._exit_scope(top, exc)
        else:
            scope = self._exiting(frame)
            if scope is not None:
                self._exit_scope(scope, exc)
        if exc is not None and isinstance(exc, StaleDataError) and not isinstance(exc, ConcurrencyError):
            raise _concurrency_error(exc) from exc  # an optimistic-lock conflict leaves the block as uow's error

    if not TYPE_CHECKING:  # for mypy, a sync unit of work has no async protocol at all

        async def __aenter__(self):
            raise wrong_protocol(self)

        async def __aexit__(self, exc_type, exc, tb):
            return None

    def transaction(
        self,
        *,
        propagation: Propagation = "required",
        read_only: bool | None = None,
        isolation_level: str | None = None,
    ) -> Block[Self]:
        """A block with options, for ``with uow.transaction(...):``; ``with uow:`` is the default one.

        *propagation* says what to do when this unit of work is already
        active: ``"required"`` joins it (or starts a transaction when none
        is active), ``"requires_new"`` suspends it and runs a transaction of
        its own, ``"nested"`` runs in a savepoint, ``"mandatory"`` joins and
        raises if there is nothing to join, ``"never"`` raises if there is.
        *read_only* and *isolation_level* apply to a transaction that this
        block starts (the unit of work's own settings when not given); a
        joined block may only ask for what is already set.
        """
        return Block(self, propagation, read_only, isolation_level)

    def savepoint(self) -> Block[Self]:
        """A savepoint inside the active block, for ``with uow.savepoint():``.

        An exception inside rolls back to the savepoint only, drops the
        ``on_commit`` hooks registered inside, and propagates; the outer
        transaction stays healthy. A clean exit releases the savepoint.
        """
        return Block(self, "nested", None, None, savepoint=True)

    def _enter_scope(self, scope: _Scope) -> None:
        tx = scope.tx
        if scope.kind is OWNER:
            try:
                session = self._open()
                self._adopt(session, tx.parent)
                tx.session = session
                if tx.isolation_level is not None or tx.read_only:
                    try:
                        self._prepare(tx)
                    except BaseException:
                        try:
                            self._close(session, invalidate=False)
                        except Exception:
                            log.exception("uow: closing the session after a failed start failed")
                        raise
            except BaseException:
                self._abandon()
                raise
        elif scope.kind is SAVEPOINT:
            scope.handle = self._begin_savepoint(tx.session)
        elif scope.narrows:
            self._flush(tx.session)  # the writes pending so far are the outer scope's
            self._read_only_scope(tx.session, starts=True)
        self._push(scope)

    def _exit_scope(self, scope: _Scope, exc: BaseException | None) -> None:
        if scope.state is CLOSED or scope.state is CLOSED_EARLY:
            return
        failure = interrupted = None
        if self._scopes[-1] is not scope:
            above, overlap = self._misnesting(scope)
            if overlap and scope.kind is JOINED:
                self._leave_overlapped(scope, exc)
                return
            for held in above:
                interrupted = self._close_early(held) or interrupted
            if overlap:
                failure = self._overlap_error(scope, above)
                failure.__context__ = exc
                exc = failure
            elif exc is None:
                exc = interrupted  # cancelled while closing them: this scope does not keep its work either
        if scope.kind is JOINED:
            self._exit_joined(scope, exc)
        elif scope.kind is SAVEPOINT:
            self._exit_savepoint(scope, exc)
        else:
            self._exit_owner(scope, exc)
        if failure is not None:
            self._poison_acting(failure)
            raise failure
        if interrupted is not None:
            raise interrupted

    def _exit_joined(self, scope: _Scope, exc: BaseException | None, state: State = CLOSED) -> None:
        if isinstance(exc, GeneratorExit):
            exc = None  # a generator closed before its end: not a failure
        try:
            if exc is None and scope.narrows and scope.health.poison is None:
                self._flush(scope.tx.session)  # a write left pending here is refused now, not at the commit
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

    def _exit_savepoint(self, scope: _Scope, exc: BaseException | None, state: State = CLOSED) -> None:
        release = scope.releases(exc)
        try:
            self._end_savepoint(scope.handle, release=release)
        except BaseException as error:
            failure = self._savepoint_ended(scope, exc, release, error, state)
        else:
            failure = self._savepoint_ended(scope, exc, release, None, state)
        if failure is not None:
            raise failure

    def _exit_owner(self, scope: _Scope, exc: BaseException | None, state: State = CLOSED) -> None:
        tx = scope.tx
        booked = False  # whether the transaction's end was booked
        try:
            if exc is None and tx.read_only and not tx.refused and scope.health.poison is None:
                self._flush(tx.session)  # a write left pending is refused, not silently dropped
            plan = self._owner_exit_plan(scope, exc)
            if plan is COMMIT:
                booked = True  # a commit that fails books its rollback itself
                self._commit_scope(scope)
            elif plan is not NOTHING:
                booked = True
                outcome = ROLLBACK_ONLY if plan is POISONED or scope.health.rollback_only else ROLLED_BACK
                self._rolled_back(tx, exc if exc is not None else scope.health.poison, outcome)
            if plan is POISONED:
                raise self._rollback_only_error(scope) from scope.health.poison
        except BaseException as error:
            if not booked and (tx.used or tx.hooks):  # left before its rollback was booked
                self._rolled_back(tx, error)
            self._release(scope, True, state, ending=True)
            raise
        self._release(scope, exc is not None, state, ending=True)

    def _close_early(self, held: _Scope) -> BaseException | None:
        """End *held*, still open above an exiting scope, as if its generator had been closed there.

        Returns a cancellation (or another BaseException) that interrupted it,
        for the exiting scope to raise once it has ended too.
        """
        self._closing_early(held)
        try:
            if held.kind is JOINED:
                self._exit_joined(held, None, CLOSED_EARLY)
            elif held.kind is SAVEPOINT:
                self._exit_savepoint(held, GeneratorExit(), CLOSED_EARLY)
            else:
                self._exit_owner(held, GeneratorExit(), CLOSED_EARLY)
        except Exception as error:
            log.exception("uow: closing a scope left open inside an exiting block failed")
            self._poison_acting(error)
        except BaseException as error:  # handed to the exiting scope, which ends first
            return error
        return None

    def _release(self, scope: _Scope, quiet: bool, state: State, *, ending: bool = False) -> None:
        """Close the session, which rolls back what was not committed; then, if *ending*, run the rollback hooks.

        The hooks run after the close, as after ``rollback()`` they would see
        expired objects, and before the scope is gone: one that enters the
        unit of work starts a transaction of its own.
        """
        try:
            self._close(scope.tx.session, invalidate=scope.tx.broken)
        except Exception:
            if not quiet:
                raise
            log.exception("uow: closing the session after an error failed")
        finally:
            try:
                if ending and scope.tx.hooks:
                    self._run_hooks(scope, ROLLED_BACK)
            finally:
                self._pop(scope, state)

    # -- the transaction -----------------------------------------------------

    def commit(self) -> None:
        """Commit the work done so far.

        In the owner's block this commits for real, then runs the
        ``on_commit`` hooks. In a joined scope or a savepoint it only records
        that the work is done: the owner's commit makes it durable. If the
        commit fails, the work is rolled back and the error raised.
        """
        scope = self._scope_for("commit()")
        if scope.kind is not OWNER or scope.health.rollback_only or scope.tx.read_only:
            self._check_may_commit(scope)
            if scope.kind is not OWNER:
                try:
                    self._flush(scope.tx.session)  # errors surface here, in the scope that caused them
                except StaleDataError as error:
                    if isinstance(error, ConcurrencyError):
                        raise
                    raise _concurrency_error(error) from error
                return
        self._commit_scope(scope)

    def _commit_scope(self, scope: _Scope) -> None:
        tx = scope.tx
        if tx.committing:  # a before_commit hook called commit()
            raise _committing_error("commit()")
        unknown = False
        try:
            if tx.hooks:
                self._before_commit(scope)
            self._flush(tx.session)
            outbox = self.outbox
            if outbox is not None and (tx.outbox or outbox.events is not None):
                outgoing = self._outgoing(tx, outbox)
                if outgoing:
                    self._store_messages(tx.session, outbox, outgoing)
            try:
                self._commit(tx.session)
            except BaseException as error:
                tx.outcome_unknown = unknown = outcome_unknown(error)
                raise
        except BaseException as error:
            try:
                self._discard(tx, error, UNKNOWN if unknown else FAILED_COMMIT)
            finally:
                if tx.hooks:
                    self._run_hooks(scope, UNKNOWN if unknown else ROLLED_BACK)
            if isinstance(error, StaleDataError) and not isinstance(error, ConcurrencyError):
                raise _concurrency_error(error) from error
            raise
        self._committed(scope)
        if tx.hooks:
            self._run_hooks(scope, COMMITTED)

    def rollback(self) -> None:
        """Discard the uncommitted work of the owner's block now; the block goes on.

        In a joined scope or a savepoint it raises
        :class:`~uow.errors.JoinedScopeError`: raise an exception instead, so
        that the owner rolls back, or use :meth:`savepoint`.
        """
        scope = self._owner_scope("rollback()")
        self._rollback(scope.tx.session)
        self._rolled_back_by_owner(scope)
        if scope.tx.hooks:
            self._run_hooks(scope, ROLLED_BACK)

    def _discard(self, tx: _Transaction, cause: BaseException | None, outcome: str = ROLLED_BACK) -> None:
        """Roll back after *cause*; log, never raise, if the rollback fails too."""
        try:
            self._rollback(tx.session)
        except Exception:
            tx.broken = True
            log.exception("uow: rollback after an error failed; the connection will be invalidated")
        self._rolled_back(tx, cause, outcome)

    def receive(self, message_id: str, *, consumer: str = "default") -> bool:
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
        return self._receive(scope.tx.session, inbox, consumer, message_id)

    def on_commit(self, callback: Callable[[], object], *, robust: bool = False) -> None:
        """Run *callback* after the outermost real commit of this transaction.

        Hooks run in the order they were registered, and a hook registered by
        a hook runs in the same pass. They are dropped when the transaction
        rolls back, and with a savepoint that rolls back. A hook that raises
        stops the others and the error propagates from ``commit()``, after
        the data was committed; with ``robust=True`` the error is logged and
        the next hook runs.
        """
        self._add_hook(ON_COMMIT, callback, robust)

    def before_commit(self, callback: Callable[[], object]) -> None:
        """Run *callback* when the owner commits this transaction, inside it, before its changes are flushed.

        The callback may still read and write through the unit of work. One
        that raises vetoes the commit: the transaction rolls back and the
        error propagates from ``commit()``. Hooks run in registration order;
        one registered by a hook runs in the same pass. A savepoint that
        rolls back drops the hooks registered inside it.
        """
        self._add_hook(BEFORE_COMMIT, callback)

    def on_rollback(self, callback: Callable[[], object]) -> None:
        """Run *callback* after this transaction rolls back for real, a failed commit included.

        Not after a commit whose outcome is unknown (the connection was lost
        during COMMIT): the work may be committed, so nothing that undoes it
        runs. A savepoint that rolls back drops the hooks registered inside
        it without running them. A hook that raises is logged; the next runs.
        """
        self._add_hook(ON_ROLLBACK, callback)

    def after_completion(self, callback: Callable[[Completion], object]) -> None:
        """Run *callback* once this transaction has ended, with how it ended.

        The status is ``"committed"``, ``"rolled_back"``, or ``"unknown"`` when
        the COMMIT failed in a way that may still have reached the database.
        It runs after the ``on_commit`` or ``on_rollback`` hooks. A hook that
        raises is logged; the next runs.
        """
        self._add_hook(AFTER_COMPLETION, callback)

    def _before_commit(self, scope: _Scope) -> None:
        tx = scope.tx
        tx.committing = True
        try:
            _hooks.run_before_commit(tx.hooks)
        finally:
            tx.committing = False
        self._before_commit_ran(scope)

    def _run_hooks(self, scope: _Scope, status: Completion) -> None:
        started = self._start_hooks(scope, status)
        try:
            _hooks.run_hooks(scope.tx.hooks, status)
        finally:
            self._end_hooks(started)


class Block(_BlockOptions, Generic[U]):
    """A block of a sync unit of work, from :meth:`UnitOfWork.transaction`; use it with ``with``.

    It holds the scope it entered, and its exit leaves that scope.
    """

    __slots__ = ()

    _unit: U

    if TYPE_CHECKING:  # the options' __init__ takes the unit of work: no call through super() on every block

        def __init__(self, unit: U, *args: Any, **kwargs: Any) -> None: ...

    def __enter__(self) -> U:
        scope = self._plan(self._unit, sys._getframe(1))
        self._unit._enter_scope(scope)
        self._scope = scope
        return self._unit

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope = self._scope
        if scope is None:
            return
        unit = self._unit
        if scope.kind is OWNER and unit._scopes and unit._scopes[-1] is scope:
            unit._exit_owner(scope, exc)  # the common case of _exit_scope(): the innermost scope, an owner
        elif scope.state is CLOSED_EARLY:  # an outer block's exit closed it while its generator was paused
            unit._forget(scope)
        else:
            unit._exit_scope(scope, exc)

    if not TYPE_CHECKING:

        async def __aenter__(self):
            raise wrong_protocol(self._unit)

        async def __aexit__(self, exc_type, exc, tb):
            return None
