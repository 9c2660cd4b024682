"""The transaction rules of a unit of work, as one state machine that does no I/O.

``_UnitOfWorkCore`` keeps the open scopes of a unit of work, outermost
first, and decides every step: what entering a scope means, which scope the
running code acts in, whether a use is allowed, what a leaving owner does,
which scopes an exit must close first. The sync and async twins
(``_unit_of_work.py``, ``_async_unit_of_work.py``) ask it, do the I/O it
calls for through the protected hooks an implementation fills, await where
they must, and report back. Nothing else changes its state.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextvars import Token
from types import FrameType
from typing import TYPE_CHECKING, Any

import attrs

from . import _hooks, _observe
from ._declare import _Declarations
from ._outbox import Inbox, Message, Outbox
from ._ownership import (
    _CONTEXTLIB,
    _ENTER_NAMES,
    _GENERATOR_FLAGS,
    _current,
    describe,
    holder_of,
    on_this_stack,
    waits_for,
    where,
)
from ._scope import (
    CLOSED,
    CLOSED_EARLY,
    COMMIT,
    ISOLATION_LEVELS,
    JOINED,
    NOTHING,
    OPEN,
    OWNER,
    POISONED,
    PROPAGATIONS,
    ROLLBACK,
    SAVEPOINT,
    SEALED,
    Plan,
    State,
    _Health,
    _Scope,
    _Transaction,
    check_isolation_level,
    check_options,
)
from .errors import (
    ActiveUnitOfWorkError,
    ConfigurationError,
    InactiveUnitOfWorkError,
    JoinedScopeError,
    OutboxError,
    OwnershipError,
    ReadOnlyError,
    RollbackOnlyError,
    is_retryable,
)

log = logging.getLogger("uow")
_log_enabled = log.isEnabledFor
_INFO = logging.INFO


_Started = tuple[Token[_Transaction | None], _Scope, State]


class _UnitOfWorkCore(_Declarations):
    """The state machine shared by the sync and async units of work; does no I/O."""

    #: Where :meth:`publish` writes, declared on the unit of work class; None: publishing is refused.
    outbox: Outbox | None = None
    #: Where ``receive()`` records the messages handled, declared on the unit of work class; None: refused.
    inbox: Inbox | None = None

    def __init__(
        self, *, autocommit: bool = False, read_only: bool = False, isolation_level: str | None = None
    ) -> None:
        if autocommit.__class__ is not bool or read_only.__class__ is not bool:
            name, flag = ("autocommit", autocommit) if autocommit.__class__ is not bool else ("read_only", read_only)
            msg = f"{name} takes True or False, not {flag!r}"
            raise ConfigurationError(msg)
        if isolation_level is not None:
            check_isolation_level(isolation_level)
        #: Commit on a clean exit from the owner's block instead of rolling back.
        self.autocommit = autocommit
        #: The defaults of the transactions this unit of work starts, unless a block asks otherwise.
        self.read_only = read_only
        self.isolation_level = isolation_level
        #: Whether the current or latest block committed.
        self.committed = False
        #: Whether the latest block ended by rolling back uncommitted work.
        self.rolled_back = False
        #: Real commits over the life of this object.
        self.commits = 0
        #: Rollbacks of uncommitted work over the life of this object.
        self.rollbacks = 0
        # The open scopes, outermost first.
        self._scopes: list[_Scope] = []
        # Where the outermost scope was entered: thread and task (sync) or task (async). Taken by the
        # thread or task that holds the claim, and only while it holds it.
        self._owner: object = None
        self._claim = threading.Lock()
        # Scopes that an outer block's exit closed early, while a paused generator still held them: their
        # own exits do nothing, and their generators, if they resume, may not use the unit of work. An
        # empty tuple until the first one: most units of work never need the list.
        self._closed_early: list[_Scope] | tuple[()] = ()
        # How many scopes were entered so far: the order of scopes entered in the same frame.
        self._serial = 0
        self._events: deque[object] = deque()

    # -- protected hooks for implementations ---------------------------------

    @abc.abstractmethod
    def _adopt(self, session: Any, parent: _Transaction | None) -> None:
        """Take charge of a new *session*; raise ConfigurationError if it would share work with *parent*.

        *parent* is the transaction active in this context, if any: in this thread or task, or in the
        task or thread whose context this one copied.
        """

    @abc.abstractmethod
    def _has_changes(self, session: Any) -> bool:
        """Whether *session* holds changes not yet committed, such as an attribute set on a loaded object."""

    @abc.abstractmethod
    def _read_only_scope(self, session: Any, *, starts: bool) -> None:
        """A read-only scope inside a read-write one starts or ends: writes made inside it must be found."""

    @abc.abstractmethod
    def _prepare(self, tx: _Transaction) -> None:
        """Make the transaction's connections use its isolation level and read-only mode; no I/O."""

    @abc.abstractmethod
    def _guard_writes(self, tx: _Transaction) -> None:
        """Make flushes of *tx*'s session raise ReadOnlyError while :meth:`_writes_forbidden`."""

    def _guard_session(self, tx: _Transaction) -> None:
        """Make *tx*'s session refuse ``commit()``, ``rollback()`` and ``close()`` from scopes above its owner.

        Called once per transaction, when the first scope is entered on top of
        its owner's: until then only the owner can reach the session.
        """

    if TYPE_CHECKING:
        #: Leave a scope: each twin defines it, sync or to be awaited.
        _exit_scope: Callable[[_Scope, BaseException | None], Any]

    @staticmethod
    def _here() -> object:
        """Where the code runs: a thread id on a sync, a task on an async unit of work."""
        raise NotImplementedError  # pragma: no cover - each twin sets its own

    @staticmethod
    def _here_fast() -> object:
        """:meth:`_here` as the fast paths ask it, in one C call: equal to the owner in the common case only.

        For a sync unit of work, the thread: a unit of work entered outside
        any event loop belongs to its thread, and one entered in a task (whose
        owner is a thread and a task) takes the full check.
        """
        raise NotImplementedError  # pragma: no cover - each twin sets its own

    # -- entering --------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a block of this unit of work is running."""
        return bool(self._scopes)

    def _plan(
        self,
        propagation: str,
        read_only: bool | None,
        isolation_level: str | None,
        *,
        commit_on_exit: bool = False,
        savepoint: bool = False,
        frame: FrameType | None = None,
        bare: bool = True,
    ) -> _Scope:
        """Decide what entering a scope means now; an owner on an idle unit of work claims it. No I/O.

        *frame* is the frame that enters the scope; a ``with uow:`` statement
        (*bare*) leaves it from there too.
        """
        if propagation not in PROPAGATIONS or (isolation_level is not None and isolation_level not in ISOLATION_LEVELS):
            check_options(propagation, isolation_level)
        if not self._scopes:
            if savepoint:
                raise _inactive("savepoint()")
            if propagation == "mandatory":
                msg = (
                    f"propagation='mandatory' needs an active {type(self).__name__} to join, and none is "
                    "active: call this code inside `with uow:`"
                )
                raise InactiveUnitOfWorkError(msg)
            # Claim the idle unit of work for this thread or task in one atomic step, before any I/O.
            here = self._here()
            if not self._claim.acquire(False):  # positional: a keyword costs more on every block
                raise self._claimed(here)
            self._owner = here
            scope = self._new_owner(read_only, isolation_level, commit_on_exit)
        else:
            scope = self._plan_inside(propagation, read_only, isolation_level, commit_on_exit)
        if frame is not None:
            if bare:
                scope.frame = frame
            code = frame.f_code
            # The cheap test of whether a generator may hold it: a few reads, and no hash of the code object,
            # which covers its constants and costs microseconds for a large function.
            if code.co_flags & _GENERATOR_FLAGS or code.co_name in _ENTER_NAMES or frame.f_globals is _CONTEXTLIB:
                scope.holder = holder_of(frame)
        return scope

    def _plan_inside(
        self, propagation: str, read_only: bool | None, isolation_level: str | None, commit_on_exit: bool
    ) -> _Scope:
        self._check_owner()  # first: another thread's block may end meanwhile, and the unit must not look idle
        acting = self._check_use("entering a scope")
        if propagation == "never":
            msg = f"propagation='never' found {type(self).__name__} active: call this code outside any block"
            raise ActiveUnitOfWorkError(msg)
        if propagation == "requires_new" or acting.state is SEALED:
            # A sealed scope's transaction has ended (its hooks run) or its request has answered.
            return self._new_owner(read_only, isolation_level, commit_on_exit)
        tx = acting.tx
        if isolation_level is not None and isolation_level != tx.isolation_level:
            shown = tx.isolation_level or "the default level"
            msg = (
                f"a joined scope asked for isolation_level={isolation_level!r}, but the transaction it joins "
                f"runs at {shown}: only the owner sets the isolation level. Set it where the transaction "
                "starts, or use propagation='requires_new'"
            )
            raise JoinedScopeError(msg)
        if read_only is False and acting.read_only:
            msg = (
                "a read-write scope cannot join a read-only transaction: make the outer scope read-write, "
                "or use propagation='requires_new'"
            )
            raise JoinedScopeError(msg)
        scope_read_only = acting.read_only if read_only is None else read_only
        if propagation == "nested":
            return _Scope(SAVEPOINT, tx, scope_read_only, _Health())
        scope = _Scope(JOINED, tx, scope_read_only, acting.health)
        scope.narrows = scope_read_only and not acting.read_only
        return scope

    def _new_owner(self, read_only: bool | None, isolation_level: str | None, commit_on_exit: bool) -> _Scope:
        """The owner scope of a new transaction; the unit of work's own options fill what the block leaves open."""
        scope_read_only = self.read_only if read_only is None else read_only
        tx = _Transaction(self, scope_read_only, isolation_level or self.isolation_level)
        parent = _current.get()
        if parent is not None and parent.open:
            tx.parent = parent
        if commit_on_exit:
            tx.commit_on_exit = True
        return _Scope(OWNER, tx, scope_read_only, tx)

    def _claimed(self, here: object) -> OwnershipError:
        """The error for entering a unit of work that another thread or task claimed at the same time."""
        holder = describe(self._owner) if self._owner is not None else "another thread or task"
        msg = (
            f"{type(self).__name__} is in use by {holder}, and {describe(here)} tried to enter it at the same "
            "time: sessions are not thread- or task-safe. Give each thread and task its own unit of work"
        )
        return self._violated(OwnershipError(msg))

    def _abandon(self) -> None:
        """Entering an owner failed before its scope was pushed: give the claim back if nothing else holds it."""
        if not self._scopes:
            self._owner = None
            self._claim.release()

    def _push(self, scope: _Scope) -> None:
        """Make *scope* the innermost; for an owner, after its session is open."""
        scopes = self._scopes
        if scopes and not scopes[-1].tx.session_guarded:
            self._nest(scopes[-1].tx)
        tx = scope.tx
        if scope.kind is OWNER:
            if not scopes:
                self.committed = False
                self.rolled_back = False
            tx.token = _current.set(tx)
            if _observe.telemetry is not None or _log_enabled(_INFO):
                _observe.begin(self, tx)
        elif scope.kind is SAVEPOINT:
            scope.hook_mark = len(tx.hooks)
            scope.event_marks = _hooks.event_marks(tx)
            scope.outbox_mark = len(tx.outbox)
            if tx.watch is not None:
                tx.watch.savepoints += 1
        if scope.read_only and not tx.write_guarded:
            tx.write_guarded = True
            self._guard_writes(tx)
        self._serial += 1
        scope.serial = self._serial
        scopes.append(scope)

    def _nest(self, tx: _Transaction) -> None:
        """A scope is entered on top of *tx*'s innermost one."""
        tx.session_guarded = True
        self._guard_session(tx)

    def _join_here(self) -> _Scope | None:
        """For the decorator's fast path: join the healthy transaction this thread or task runs, or None."""
        scopes = self._scopes
        if not scopes:
            return None
        top = scopes[-1]
        if top.state is not OPEN or top.holder is not None or top.health.poison is not None:
            return None
        if self._closed_early or self._owner != self._here_fast():
            return None
        tx = top.tx
        if not tx.session_guarded:
            self._nest(tx)
        health = top.health
        scope = health.spare  # nested decorated calls each take one: the spare, or a new one
        if scope is not None and scope.read_only is top.read_only and scope.tx is tx:
            health.spare = None
        else:
            scope = _Scope(JOINED, tx, top.read_only, health)
        scopes.append(scope)
        return scope

    def _leave_joined(self, scope: _Scope, error: BaseException | None) -> bool:
        """Leave a joined scope of the decorator's fast path; False if it is not innermost (take the full exit)."""
        scopes = self._scopes
        if not scopes or scopes[-1] is not scope:
            return False
        scopes.pop()
        if error is not None:
            self._poison(scope, error)
        scope.health.spare = scope  # left cleanly from the innermost place: reusable, still open
        return True

    # -- leaving ---------------------------------------------------------------

    def _pop(self, scope: _Scope, state: State = CLOSED) -> None:
        """Remove *scope*, the innermost, and close what it owned."""
        scopes = self._scopes
        scopes.pop()  # the callers pop the innermost scope only
        scope.state = state
        if state is CLOSED_EARLY:
            if scope.frame is not None or scope.holder is not None:
                if not self._closed_early:
                    self._closed_early = []
                self._closed_early.append(scope)  # its frames stay until its own exit comes
        elif scope.holder is not None:
            scope.holder = None  # a generator's frame may hold a block that holds this scope: no cycle
        # A spare joined scope points back to its transaction: dropped with it, so that no cycle stays.
        kind = scope.kind
        if kind is OWNER:
            tx = scope.tx
            tx.open = False
            tx.spare = None
            if tx.watch is not None:
                _observe.closed(tx)
            repositories = tx.repositories
            for repo in repositories.values():
                repo._close()
            repositories.clear()
            if tx.token is not None:
                try:
                    _current.reset(tx.token)
                except ValueError:  # exited in another context than entered; leave it
                    log.warning("uow: %r was exited in another context than it was entered in", self)
        elif kind is SAVEPOINT:
            scope.health.spare = None
        if not scopes:
            self._owner = None
            self._claim.release()

    def _exiting(self, frame: FrameType) -> _Scope | None:
        """The scope that ``__exit__`` called from *frame* leaves; None if an outer block closed it already.

        A ``with`` statement enters and leaves in the same frame, so the
        scope is the innermost one entered from *frame*, open or closed early,
        by the order they were entered in. A block entered and left by hand,
        from different frames, leaves the innermost scope that the running
        code acts in.
        """
        found = next((scope for scope in reversed(self._scopes) if scope.frame is frame), None)
        closed = next((scope for scope in reversed(self._closed_early) if scope.frame is frame), None)
        if found is None and closed is None and self._closed_early:
            # Left from another frame than it was entered in (an ExitStack): the generator that holds it runs.
            holders = [scope.holder for scope in (*self._scopes, *self._closed_early) if scope.holder is not None]
            running = on_this_stack(holders)
            if running is not None:
                found = next((scope for scope in reversed(self._scopes) if scope.holder is running), None)
                closed = next((scope for scope in reversed(self._closed_early) if scope.holder is running), None)
        if closed is not None and (found is None or closed.serial > found.serial):
            self._forget(closed)
            return None
        if found is not None:
            return found
        if not self._scopes:
            msg = (
                f"{type(self).__name__}.__exit__() was called, but no block of it is open: call __enter__() "
                "first, or use `with uow:`"
            )
            raise InactiveUnitOfWorkError(msg)
        return self._acting(strict=False)

    def _forget(self, scope: _Scope) -> None:
        """The exit of *scope*, closed early, has come: it holds nothing any more."""
        closed = self._closed_early
        if scope in closed:
            closed.remove(scope)  # type: ignore[union-attr]  # a list once it holds anything
        scope.frame = scope.holder = None

    def _misnesting(self, scope: _Scope) -> tuple[list[_Scope], bool]:
        """The scopes still open above *scope*, innermost first, and whether any of them is running.

        They can only be scopes that a generator suspended inside its block
        holds open, or blocks that overlap *scope* (entered after it and not
        left yet, while code inside them leaves *scope*).
        """
        scopes = self._scopes
        above = scopes[scopes.index(scope) + 1 :]
        above.reverse()
        return above, any(not held.suspended for held in above)

    def _leave_overlapped(self, scope: _Scope, exc: BaseException | None) -> None:
        """Leave joined *scope* from under the blocks entered after it: it has nothing of its own to end."""
        self._scopes.remove(scope)
        scope.state = CLOSED
        scope.frame = scope.holder = None
        if scope.narrows:
            self._read_only_scope(scope.tx.session, starts=False)
        if exc is not None and not isinstance(exc, GeneratorExit):
            self._poison(scope, exc)

    def _overlap_error(self, scope: _Scope, above: list[_Scope]) -> OwnershipError:
        running = [held for held in above if not held.suspended]
        shown = ", ".join(
            f"a {held.kind.value} scope entered by {where(held.holder or held.frame)}" for held in running
        )
        msg = (
            f"a {scope.kind.value} scope of {type(self).__name__} was left while blocks entered after it were "
            f"still running ({shown}): blocks must nest. They were closed, and the transaction they ran in was "
            "rolled back. Leave a block before leaving the block it was entered in, for example by exhausting a "
            "generator before the block that started it ends"
        )
        return self._violated(OwnershipError(msg))

    def _closing_early(self, held: _Scope) -> None:
        log.warning(
            "uow: a block of %s ended while a %s scope entered inside it by %s was still open; uow closed that "
            "scope first, as if its generator had been closed",
            type(self).__name__,
            held.kind.value,
            where(held.holder or held.frame),
        )

    def _poison_acting(self, error: BaseException) -> None:
        """Make the transaction the running code acts in rollback-only, with *error* as the cause."""
        if self._scopes:
            self._poison(self._acting(strict=False), error)

    # -- which scope the running code acts in ----------------------------------

    def _acting(self, *, strict: bool) -> _Scope:
        """The innermost scope that is not held by a paused generator: the running code is in that one.

        A generator that entered a block and yielded leaves its scope open
        while the code around it goes on. That code acts in the scope below:
        its ``commit()`` is the owner's real one. With *strict*, a use that
        cannot act safely raises OwnershipError: a paused generator holds a
        savepoint or a transaction above the scope (the session's state is
        the generator's now), or every open scope is a paused generator's (the
        running code is outside all of them), or the code runs in a task that
        ``asyncio.wait_for()`` started, which cannot tell where it stands.
        """
        scopes = self._scopes
        top = scopes[-1]
        if top.holder is None:
            return top
        if self._owner != self._here():  # a task working for the owner: see waits_for()
            if strict:
                raise self._delegate_error()
            return top
        index = len(scopes) - 1
        while index >= 0 and scopes[index].suspended:
            index -= 1
        if index < 0:
            if strict:
                raise self._held_error(scopes[0])
            return scopes[0]
        if strict:
            for held in scopes[index + 1 :]:
                if held.kind is not JOINED:
                    raise self._held_error(held)
        return scopes[index]

    def _held_error(self, held: _Scope) -> OwnershipError:
        what = {
            SAVEPOINT: "holds a savepoint",
            JOINED: "joined",
            OWNER: "owns a transaction",
        }[held.kind]
        msg = (
            f"{where(held.holder)} is a generator paused inside a block of {type(self).__name__} that {what}, "
            "and the code around it is outside that block: it cannot use the unit of work until the generator "
            "finishes or is closed, as its work would land in the generator's block. Exhaust the generator, or "
            "close() it, first; or give it a unit of work of its own"
        )
        return self._violated(OwnershipError(msg))

    def _delegate_error(self) -> OwnershipError:
        msg = (
            f"{type(self).__name__} was used from a task that asyncio.wait_for() started for the task that owns "
            "it (Python 3.11 and older run the awaited code in a new task), while a paused generator holds one "
            "of its blocks: uow cannot tell which block that code belongs to. Use `async with asyncio.timeout(...)`"
            " around the call instead of asyncio.wait_for()"
        )
        return self._violated(OwnershipError(msg))

    def _resumed_error(self, holder: FrameType) -> OwnershipError:
        msg = (
            f"{where(holder)} is a generator that was paused inside a block of {type(self).__name__} when an "
            "outer block ended and closed it; resumed now, it may not use the unit of work, as its block is "
            "gone. Exhaust or close the generator before the block that started it ends"
        )
        return self._violated(OwnershipError(msg))

    def _check_owner(self) -> None:
        here = self._here()
        owner = self._owner
        if owner != here and not waits_for(owner, here):
            shown = describe(owner) if owner is not None else "another thread or task, which has left it since"
            msg = (
                f"{type(self).__name__} was entered by {shown} and used from {describe(here)}: sessions are not "
                "thread- or task-safe. Give each thread and task its own unit of work"
            )
            raise self._violated(OwnershipError(msg))

    def _violated(self, error: OwnershipError) -> OwnershipError:
        """*error* is about to be raised: an event on the span of the transaction it concerns, if one is traced."""
        if _observe.telemetry is not None:
            scopes = self._scopes
            watch = scopes[-1].tx.watch if scopes else None  # the innermost transaction: requires_new's own
            _observe.event(
                watch, "uow.ownership_violation", **{"error.type": "OwnershipError", "uow.message": str(error)}
            )
        return error

    def _check_use(self, what: str) -> _Scope:
        """The scope the running code acts in, after checking that *what* may use it now."""
        if not self._scopes:
            raise _inactive(what)
        self._check_owner()
        self._check_not_resumed()
        scope = self._acting(strict=True)
        poison = scope.health.poison
        if poison is not None:
            msg = (
                f"the transaction is rollback-only: a joined scope raised {type(poison).__name__}: {poison}. "
                "Let the exception reach the owner of the transaction, or run the inner code in "
                "`uow.savepoint()` to recover from it"
            )
            raise RollbackOnlyError(msg) from poison
        return scope

    def _check_not_resumed(self) -> None:
        """Refuse a use from a generator whose block an outer block closed early."""
        holders = [scope.holder for scope in self._closed_early if scope.holder is not None]
        if holders:
            resumed = on_this_stack(holders)
            if resumed is not None:
                raise self._resumed_error(resumed)

    def _scope_for(self, what: str) -> _Scope:
        """The scope the running code acts in, for *what*; the common case takes a few attribute reads."""
        scopes = self._scopes
        if scopes:
            top = scopes[-1]
            # A sealed scope (its hooks run) may be used: only a generator's scope, a failed transaction,
            # a generator resumed after its block closed, or another thread or task need the full check.
            if (
                top.holder is None
                and top.health.poison is None
                and not self._closed_early
                and self._owner == self._here_fast()
            ):
                return top
        return self._check_use(what)

    def _touch(self) -> None:
        """Called on every use of a repository or the session; the common case is :meth:`_scope_for`'s, inlined."""
        scopes = self._scopes
        if scopes:
            top = scopes[-1]
            if (
                top.holder is None
                and top.health.poison is None
                and not self._closed_early
                and self._owner == self._here_fast()
            ):
                top.tx.used = True
                return
        self._check_use("the unit of work").tx.used = True

    def _owner_acts(self, session: object) -> bool:
        """Whether the running code acts in the owner's scope of the transaction holding *session*, or none is open."""
        if not self._scopes:
            return True
        top = self._scopes[-1]
        if top.kind is OWNER and top.tx.session is session:
            return True  # the innermost scope is the owner's: uow's own exit, or the owner's code
        scope = self._acting(strict=False)
        return scope.kind is OWNER and scope.tx.session is session

    def _owner_scope(self, what: str) -> _Scope:
        """The owner's scope, for *what*, which only the owner may do; allowed in a rollback-only transaction."""
        if not self._scopes:
            raise _inactive(what)
        self._check_owner()
        scope = self._acting(strict=True)
        if scope.kind is not OWNER:
            raise _joined_error(what)
        if scope.tx.committing:
            raise _committing_error(what)
        return scope

    def _repository(self, name: str) -> Any:
        """The repository *name* of the innermost transaction; each of its methods checks the use itself."""
        try:
            tx = self._scopes[-1].tx
        except IndexError:
            tx = self._check_use(f"{type(self).__name__}.{name}").tx  # raises: no block is open
        repo = tx.repositories.get(name)
        if repo is None:
            slot = self._slots[name]
            repo = self._implementations[name](tx.session, slot.model)
            repo._unit = self
            tx.repositories[name] = repo
        return repo

    # -- the transaction -------------------------------------------------------

    def _poison(self, scope: _Scope, error: BaseException) -> None:
        """A joined scope raised: the transaction (or savepoint) it ran in can only roll back now."""
        health = scope.health
        if health.poison is None:
            health.poison = error

    def _check_may_commit(self, scope: _Scope) -> None:
        # Rollback-only anywhere from the transaction's owner in to this scope refuses the commit:
        # a savepoint's work cannot be kept by a transaction that will roll back.
        for outer in self._scopes:
            if outer.tx is scope.tx and outer.health.rollback_only:
                msg = "commit() after set_rollback_only(): this transaction can only be rolled back"
                raise RollbackOnlyError(msg)
            if outer is scope:
                break
        if scope.kind is OWNER and scope.tx.read_only:
            msg = "commit() in a read-only unit of work: it never commits; leave the block to end it"
            raise ReadOnlyError(msg)

    def _check_write(self, pending: str) -> None:
        """Called before a flush that writes *pending*: raise ReadOnlyError if the acting scope is read-only.

        Inside a read-write transaction the refused objects stay pending, so
        the transaction becomes rollback-only: the owner must not commit them.
        """
        if not self._scopes:
            return
        scope = self._acting(strict=False)
        if not scope.read_only:
            return
        msg = (
            f"a read-only unit of work was asked to write: {pending} pending. "
            "Drop read_only=True, or do not change objects in this scope"
        )
        error = ReadOnlyError(msg)
        tx = scope.tx
        tx.refused = True
        if not tx.read_only:
            self._poison(scope, error)
        raise error

    def _writes_forbidden(self) -> bool:
        """Whether the scope the running code acts in is read-only."""
        return bool(self._scopes) and self._acting(strict=False).read_only

    def _owner_exit_plan(self, scope: _Scope, exc: BaseException | None) -> Plan:
        """What a leaving owner does."""
        tx = scope.tx
        if exc is None and scope.health.poison is not None:
            return POISONED
        wants_commit = (tx.commit_on_exit or self.autocommit) and not scope.health.rollback_only and not tx.read_only
        if exc is None and wants_commit and (tx.used or self._has_changes(tx.session)):
            return COMMIT
        return ROLLBACK if tx.used else NOTHING

    def _committed(self, scope: _Scope) -> None:
        tx = scope.tx
        tx.used = False
        if tx.outbox:
            tx.outbox.clear()  # written in the commit
        if tx.hooks:
            _hooks.committed(tx.hooks)
        if tx.watch is not None:
            _observe.ended(tx.watch, _observe.COMMITTED, None)
        tx.commits += 1
        self.commits += 1
        parent = tx.parent
        while parent is not None:  # durable work that the retries of the transactions around must not repeat
            parent.nested_commits += 1
            parent = parent.parent
        if self._scopes[0].tx is tx:  # not a requires_new transaction inside the block
            self.committed = True
        for repo in tx.repositories.values():  # _hooks.collect_events(), written out: every commit runs it
            for obj in repo._seen.values():
                events = getattr(obj, "events", None)
                if events:
                    self._events.extend(events)
                    events.clear()

    def _rolled_back(
        self, tx: _Transaction, cause: BaseException | None = None, outcome: str = _observe.ROLLED_BACK
    ) -> None:
        """After a real rollback, which *cause* brought about, if anything did.

        The ``on_rollback`` and ``after_completion`` hooks stay, for the twin to run.
        """
        if tx.watch is not None:
            _observe.ended(tx.watch, outcome, cause)
        tx.used = False
        if tx.hooks:
            _hooks.rolled_back(tx.hooks)
        tx.outbox.clear()
        self.rollbacks += 1
        if self._scopes[0].tx is tx:
            self.rolled_back = True
        _hooks.clear_events(tx)

    def _rolled_back_by_owner(self, scope: _Scope) -> None:
        """After the owner's explicit rollback: the transaction is healthy again."""
        scope.health.poison = None
        scope.health.rollback_only = False
        self._rolled_back(scope.tx)

    def _savepoint_ended(
        self,
        scope: _Scope,
        exc: BaseException | None,
        release: bool,
        error: BaseException | None,
        state: State = CLOSED,
    ) -> BaseException | None:
        """Book-keeping once a savepoint was released or rolled back; returns what to raise, if anything.

        *error* is what ending the savepoint raised. A failed release has
        rolled back to the savepoint, so the transaction is healthy; a failed
        rollback leaves it unusable, and only the owner can end it.
        """
        tx = scope.tx
        if tx.watch is not None:
            _observe.savepoint(tx.watch, release and error is None)
        if error is not None or not release:
            del tx.hooks[scope.hook_mark :]
            del tx.outbox[scope.outbox_mark :]
            _hooks.drop_events_since(tx, scope.event_marks)
        self._pop(scope, state)
        if error is not None:
            if not release and not _is_cancellation(error):
                tx.broken = True
                self._poison_acting(error)
                if exc is not None:
                    return None
            return error
        if exc is None and scope.health.poison is not None:
            failure = self._rollback_only_error(scope)
            failure.__cause__ = scope.health.poison
            return failure
        return None

    def _rollback_only_error(self, scope: _Scope) -> RollbackOnlyError:
        poison = scope.health.poison
        assert poison is not None
        msg = (
            f"the transaction was rolled back, not committed: a joined scope raised {type(poison).__name__}: "
            f"{poison}, and the exception was caught before it reached the owner. Let it propagate, or run "
            "the inner code in `uow.savepoint()`"
        )
        return RollbackOnlyError(msg)

    def set_rollback_only(self) -> None:
        """Make the transaction (or the innermost savepoint) roll back when it ends.

        The owner then rolls back on a clean exit without raising, and a
        ``commit()`` afterwards raises :class:`~uow.errors.RollbackOnlyError`.
        """
        self._check_use("set_rollback_only()").health.rollback_only = True

    # -- hooks and events ------------------------------------------------------

    def _start_hooks(self, scope: _Scope, status: str) -> _Started:
        """Hooks run after the transaction, not in it: nothing joins the scope whose transaction ended."""
        state, scope.state = scope.state, SEALED
        scope.tx.ending = status
        return _current.set(None), scope, state

    def _end_hooks(self, started: _Started) -> None:
        token, scope, state = started
        _current.reset(token)
        scope.tx.ending = None
        if scope.state is SEALED:
            scope.state = state

    def _seal(self) -> None:
        """Let nothing join the current transaction any more: entering this unit of work starts a new one.

        For an integration whose request has answered while its unit of work
        is still open (a response sent by another task): a background task
        then gets a transaction of its own, as it would after the block ended.
        """
        if self._scopes:
            scope = self._acting(strict=False)
            if scope.state is OPEN:
                scope.state = SEALED

    def _add_hook(self, kind: str, callback: Callable[..., object], robust: bool = False) -> None:
        _hooks.check_hook(callback, kind, sync=bool(self._sync))
        scope = self._scope_for(f"{kind}()")
        tx = scope.tx
        if tx.ending is not None:  # a hook of the transaction that just ended registers one
            _hooks.check_late(kind, tx.ending)
        else:
            tx.used = True
        tx.hooks.append((kind, callback, robust))

    def _before_commit_ran(self, scope: _Scope) -> None:
        """The ``before_commit`` hooks ran: one of them may have made the transaction rollback-only."""
        health = scope.health
        if health.poison is not None:
            raise self._rollback_only_error(scope) from health.poison
        if health.rollback_only:
            self._check_may_commit(scope)

    def publish(
        self, topic: str, payload: Any, *, key: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Message:
        """Publish a message through the outbox: written in the owner's real commit, sent after it by a relay.

        Messages of one *key* are sent in the order they were committed.
        The payload is serialized now, so that one the outbox cannot write
        raises :class:`~uow.errors.OutboxError` here. A rollback drops the
        message, and so does a savepoint that rolls back around it. Needs an
        :class:`~uow.Outbox` declared on the unit of work's class.
        """
        outbox = self.outbox
        if outbox is None:
            msg = (
                f"publish() needs an outbox: declare `outbox = uow.Outbox(metadata)` on {type(self).__name__} "
                "or the unit of work class it derives from"
            )
            raise OutboxError(msg)
        if _observe.telemetry is not None and (headers is None or isinstance(headers, Mapping)):
            headers = _observe.inject(headers or {})  # the trace goes on where the relay sends it
        staged = outbox.message(topic, payload, key, headers)
        scope = self._scope_for("publish()")
        if scope.read_only:
            self._check_write(f"a message to {topic!r}")
        tx = scope.tx
        tx.outbox.append(staged)
        tx.used = True
        return staged[0]

    def _inbox_for(self, message_id: str, consumer: str) -> tuple[Inbox, _Scope]:
        """The inbox and the acting scope for ``receive()``, after checking them; the transaction counts as used."""
        inbox = self.inbox
        if inbox is None:
            msg = (
                f"receive() needs an inbox: declare `inbox = uow.Inbox(metadata)` on {type(self).__name__} "
                "or the unit of work class it derives from"
            )
            raise OutboxError(msg)
        inbox.check(message_id, consumer)
        scope = self._scope_for("receive()")
        if scope.read_only:
            self._check_write(f"the receipt of message {message_id!r}")
        scope.tx.used = True
        return inbox, scope

    def _outgoing(self, tx: _Transaction, outbox: Outbox) -> list[tuple[Message, bytes]]:
        """What the commit of *tx* writes to the outbox: the messages published, then those of its domain events."""
        outgoing = tx.outbox
        if outbox.events is not None:
            outgoing = list(outgoing)
            for repo in tx.repositories.values():
                for obj in repo._seen.values():
                    for event in getattr(obj, "events", None) or ():
                        message = outbox.routed(event)
                        if message is not None:
                            if _observe.telemetry is not None:
                                message = attrs.evolve(message, headers=_observe.inject(message.headers))
                            outgoing.append((message, outbox.body(message)))
        return outgoing

    def collect_new_events(self) -> Iterator[object]:
        """Yield the domain events of committed work, each once, oldest first.

        After every successful commit, the ``events`` lists of the aggregates
        that any repository returned or was given are moved into a queue that
        this generator drains. Events raised by work that was rolled back are
        dropped. It does not need an active block.
        """
        events = self._events
        while events:
            yield events.popleft()

    def __repr__(self) -> str:
        state = "active" if self._scopes else "idle"
        return f"<{type(self).__name__} {state}, commits={self.commits}, rollbacks={self.rollbacks}>"


def _inactive(what: str) -> InactiveUnitOfWorkError:
    msg = (
        f"{what} was used outside a block: call it inside `with uow:` "
        "(or `async with uow:`), where the unit of work has a session"
    )
    return InactiveUnitOfWorkError(msg)


def _joined_error(what: str) -> JoinedScopeError:
    msg = (
        f"{what} in a joined scope: only the owner of the transaction may do that. Raise an exception "
        "to roll the whole transaction back, or use `uow.savepoint()` to undo only this part"
    )
    return JoinedScopeError(msg)


def _committing_error(what: str) -> ConfigurationError:
    msg = (
        f"{what} inside a before_commit hook: the hook runs inside the owner's commit, which goes on when it "
        "returns. Raise an exception in the hook to veto the commit; it then rolls back"
    )
    return ConfigurationError(msg)


def _is_cancellation(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError)


def outcome_unknown(error: BaseException) -> bool:
    """Whether a COMMIT that raised *error* may still have been applied by the database.

    Not when the database answered it with a serialization failure or a
    deadlock. Anything else may have come after some of the work committed:
    a lost connection, a timeout, a cancellation, or a constraint checked at
    COMMIT on the second database of a session bound to two, after the first
    one committed.
    """
    return not is_retryable(error)


def wrong_protocol(unit: _UnitOfWorkCore) -> ConfigurationError:
    """The error for ``async with`` on a sync unit of work, or ``with`` on an async one."""
    name = type(unit).__name__
    if unit._sync:
        msg = (
            f"{name} is a sync unit of work: enter it with `with uow:`, not `async with uow:`. For async code, "
            "declare the unit of work on uow.AsyncUnitOfWork and use AsyncSqlAlchemyUnitOfWork or AsyncFakeUnitOfWork"
        )
    else:
        msg = (
            f"{name} is an async unit of work: enter it with `async with uow:`, not `with uow:`, and await its "
            "commit() and repositories"
        )
    return ConfigurationError(msg)


class _BlockOptions:
    """The options of a block, and the step before entering it that does no I/O; the twins' blocks add the rest."""

    __slots__ = (
        "_attempt",
        "_commit_on_exit",
        "_function",
        "_isolation_level",
        "_propagation",
        "_read_only",
        "_savepoint",
        "_scope",
        "_unit",
        "owner",
    )

    def __init__(
        self,
        unit: Any,
        propagation: str,
        read_only: bool | None,
        isolation_level: str | None,
        *,
        commit_on_exit: bool = False,
        savepoint: bool = False,
        function: str | None = None,
        attempt: int = 1,
    ) -> None:
        self._unit = unit
        self._propagation = propagation
        #: The service function of a @transactional call, and which attempt this is: for logs and traces.
        self._function = function
        self._attempt = attempt
        self._read_only = read_only
        self._isolation_level = isolation_level
        self._commit_on_exit = commit_on_exit
        self._savepoint = savepoint
        #: The scope this block entered: its exit leaves that one.
        self._scope: _Scope | None = None
        #: Whether entering started a transaction of its own.
        self.owner = False

    def _plan(self, unit: _UnitOfWorkCore, frame: FrameType) -> _Scope:
        entered = self._scope
        if entered is not None and entered.state in (OPEN, SEALED):
            msg = "this block is entered already: call uow.transaction() or uow.savepoint() again for another block"
            raise ConfigurationError(msg)
        scope = unit._plan(
            self._propagation,
            self._read_only,
            self._isolation_level,
            commit_on_exit=self._commit_on_exit,
            savepoint=self._savepoint,
            frame=frame,
            bare=False,  # the block holds its scope: its exit needs no frame to find it
        )
        self.owner = scope.kind is OWNER
        if self.owner:
            tx = scope.tx
            tx.propagation = self._propagation
            if self._function is not None:
                tx.function = self._function
                tx.attempt = self._attempt
        return scope

    @property
    def _durable(self) -> bool:
        """Whether the transaction this block owned committed work, itself or through one started inside it."""
        scope = self._scope
        return scope is not None and scope.tx.durable

    @property
    def _outcome_unknown(self) -> bool:
        """Whether the last commit of this block's transaction failed in a way that may have reached the database."""
        scope = self._scope
        return scope is not None and scope.tx.outcome_unknown
