"""The abstract units of work, sync and async, and how repositories are declared.

``_UnitOfWorkCore`` holds the state machine of scopes and does no I/O. The
sync and the async twin each add only what awaits: entering and leaving
scopes, ``commit()``, ``rollback()`` and running hooks, which call the
protected hooks that an implementation fills (``_open``, ``_flush``,
``_commit``, ``_rollback``, ``_close``, the savepoint hooks).
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import threading
import types
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args, overload

from ._repository import AsyncRepository, Repository, _RepositoryBase
from .errors import (
    ActiveUnitOfWorkError,
    ConfigurationError,
    InactiveUnitOfWorkError,
    JoinedScopeError,
    OwnershipError,
    ReadOnlyError,
    RollbackOnlyError,
    _shown,
    is_retryable,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncBlock", "AsyncUnitOfWork", "Block", "UnitOfWork", "current", "repository"]

log = logging.getLogger("uow")

T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)


class _Slot:
    """A repository declared on a unit of work class; see :func:`repository`."""

    __slots__ = ("model", "name", "repository_class")

    def __init__(self, model: type[Any], repository_class: type[Any] | None) -> None:
        self.model = model
        self.repository_class = repository_class
        self.name = "<unnamed>"

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    if not TYPE_CHECKING:  # the subclasses declare the precise types

        def __get__(self, instance, owner):
            if instance is None:
                return self
            return instance._repository(self.name)

    def __repr__(self) -> str:
        shown = self.repository_class.__name__ if self.repository_class else "generic"
        return f"repository({self.model.__name__}, {shown})"


class ModelRepository(_Slot, Generic[T]):
    """A generic repository slot: ``Repository[T]`` on a sync, ``AsyncRepository[T]`` on an async unit of work."""

    __slots__ = ()

    if TYPE_CHECKING:

        @overload
        def __get__(self, instance: None, owner: type[Any]) -> Self: ...

        @overload
        def __get__(self, instance: AsyncUnitOfWork, owner: type[Any]) -> AsyncRepository[T]: ...

        @overload
        def __get__(self, instance: UnitOfWork, owner: type[Any]) -> Repository[T]: ...

        def __get__(self, instance: Any, owner: type[Any]) -> Any: ...


class CustomRepository(_Slot, Generic[R_co]):
    """A repository slot of a given repository class."""

    __slots__ = ()

    if TYPE_CHECKING:

        @overload
        def __get__(self, instance: None, owner: type[Any]) -> Self: ...

        @overload
        def __get__(self, instance: _UnitOfWorkCore, owner: type[Any]) -> R_co: ...

        def __get__(self, instance: Any, owner: type[Any]) -> Any: ...


@overload
def repository(model: type[T]) -> ModelRepository[T]: ...


@overload
def repository(model: type[T], repository_class: Callable[..., R_co]) -> CustomRepository[R_co]: ...


def repository(model: type[Any], repository_class: Callable[..., Any] | None = None) -> _Slot:
    """Declare a repository on a unit of work class.

    ``batches = repository(Batch)`` declares a generic repository: a
    :class:`~uow.Repository` on a sync and an :class:`~uow.AsyncRepository`
    on an async unit of work. Each implementation of the unit of work
    provides it without further code.

    ``products = repository(Product, ProductRepository)`` declares one of a
    custom repository class. On the abstract unit of work that class is
    usually an interface (a subclass of ``Repository[Product]`` with extra
    abstract query methods); each implementation names its own subclass
    with the same line, for example
    ``products = repository(Product, SqlAlchemyProductRepository)``.
    """
    if not isinstance(model, type):
        msg = f"repository() takes a mapped class as its first argument, not {_shown(model)}"
        raise ConfigurationError(msg)
    if repository_class is None:
        return ModelRepository(model, None)
    if not (isinstance(repository_class, type) and issubclass(repository_class, _RepositoryBase)):
        msg = (
            f"repository({model.__name__}, {_shown(repository_class)}): the second argument must be "
            "a subclass of uow.Repository or uow.AsyncRepository"
        )
        raise ConfigurationError(msg)
    return CustomRepository(model, repository_class)


class _UnitOfWorkCore:
    """State shared by the sync and async units of work; does no I/O."""

    #: Declared repositories by attribute name, gathered from the whole MRO.
    _slots: ClassVar[dict[str, _Slot]] = {}
    #: The class that implements each declared repository, on concrete classes.
    _implementations: ClassVar[dict[str, type[Any]]] = {}
    #: True on sync, False on async units of work.
    _sync: ClassVar[bool | None] = None
    #: Set by an implementation: repository classes it can build, and its generic one.
    _repository_base: ClassVar[type[Any] | None] = None
    _generic_repository: ClassVar[type[Any] | None] = None
    #: The interface every declared repository must implement.
    _interface: ClassVar[type[Any]] = _RepositoryBase

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        slots: dict[str, _Slot] = {}
        for klass in reversed(cls.__mro__):
            slots.update((name, value) for name, value in vars(klass).items() if isinstance(value, _Slot))
        cls._slots = slots
        for slot in slots.values():
            if slot.repository_class is not None and not issubclass(slot.repository_class, cls._interface):
                msg = (
                    f"{cls.__qualname__}.{slot.name} is a {slot.repository_class.__name__}, which is not "
                    f"a {cls._interface.__name__}: a sync unit of work takes uow.Repository "
                    "subclasses, an async one uow.AsyncRepository subclasses"
                )
                raise ConfigurationError(msg)
        if cls._repository_base is not None:
            cls._implementations = {name: cls._implementation(slot) for name, slot in slots.items()}

    @classmethod
    def _implementation(cls, slot: _Slot) -> type[Any]:
        assert cls._repository_base is not None
        assert cls._generic_repository is not None
        declared = slot.repository_class
        if declared is None or declared is cls._interface:
            return cls._generic_repository
        if issubclass(declared, cls._repository_base):
            return declared
        msg = (
            f"{cls.__qualname__}.{slot.name} is declared as {declared.__name__}, which "
            f"{cls.__qualname__} cannot build: it is not a {cls._repository_base.__name__}. "
            f"Declare the implementation on {cls.__qualname__}: "
            f"{slot.name} = repository({slot.model.__name__}, <a subclass of "
            f"{cls._repository_base.__name__} and {declared.__name__}>)"
        )
        raise ConfigurationError(msg)

    def __init__(self, *, autocommit: bool = False) -> None:
        #: Commit on a clean exit from the owner's block instead of rolling back.
        self.autocommit = autocommit
        #: Whether the current or latest block committed.
        self.committed = False
        #: Whether the latest block ended by rolling back uncommitted work.
        self.rolled_back = False
        #: Real commits over the life of this object.
        self.commits = 0
        #: Rollbacks of uncommitted work over the life of this object.
        self.rollbacks = 0
        # The open scopes, outermost first, and the transaction of the innermost.
        self._scopes: list[_Scope] = []
        self._tx: _Transaction | None = None
        # Where the outermost scope was entered: thread and task (sync) or task (async), and the thread.
        self._owner: object = None
        self._owner_thread = 0
        # Commits of units of work nested in this one's transactions (requires_new through a factory).
        self._nested_commits = 0
        # True when a use must take the slow path: inactive, or rollback-only.
        self._alarm = True
        # Whether the latest failed real commit may have reached the database.
        self._commit_outcome_unknown = False
        self._events: deque[object] = deque()

    # -- protected hooks for implementations ---------------------------------

    @abc.abstractmethod
    def _adopt(self, session: Any, outer: _UnitOfWorkCore | None) -> None:
        """Take charge of a new *session*; raise ConfigurationError if it would share work with *outer*.

        *outer* is the unit of work active in this context, if any: in this thread or task, or in the
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

    @staticmethod
    def _here() -> object:
        """Where the code runs: a thread id on a sync, a task on an async unit of work."""
        raise NotImplementedError  # pragma: no cover - each twin sets its own

    # -- the state machine ---------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a block of this unit of work is running."""
        return bool(self._scopes)

    def _plan(
        self, propagation: str, read_only: bool | None, isolation_level: str | None, *, commit_on_exit: bool
    ) -> _Scope:
        """Decide what entering a scope means now; does no I/O and changes nothing."""
        if propagation not in _PROPAGATIONS or (
            isolation_level is not None and isolation_level not in ISOLATION_LEVELS
        ):
            _check_options(propagation, isolation_level)
        if not self._scopes:
            if propagation == "mandatory":
                msg = (
                    f"propagation='mandatory' needs an active {type(self).__name__} to join, and none is "
                    "active: call this code inside `with uow:`"
                )
                raise InactiveUnitOfWorkError(msg)
            return _Scope(OWNER, _Transaction(bool(read_only), isolation_level), bool(read_only), commit_on_exit)
        self._check_use("entering a scope")
        if propagation == "never":
            msg = f"propagation='never' found {type(self).__name__} active: call this code outside any block"
            raise ActiveUnitOfWorkError(msg)
        if propagation == "requires_new":
            return _Scope(OWNER, _Transaction(bool(read_only), isolation_level), bool(read_only), commit_on_exit)
        top = self._scopes[-1]
        if top.sealed:  # an on_commit hook, or a sealed request: its transaction has ended, so start one
            return _Scope(OWNER, _Transaction(bool(read_only), isolation_level), bool(read_only), commit_on_exit)
        tx = top.tx
        if isolation_level is not None and isolation_level != tx.isolation_level:
            shown = tx.isolation_level or "the default level"
            msg = (
                f"a joined scope asked for isolation_level={isolation_level!r}, but the transaction it joins "
                f"runs at {shown}: only the owner sets the isolation level. Set it where the transaction "
                "starts, or use propagation='requires_new'"
            )
            raise JoinedScopeError(msg)
        if read_only is False and top.read_only:
            msg = (
                "a read-write scope cannot join a read-only transaction: make the outer scope read-write, "
                "or use propagation='requires_new'"
            )
            raise JoinedScopeError(msg)
        scope_read_only = top.read_only if read_only is None else read_only
        kind = SAVEPOINT if propagation == "nested" else JOINED
        return _Scope(kind, tx, scope_read_only, commit_on_exit=False)

    def _guard_session(self, tx: _Transaction) -> None:
        """Make *tx*'s session refuse ``commit()``, ``rollback()`` and ``close()`` from scopes above its owner.

        Called once per transaction, when the first scope is entered on top
        of its owner's: until then only the owner can reach the session.
        """

    def _nest(self, tx: _Transaction) -> None:
        """A scope is entered on top of *tx*'s innermost one."""
        tx.session_guarded = True
        self._guard_session(tx)

    def _push(self, scope: _Scope) -> None:
        """Make *scope* the innermost; for an owner, after its session is open."""
        if self._scopes and not self._scopes[-1].tx.session_guarded:
            self._nest(self._scopes[-1].tx)
        if scope.kind == OWNER:
            if not self._scopes:
                self._owner = self._here()
                self._owner_thread = threading.get_ident()
                self.committed = False
                self.rolled_back = False
            outer = _active_here()
            scope.tx.outer_unit = outer if outer is not self else None
            self._commit_outcome_unknown = False
            self._tx = scope.tx
            scope.token = _current.set(self)
        elif scope.kind == SAVEPOINT:
            scope.hook_mark = len(scope.tx.hooks)
            scope.event_marks = _event_marks(scope.tx)
        if scope.read_only and not scope.tx.guarded:
            scope.tx.guarded = True
            self._guard_writes(scope.tx)
        self._scopes.append(scope)
        self._alarm = False

    def _pop(self) -> _Scope:
        scope = self._scopes.pop()
        if scope.kind == OWNER:
            for repo in scope.tx.repositories.values():
                repo._close()
            scope.tx.repositories.clear()
            self._tx = self._scopes[-1].tx if self._scopes else None
            if scope.token is not None:
                try:
                    _current.reset(scope.token)
                except ValueError:  # exited in another context than entered; leave it
                    log.warning("uow: %r was exited in another context than it was entered in", self)
        if self._scopes:
            self._refresh_alarm()
        else:
            self._owner = None
            self._alarm = True
        return scope

    def _refresh_alarm(self) -> None:
        scopes = self._scopes
        self._alarm = not scopes or self._boundary().poison is not None or scopes[-1].sealed

    def _boundary(self) -> _Scope:
        """The innermost scope that can roll back on its own: the owner or a savepoint."""
        for scope in reversed(self._scopes):
            if scope.kind != JOINED:
                return scope
        raise AssertionError("an owner scope is always at the bottom")  # pragma: no cover

    def _poison(self, error: BaseException) -> None:
        """A joined scope raised: its transaction (or savepoint) can only roll back now."""
        boundary = self._boundary()
        if boundary.poison is None:
            boundary.poison = error
        self._alarm = True

    def _leave_joined(self, error: BaseException | None) -> None:
        """Leave a plain joined scope that the decorator entered; an error makes the transaction rollback-only."""
        self._scopes.pop()
        if error is not None:
            self._poison(error)

    def _touch(self) -> None:
        """Called on every use of a repository or the session."""
        if self._alarm or self._owner != self._here():
            self._check_use("the unit of work")
        assert self._tx is not None
        self._tx.used = True

    def _check_use(self, what: str) -> None:
        if not self._scopes:
            msg = (
                f"{what} was used outside a block: call it inside `with uow:` "
                "(or `async with uow:`), where the unit of work has a session"
            )
            raise InactiveUnitOfWorkError(msg)
        here = self._here()
        if self._owner != here:
            msg = (
                f"{type(self).__name__} was entered by {_describe(self._owner)} and used from "
                f"{_describe(here)}: sessions are not thread- or task-safe. Give each thread and task its "
                "own unit of work"
            )
            raise OwnershipError(msg)
        poison = self._boundary().poison
        if poison is not None:
            msg = (
                f"the transaction is rollback-only: a joined scope raised {type(poison).__name__}: {poison}. "
                "Let the exception reach the owner of the transaction, or run the inner code in "
                "`uow.savepoint()` to recover from it"
            )
            raise RollbackOnlyError(msg) from poison

    def _scope_for(self, what: str) -> _Scope:
        """The innermost scope, after checking that *what* may use it."""
        if self._alarm or self._owner != self._here():
            self._check_use(what)
        return self._scopes[-1]

    def _owner_scope(self, what: str) -> _Scope:
        """The owner's scope, for *what*, which only the owner may do; allowed in a rollback-only transaction."""
        if not self._scopes or self._owner != self._here():
            self._check_use(what)
        scope = self._scopes[-1]
        if scope.kind != OWNER:
            raise _joined_error(what)
        return scope

    def _rolled_back_by_owner(self, scope: _Scope) -> None:
        """After the owner's explicit rollback: the transaction is healthy again."""
        scope.poison = None
        scope.rollback_only = False
        self._refresh_alarm()
        self._rolled_back(scope.tx)

    def _check_may_commit(self, scope: _Scope) -> None:
        # Rollback-only anywhere from this scope out to its transaction's owner refuses the commit:
        # a savepoint's work cannot be kept by a transaction that will roll back.
        for outer in reversed(self._scopes):
            if outer.tx is scope.tx and outer.rollback_only:
                msg = "commit() after set_rollback_only(): this transaction can only be rolled back"
                raise RollbackOnlyError(msg)
        if scope.kind == OWNER and scope.tx.read_only:
            msg = "commit() in a read-only unit of work: it never commits; leave the block to end it"
            raise ReadOnlyError(msg)

    def _check_write(self, pending: str) -> None:
        """Called before a flush that writes *pending*: raise ReadOnlyError if the innermost scope is read-only.

        Inside a read-write transaction the refused objects stay pending, so
        the transaction becomes rollback-only: the owner must not commit them.
        """
        if not self._scopes or not self._scopes[-1].read_only:
            return
        msg = (
            f"a read-only unit of work was asked to write: {pending} pending. "
            "Drop read_only=True, or do not change objects in this scope"
        )
        error = ReadOnlyError(msg)
        tx = self._scopes[-1].tx
        tx.refused = True
        if not tx.read_only:
            self._poison(error)
        raise error

    def _narrows_to_read_only(self, scope: _Scope) -> bool:
        """Whether *scope*, the innermost, is read-only inside a read-write scope."""
        return scope.read_only and len(self._scopes) > 1 and not self._scopes[-2].read_only

    def _writes_forbidden(self) -> bool:
        """Whether the innermost scope is read-only."""
        return bool(self._scopes) and self._scopes[-1].read_only

    def _repository(self, name: str) -> Any:
        # Use from another thread or task is refused when the repository is used.
        if self._alarm:
            self._check_use(f"{type(self).__name__}.{name}")
        tx = self._tx
        assert tx is not None
        repo = tx.repositories.get(name)
        if repo is None:
            slot = self._slots[name]
            repo = self._implementations[name](tx.session, slot.model)
            repo._unit = self
            tx.repositories[name] = repo
        return repo

    def _models(self) -> list[type[Any]]:
        """The mapped classes of the declared repositories."""
        return [slot.model for slot in self._slots.values()]

    def _committed(self, tx: _Transaction) -> None:
        tx.used = False
        self.commits += 1
        outer = tx.outer_unit
        while outer is not None:  # durable work the outer units' retries must not repeat
            outer._nested_commits += 1
            outer = outer._tx.outer_unit if outer._tx is not None else None
        if self._scopes[0].tx is tx:  # not a requires_new transaction inside the block
            self.committed = True
        for repo in tx.repositories.values():
            for obj in repo._seen.values():
                events = getattr(obj, "events", None)
                if events:
                    self._events.extend(events)
                    events.clear()

    def _rolled_back(self, tx: _Transaction) -> None:
        tx.used = False
        tx.hooks.clear()
        self.rollbacks += 1
        if self._scopes[0].tx is tx:
            self.rolled_back = True
        for repo in tx.repositories.values():
            for obj in repo._seen.values():
                events = getattr(obj, "events", None)
                if events:
                    events.clear()

    def _owner_exit_plan(self, scope: _Scope, exc: BaseException | None) -> str:
        """What a leaving owner does: "commit", "rollback", "poisoned" or "nothing"."""
        tx = scope.tx
        if exc is None and scope.poison is not None:
            return "poisoned"
        wants_commit = (scope.commit_on_exit or self.autocommit) and not scope.rollback_only and not tx.read_only
        if exc is None and wants_commit and (tx.used or self._has_changes(tx.session)):
            return "commit"
        return "rollback" if tx.used else "nothing"

    def _savepoint_ended(
        self, scope: _Scope, exc: BaseException | None, release: bool, error: BaseException | None
    ) -> BaseException | None:
        """Book-keeping once a savepoint was released or rolled back; returns what to raise, if anything.

        *error* is what ending the savepoint raised. A failed release has
        rolled back to the savepoint, so the transaction is healthy; a failed
        rollback leaves it unusable, and only the owner can end it.
        """
        if error is not None or not release:
            del scope.tx.hooks[scope.hook_mark :]
            _drop_events_since(scope.tx, scope.event_marks)
        self._pop()
        if error is not None:
            if not release and not isinstance(error, asyncio.CancelledError):
                scope.tx.broken = True
                self._poison(error)
                if exc is not None:
                    return None
            return error
        if exc is None and scope.poison is not None:
            failure = self._rollback_only_error(scope)
            failure.__cause__ = scope.poison
            return failure
        return None

    def _rollback_only_error(self, scope: _Scope) -> RollbackOnlyError:
        poison = scope.poison
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
        self._check_use("set_rollback_only()")
        self._boundary().rollback_only = True

    def _start_hooks(self) -> tuple[Token[_UnitOfWorkCore | None], _Scope, bool]:
        """Hooks run after the transaction, not in it: nothing joins the scope whose transaction committed."""
        scope = self._scopes[-1]
        sealed, scope.sealed = scope.sealed, True
        self._alarm = True
        return _current.set(None), scope, sealed

    def _seal(self) -> None:
        """Let nothing join the current transaction any more: entering this unit of work starts a new one.

        For an integration whose request has answered while its unit of work
        is still open (a response sent by another task): a background task
        then gets a transaction of its own, as it would after the block ended.
        """
        if self._scopes:
            self._scopes[-1].sealed = True
            self._alarm = True

    def _end_hooks(self, started: tuple[Token[_UnitOfWorkCore | None], _Scope, bool]) -> None:
        token, scope, sealed = started
        _current.reset(token)
        scope.sealed = sealed
        self._refresh_alarm()

    def _add_hook(self, callback: Callable[[], object], robust: bool) -> None:
        if not callable(callback):
            msg = f"on_commit() takes a callable with no arguments, not {_shown(callback)}"
            raise ConfigurationError(msg)
        scope = self._scope_for("on_commit()")
        scope.tx.hooks.append((callback, robust))
        scope.tx.used = True

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


def _event_marks(tx: _Transaction) -> dict[int, int]:
    """How many domain events each object seen in *tx* holds now."""
    marks: dict[int, int] = {}
    for repo in tx.repositories.values():
        for key, obj in repo._seen.items():
            events = getattr(obj, "events", None)
            if isinstance(events, list):
                marks[key] = len(events)
    return marks


def _drop_events_since(tx: _Transaction, marks: dict[int, int]) -> None:
    """Drop the events raised since *marks* were taken: their work was rolled back."""
    for repo in tx.repositories.values():
        for key, obj in repo._seen.items():
            events = getattr(obj, "events", None)
            if isinstance(events, list):
                del events[marks.get(key, 0) :]


def _describe(owner: object) -> str:
    if isinstance(owner, tuple):
        return f"{_describe(owner[1])} of thread {owner[0]}"
    if isinstance(owner, int):
        return f"thread {owner}"
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_name()!r}"
    return "code outside any task"


def _current_task() -> object:
    return asyncio.current_task() if asyncio._get_running_loop() is not None else None


def _thread_and_task(
    _loop: Callable[[], object] = asyncio._get_running_loop,
    _thread: Callable[[], int] = threading.get_ident,
    _task: Callable[[], object] = asyncio.current_task,
) -> object:
    """Where sync code runs: its thread, and its asyncio task if it runs in one."""
    if _loop() is None:
        return _thread()
    return (_thread(), _task())


_Hook = tuple[Callable[[], object], bool]


class _Transaction:
    """One physical transaction: a session, its repositories and its hooks."""

    __slots__ = (
        "_joined",
        "broken",
        "guarded",
        "hooks",
        "isolation_level",
        "outer_unit",
        "read_only",
        "refused",
        "repositories",
        "session",
        "session_guarded",
        "used",
    )

    def __init__(self, read_only: bool, isolation_level: str | None) -> None:
        self.read_only = read_only
        self.isolation_level = isolation_level
        self.session: Any = None
        self.repositories: dict[str, _RepositoryBase[Any]] = {}
        self.hooks: list[_Hook] = []
        #: Whether a repository or the session was used since the last commit or rollback.
        self.used = False
        #: Whether a rollback failed, so the connection must be invalidated.
        self.broken = False
        #: Whether the write guard of a read-only scope is installed, and whether it refused a write.
        self.guarded = False
        self.refused = False
        #: Whether the session refuses commit, rollback and close from scopes above the owner's.
        self.session_guarded = False
        #: The unit of work active in this thread or task when this one started (another object).
        self.outer_unit: _UnitOfWorkCore | None = None
        self._joined: dict[bool, _Scope] = {}

    def joined(self, read_only: bool) -> _Scope:
        """A plain joined scope of this transaction; it holds no state of its own, so one is shared."""
        scope = self._joined.get(read_only)
        if scope is None:
            scope = self._joined[read_only] = _Scope(JOINED, self, read_only, commit_on_exit=False)
        return scope


OWNER, JOINED, SAVEPOINT = 0, 1, 2


class _Scope:
    """One ``with`` block of a unit of work: the owner, a joined scope or a savepoint."""

    __slots__ = (
        "commit_on_exit",
        "event_marks",
        "handle",
        "hook_mark",
        "kind",
        "poison",
        "read_only",
        "rollback_only",
        "sealed",
        "token",
        "tx",
    )

    def __init__(self, kind: int, tx: _Transaction, read_only: bool, commit_on_exit: bool) -> None:
        self.kind = kind
        self.tx = tx
        self.read_only = read_only
        self.commit_on_exit = commit_on_exit
        self.handle: Any = None
        self.hook_mark = 0
        #: For a savepoint: how many events each seen object had when it began.
        self.event_marks: dict[int, int] = {}
        self.poison: BaseException | None = None
        self.rollback_only = False
        #: Whether nothing may join this scope any more (its hooks run, or its request has answered).
        self.sealed = False
        self.token: Token[_UnitOfWorkCore | None] | None = None

    def releases(self, exc: BaseException | None) -> bool:
        """Whether a savepoint ending with *exc* keeps its work."""
        return exc is None and self.poison is None and not self.rollback_only


Propagation = Literal["required", "requires_new", "nested", "mandatory", "never"]
_PROPAGATION_NAMES: tuple[str, ...] = get_args(Propagation)
_PROPAGATIONS = frozenset(_PROPAGATION_NAMES)

#: The isolation levels a unit of work may ask for; the database must support the one chosen.
ISOLATION_LEVELS = frozenset({"READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"})

_current: ContextVar[_UnitOfWorkCore | None] = ContextVar("uow_current", default=None)


def _check_options(propagation: str, isolation_level: str | None) -> None:
    if propagation not in _PROPAGATIONS:
        msg = f"propagation must be one of {', '.join(map(repr, _PROPAGATION_NAMES))}, not {propagation!r}"
        raise ConfigurationError(msg)
    if isolation_level is not None and isolation_level not in ISOLATION_LEVELS:
        msg = (
            f"isolation_level must be one of {', '.join(map(repr, sorted(ISOLATION_LEVELS)))}, not {isolation_level!r}"
        )
        raise ConfigurationError(msg)


U = TypeVar("U", bound="UnitOfWork")
AU = TypeVar("AU", bound="AsyncUnitOfWork")
Any_U = TypeVar("Any_U", bound=_UnitOfWorkCore)


def _outer_unit() -> _UnitOfWorkCore | None:
    """The active unit of work in this context, even one that a parent task or thread entered."""
    unit = _current.get()
    return unit if unit is not None and unit._tx is not None else None


def _active_here() -> _UnitOfWorkCore | None:
    """The unit of work active in this thread or task, if any."""
    unit = _current.get()
    if unit is None or not unit._scopes or unit._owner != unit._here():
        return None
    return unit


@overload
def current() -> UnitOfWork | AsyncUnitOfWork: ...


@overload
def current(kind: Callable[..., Any_U]) -> Any_U: ...


# *kind* is typed as a callable because mypy refuses abstract classes where
# ``type[...]`` is expected, and the abstract unit of work is the usual kind.
def current(kind: Any = None) -> Any:
    """The unit of work active in this thread or task.

    For code that cannot take the unit of work as a parameter. *kind*
    narrows the type: ``current(AllocationUnitOfWork)``. Raises
    :class:`~uow.errors.InactiveUnitOfWorkError` when none is active here, or
    when the active one is not a *kind*. A unit of work entered by another
    thread or task (whose context this one copied) is not returned.
    """
    unit = _active_here()
    if unit is None:
        msg = (
            "no unit of work is active in this thread or task: call this code inside `with uow:` "
            "(or a @transactional function), or pass the unit of work to it"
        )
        raise InactiveUnitOfWorkError(msg)
    if kind is not None and not isinstance(unit, kind):
        msg = f"the active unit of work is a {type(unit).__name__}, not a {kind.__name__}"
        raise InactiveUnitOfWorkError(msg)
    return unit


class _BlockBase:
    """The options of a scope, and the step before entering it that does no I/O."""

    __slots__ = ("_commit_on_exit", "_isolation_level", "_propagation", "_read_only", "_savepoint", "owner")

    def __init__(
        self,
        propagation: str,
        read_only: bool | None,
        isolation_level: str | None,
        *,
        commit_on_exit: bool = False,
        savepoint: bool = False,
    ) -> None:
        self._propagation = propagation
        self._read_only = read_only
        self._isolation_level = isolation_level
        self._commit_on_exit = commit_on_exit
        self._savepoint = savepoint
        #: Whether entering started a transaction of its own.
        self.owner = False

    def _plan(self, unit: _UnitOfWorkCore) -> _Scope:
        if self._savepoint and not unit._scopes:
            unit._check_use("savepoint()")
        scope = unit._plan(
            self._propagation, self._read_only, self._isolation_level, commit_on_exit=self._commit_on_exit
        )
        self.owner = scope.kind == OWNER
        return scope


class Block(_BlockBase, Generic[U]):
    """A scope of a sync unit of work, from :meth:`UnitOfWork.transaction`; use it with ``with``."""

    __slots__ = ("_unit",)

    def __init__(self, unit: U, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unit = unit

    def __enter__(self) -> U:
        self._unit._enter_scope(self._plan(self._unit))
        return self._unit

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._unit._exit_scope(exc)


class AsyncBlock(_BlockBase, Generic[AU]):
    """A scope of an async unit of work, from :meth:`AsyncUnitOfWork.transaction`; use it with ``async with``."""

    __slots__ = ("_unit",)

    def __init__(self, unit: AU, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unit = unit

    async def __aenter__(self) -> AU:
        await self._unit._enter_scope(self._plan(self._unit))
        return self._unit

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._unit._exit_scope(exc)


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
    """

    _interface = Repository
    _sync = True
    _here = staticmethod(_thread_and_task)

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

    @abc.abstractmethod
    def _end_savepoint(self, handle: Any, *, release: bool) -> None:
        """Release the savepoint, or roll back to it; a failed release rolls back and raises."""

    # -- scopes --------------------------------------------------------------

    def __enter__(self) -> Self:
        self._enter_scope(self._plan("required", None, None, commit_on_exit=False))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit_scope(exc)

    def transaction(
        self,
        *,
        propagation: Propagation = "required",
        read_only: bool | None = None,
        isolation_level: str | None = None,
    ) -> Block[Self]:
        """A scope with options, for ``with uow.transaction(...):``; ``with uow:`` is the default one.

        *propagation* says what to do when this unit of work is already
        active: ``"required"`` joins it (or starts a transaction when none
        is active), ``"requires_new"`` suspends it and runs a transaction of
        its own, ``"nested"`` runs in a savepoint, ``"mandatory"`` joins and
        raises if there is nothing to join, ``"never"`` raises if there is.
        *read_only* and *isolation_level* apply to a transaction that this
        scope starts; a joined scope may only ask for what is already set.
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
        if scope.kind == OWNER:
            session = self._open()
            self._adopt(session, _outer_unit())
            scope.tx.session = session
            try:
                if scope.tx.isolation_level is not None or scope.tx.read_only:
                    self._prepare(scope.tx)
            except BaseException:
                try:
                    self._close(session, invalidate=False)
                except Exception:
                    log.exception("uow: closing the session after a failed start failed")
                raise
        elif scope.kind == SAVEPOINT:
            scope.handle = self._begin_savepoint(scope.tx.session)
        elif scope.read_only and not self._scopes[-1].read_only:
            self._flush(scope.tx.session)  # the writes pending so far are the outer scope's
            self._read_only_scope(scope.tx.session, starts=True)
        self._push(scope)

    def _exit_scope(self, exc: BaseException | None) -> None:
        scope = self._scopes[-1]
        if scope.kind == JOINED:
            narrows = self._narrows_to_read_only(scope)
            try:
                if exc is None and narrows and not self._alarm:
                    self._flush(scope.tx.session)  # a write left pending here is refused now, not at the commit
            except BaseException as error:
                self._pop()
                self._poison(error)
                raise
            finally:
                if narrows:
                    self._read_only_scope(scope.tx.session, starts=False)
            self._pop()
            if exc is not None:
                self._poison(exc)
            return
        if scope.kind == SAVEPOINT:
            self._exit_savepoint(scope, exc)
            return
        try:
            if exc is None and scope.tx.read_only and not scope.tx.refused and scope.poison is None:
                self._flush(scope.tx.session)  # a write left pending is refused, not silently dropped
            plan = self._owner_exit_plan(scope, exc)
            if plan == "commit":
                self.commit()
            elif plan != "nothing":
                self._rolled_back(scope.tx)
            if plan == "poisoned":
                raise self._rollback_only_error(scope) from scope.poison
        except BaseException:
            self._release(scope, quiet=True)
            raise
        self._release(scope, quiet=exc is not None)

    def _exit_savepoint(self, scope: _Scope, exc: BaseException | None) -> None:
        release = scope.releases(exc)
        try:
            self._end_savepoint(scope.handle, release=release)
        except BaseException as error:
            failure = self._savepoint_ended(scope, exc, release, error)
        else:
            failure = self._savepoint_ended(scope, exc, release, None)
        if failure is not None:
            raise failure

    def _release(self, scope: _Scope, *, quiet: bool) -> None:
        try:
            self._close(scope.tx.session, invalidate=scope.tx.broken)
        except Exception:
            if not quiet:
                raise
            log.exception("uow: closing the session after an error failed")
        finally:
            self._pop()

    # -- the transaction -----------------------------------------------------

    def commit(self) -> None:
        """Commit the work done so far.

        In the owner's block this commits for real, then runs the
        ``on_commit`` hooks. In a joined scope or a savepoint it only records
        that the work is done: the owner's commit makes it durable. If the
        commit fails, the work is rolled back and the error raised.
        """
        scope = self._scope_for("commit()")
        tx = scope.tx
        if scope.kind != OWNER or scope.rollback_only or tx.read_only:
            self._check_may_commit(scope)
            if scope.kind != OWNER:
                self._flush(tx.session)  # errors surface here, in the scope that caused them
                return
        try:
            self._flush(tx.session)
            try:
                self._commit(tx.session)
            except BaseException as error:
                self._commit_outcome_unknown = _outcome_unknown(error)
                raise
        except BaseException:
            self._discard(tx)
            raise
        self._committed(tx)
        if tx.hooks:
            self._run_hooks(tx)

    def rollback(self) -> None:
        """Discard the uncommitted work of the owner's block now; the block goes on.

        In a joined scope or a savepoint it raises
        :class:`~uow.errors.JoinedScopeError`: raise an exception instead, so
        that the owner rolls back, or use :meth:`savepoint`.
        """
        scope = self._owner_scope("rollback()")
        self._rollback(scope.tx.session)
        self._rolled_back_by_owner(scope)

    def _discard(self, tx: _Transaction) -> None:
        """Roll back after an error; log, never raise, if the rollback fails too."""
        try:
            self._rollback(tx.session)
        except Exception:
            tx.broken = True
            log.exception("uow: rollback after an error failed; the connection will be invalidated")
        self._rolled_back(tx)

    def on_commit(self, callback: Callable[[], object], *, robust: bool = False) -> None:
        """Run *callback* after the outermost real commit of this transaction.

        Hooks run in the order they were registered, and a hook registered by
        a hook runs in the same pass. They are dropped when the transaction
        rolls back, and with a savepoint that rolls back. A hook that raises
        stops the others and the error propagates from ``commit()``, after
        the data was committed; with ``robust=True`` the error is logged and
        the next hook runs.
        """
        if type(callback) in (types.FunctionType, types.MethodType) and inspect.iscoroutinefunction(callback):
            msg = f"{_shown(callback)} is a coroutine function; a sync unit of work runs sync hooks only"
            raise ConfigurationError(msg)
        self._add_hook(callback, robust)

    def _run_hooks(self, tx: _Transaction) -> None:
        hooks = tx.hooks
        started = self._start_hooks()
        try:
            while hooks:
                callback, robust = hooks.pop(0)
                try:
                    result = callback()
                    if inspect.isawaitable(result):
                        if inspect.iscoroutine(result):
                            result.close()
                        msg = (
                            f"on_commit hook {_shown(callback)} returned an awaitable; "
                            "a sync unit of work cannot await it"
                        )
                        raise ConfigurationError(msg)
                except Exception:
                    if not robust:
                        hooks.clear()
                        raise
                    log.exception("uow: on_commit hook %r failed", callback)
        finally:
            self._end_hooks(started)


class AsyncUnitOfWork(_UnitOfWorkCore, abc.ABC):
    """The async twin of :class:`UnitOfWork`, used with ``async with uow:``."""

    _interface = AsyncRepository
    _sync = False
    _here = staticmethod(_current_task)

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

    @abc.abstractmethod
    async def _end_savepoint(self, handle: Any, *, release: bool) -> None:
        """Release the savepoint, or roll back to it; a failed release rolls back and raises."""

    # -- scopes --------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._enter_scope(self._plan("required", None, None, commit_on_exit=False))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._exit_scope(exc)

    def transaction(
        self,
        *,
        propagation: Propagation = "required",
        read_only: bool | None = None,
        isolation_level: str | None = None,
    ) -> AsyncBlock[Self]:
        """A scope with options, for ``async with uow.transaction(...):``; see :meth:`UnitOfWork.transaction`."""
        return AsyncBlock(self, propagation, read_only, isolation_level)

    def savepoint(self) -> AsyncBlock[Self]:
        """A savepoint inside the active block, for ``async with uow.savepoint():``.

        See :meth:`UnitOfWork.savepoint`.
        """
        return AsyncBlock(self, "nested", None, None, savepoint=True)

    async def _enter_scope(self, scope: _Scope) -> None:
        if scope.kind == OWNER:
            session = await self._open()
            self._adopt(session, _outer_unit())
            scope.tx.session = session
            try:
                if scope.tx.isolation_level is not None or scope.tx.read_only:
                    self._prepare(scope.tx)
            except BaseException:
                try:
                    await _run_to_completion(self._close(session, invalidate=False))
                except Exception:
                    log.exception("uow: closing the session after a failed start failed")
                raise
        elif scope.kind == SAVEPOINT:
            scope.handle = await self._begin_savepoint(scope.tx.session)
        elif scope.read_only and not self._scopes[-1].read_only:
            await self._flush(scope.tx.session)  # the writes pending so far are the outer scope's
            self._read_only_scope(scope.tx.session, starts=True)
        self._push(scope)

    async def _exit_scope(self, exc: BaseException | None) -> None:
        scope = self._scopes[-1]
        if scope.kind == JOINED:
            narrows = self._narrows_to_read_only(scope)
            try:
                if exc is None and narrows and not self._alarm:
                    await self._flush(scope.tx.session)  # a write left pending here is refused now
            except BaseException as error:
                self._pop()
                self._poison(error)
                raise
            finally:
                if narrows:
                    self._read_only_scope(scope.tx.session, starts=False)
            self._pop()
            if exc is not None:
                self._poison(exc)
            return
        if scope.kind == SAVEPOINT:
            await self._exit_savepoint(scope, exc)
            return
        try:
            if exc is None and scope.tx.read_only and not scope.tx.refused and scope.poison is None:
                await self._flush(scope.tx.session)  # a write left pending is refused, not silently dropped
            plan = self._owner_exit_plan(scope, exc)
            if plan == "commit":
                await self.commit()
            elif plan != "nothing":
                self._rolled_back(scope.tx)
            if plan == "poisoned":
                raise self._rollback_only_error(scope) from scope.poison
        except BaseException:
            await self._release(scope, quiet=True)
            raise
        await self._release(scope, quiet=exc is not None)

    async def _exit_savepoint(self, scope: _Scope, exc: BaseException | None) -> None:
        release = scope.releases(exc)
        try:
            await _run_to_completion(self._end_savepoint(scope.handle, release=release))
        except BaseException as error:
            failure = self._savepoint_ended(scope, exc, release, error)
        else:
            failure = self._savepoint_ended(scope, exc, release, None)
        if failure is not None:
            raise failure

    async def _release(self, scope: _Scope, *, quiet: bool) -> None:
        # Closing must finish even if this task is cancelled meanwhile, or the
        # connection would stay checked out; the cancellation is re-raised after.
        try:
            await _run_to_completion(self._close(scope.tx.session, invalidate=scope.tx.broken))
        except Exception:
            if not quiet:
                raise
            log.exception("uow: closing the session after an error failed")
        finally:
            self._pop()

    # -- the transaction -----------------------------------------------------

    async def commit(self) -> None:
        """Commit the work done so far; see :meth:`UnitOfWork.commit`."""
        scope = self._scope_for("commit()")
        tx = scope.tx
        if scope.kind != OWNER or scope.rollback_only or tx.read_only:
            self._check_may_commit(scope)
            if scope.kind != OWNER:
                await self._flush(tx.session)  # errors surface here, in the scope that caused them
                return
        try:
            await self._flush(tx.session)
            try:
                await self._commit(tx.session)
            except BaseException as error:
                self._commit_outcome_unknown = _outcome_unknown(error)
                raise
        except BaseException:
            await _run_to_completion(self._discard(tx))
            raise
        self._committed(tx)
        if tx.hooks:
            await self._run_hooks(tx)

    async def rollback(self) -> None:
        """Discard the uncommitted work of the owner's block now; see :meth:`UnitOfWork.rollback`."""
        scope = self._owner_scope("rollback()")
        await self._rollback(scope.tx.session)
        self._rolled_back_by_owner(scope)

    async def _discard(self, tx: _Transaction) -> None:
        """Roll back after an error; log, never raise, if the rollback fails too."""
        try:
            await self._rollback(tx.session)
        except Exception:
            tx.broken = True
            log.exception("uow: rollback after an error failed; the connection will be invalidated")
        self._rolled_back(tx)

    def on_commit(self, callback: Callable[[], object], *, robust: bool = False) -> None:
        """Run *callback* after the outermost real commit; see :meth:`UnitOfWork.on_commit`.

        The callback may be a coroutine function: what it returns is awaited.
        """
        self._add_hook(callback, robust)

    async def _run_hooks(self, tx: _Transaction) -> None:
        hooks = tx.hooks
        started = self._start_hooks()
        try:
            while hooks:
                callback, robust = hooks.pop(0)
                try:
                    result = callback()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    if not robust:
                        hooks.clear()
                        raise
                    log.exception("uow: on_commit hook %r failed", callback)
        finally:
            self._end_hooks(started)


def _joined_error(what: str) -> JoinedScopeError:
    msg = (
        f"{what} in a joined scope: only the owner of the transaction may do that. Raise an exception "
        "to roll the whole transaction back, or use `uow.savepoint()` to undo only this part"
    )
    return JoinedScopeError(msg)


def _outcome_unknown(error: BaseException) -> bool:
    """Whether a commit that raised *error* may still have been applied by the database."""
    return not is_retryable(error)


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
