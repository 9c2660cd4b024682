"""The records the state machine keeps: transactions, scopes, and the names of their states.

A *transaction* is one physical database transaction: a session, its
repositories and hooks. A *scope* is one block of a unit of work (a ``with``
statement, a ``@transactional`` call): the owner of a transaction, a scope
joined to it, or a savepoint in it. Neither does anything: the machine in
``_machine.py`` changes them, and the twins drive the machine.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from contextvars import Token
from types import FrameType, MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._machine import _UnitOfWorkCore
    from ._observe import Watch
    from ._outbox import Message
    from ._repository import _RepositoryBase

__all__ = ["ISOLATION_LEVELS", "Kind", "Plan", "Propagation", "State", "check_options"]


class Kind(enum.Enum):
    """What a scope is to its transaction."""

    #: It started the transaction: only it commits, rolls back for real and closes the session.
    OWNER = "owner"
    #: It runs inside another scope's transaction and has nothing of its own to end.
    JOINED = "joined"
    #: It runs in a savepoint of the transaction, which it releases or rolls back.
    SAVEPOINT = "savepoint"


class State(enum.Enum):
    """Where a scope is in its life."""

    #: Open, and joinable.
    OPEN = "open"
    #: Open, but its transaction has ended (its ``on_commit`` hooks run) or its request has answered:
    #: entering the unit of work starts a new transaction instead of joining this one.
    SEALED = "sealed"
    #: Its block has left it.
    CLOSED = "closed"
    #: An outer block ended while this one was still open (a generator suspended inside it), and
    #: closed it first; its own exit, when it comes, does nothing.
    CLOSED_EARLY = "closed early"


class Plan(enum.Enum):
    """What an owner does when its block is left."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    #: Roll back, then raise RollbackOnlyError: a joined scope failed and its error was swallowed.
    POISONED = "poisoned"
    #: Nothing was done since the last commit or rollback: only close.
    NOTHING = "nothing"


# The members as module constants, for the code on the path of every block: reading ``Kind.OWNER`` goes
# through the enum class each time, about ten times as slow as a global, and a block reads a dozen.
OWNER, JOINED, SAVEPOINT = Kind.OWNER, Kind.JOINED, Kind.SAVEPOINT
OPEN, SEALED, CLOSED, CLOSED_EARLY = State.OPEN, State.SEALED, State.CLOSED, State.CLOSED_EARLY
COMMIT, ROLLBACK, POISONED, NOTHING = Plan.COMMIT, Plan.ROLLBACK, Plan.POISONED, Plan.NOTHING

Propagation = Literal["required", "requires_new", "nested", "mandatory", "never"]
_PROPAGATION_NAMES: tuple[str, ...] = get_args(Propagation)
PROPAGATIONS = frozenset(_PROPAGATION_NAMES)

#: The isolation levels a unit of work may ask for; the database must support the one chosen.
ISOLATION_LEVELS = frozenset({"READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"})


def check_options(propagation: str, isolation_level: str | None) -> None:
    """Raise ConfigurationError for an unknown propagation mode or isolation level."""
    if propagation not in PROPAGATIONS:
        msg = f"propagation must be one of {', '.join(map(repr, _PROPAGATION_NAMES))}, not {propagation!r}"
        raise ConfigurationError(msg)
    check_isolation_level(isolation_level)


def check_isolation_level(isolation_level: str | None) -> None:
    if isolation_level is not None and isolation_level not in ISOLATION_LEVELS:
        msg = (
            f"isolation_level must be one of {', '.join(map(repr, sorted(ISOLATION_LEVELS)))}, not {isolation_level!r}"
        )
        raise ConfigurationError(msg)


#: A hook of a transaction: its kind (the name of the method that registered it), the callback, robust.
_Hook = tuple[str, Any, bool]

#: The event marks of a scope that is not a savepoint: none.
_NO_MARKS: Mapping[int, int] = MappingProxyType({})


class _Health:
    """Whether a transaction, or a savepoint in it, can still commit: shared by the scopes joined to it.

    The records below have slots: fixed fields, no dictionary per record.
    """

    __slots__ = ("poison", "rollback_only", "spare")

    def __init__(self) -> None:
        #: The error of a joined scope that failed inside it, which makes it rollback-only.
        self.poison: BaseException | None = None
        #: set_rollback_only() was called.
        self.rollback_only = False
        #: A joined scope of this health that no call holds now, kept for the decorator's next join.
        self.spare: _Scope | None = None


class _Transaction(_Health):
    """One physical transaction: a session, its repositories and its hooks; the health of its owner's scope."""

    # "attempt", "function" and "propagation" are set only where known, and read with a default: the
    # block's propagation mode, and the service function and attempt number of a @transactional call.
    __slots__ = (
        "attempt",
        "broken",
        "commit_on_exit",
        "commits",
        "committing",
        "ending",
        "function",
        "hooks",
        "isolation_level",
        "nested_commits",
        "open",
        "outbox",
        "outcome_unknown",
        "parent",
        "propagation",
        "read_only",
        "refused",
        "repositories",
        "session",
        "session_guarded",
        "token",
        "unit",
        "used",
        "watch",
        "write_guarded",
    )

    attempt: int
    function: str
    propagation: str

    def __init__(self, unit: _UnitOfWorkCore, read_only: bool, isolation_level: str | None) -> None:
        self.poison = None
        self.rollback_only = False
        self.spare = None
        self.unit = unit
        self.read_only = read_only
        self.isolation_level = isolation_level
        self.repositories: dict[str, _RepositoryBase[Any]] = {}
        self.hooks: list[_Hook] = []
        #: The messages published in it, with their payloads' bytes, for the outbox at its commit.
        self.outbox: list[tuple[Message, bytes]] = []
        #: Whether a repository or the session was used since the last commit or rollback.
        self.used = False
        self.session: Any = None
        #: Whether a rollback failed, so the connection must be invalidated.
        self.broken = False
        #: Whether the write guard of a read-only scope is installed, and whether it refused a write.
        self.write_guarded = False
        self.refused = False
        #: Whether the session refuses commit, rollback and close from scopes above the owner's.
        self.session_guarded = False
        #: The transaction current in this context when this one started: in this unit of work (under
        #: ``requires_new``), in another one, or in the task or thread that started this one.
        self.parent: _Transaction | None = None
        #: Real commits of this transaction, and of transactions started inside it, in any task or
        #: thread that inherited its context: durable work that a retry must not repeat.
        self.commits = 0
        self.nested_commits = 0
        #: Whether its last failed commit may still have reached the database.
        self.outcome_unknown = False
        #: False once its owner's scope has closed.
        self.open = True
        #: Whether its owner commits on a clean exit (a @transactional call, or a block of the integrations).
        self.commit_on_exit = False
        #: Whether its ``before_commit`` hooks are running: the commit has begun, and may not begin again.
        self.committing = False
        #: While the hooks of its end run: how it ended (``"committed"``, ``"rolled_back"``, ``"unknown"``).
        self.ending: str | None = None
        #: What the log records and OpenTelemetry know of it, when it is watched (see ``_observe.py``).
        self.watch: Watch | None = None
        #: The owner's setting of the context's current transaction, reset when the owner's scope closes.
        self.token: Token[_Transaction | None] | None = None

    @property
    def durable(self) -> bool:
        """Whether work of this transaction, or of one started inside it, was committed for real."""
        return bool(self.commits or self.nested_commits)


class _Scope:
    """One block of a unit of work: the owner of a transaction, a scope joined to it, or a savepoint."""

    __slots__ = (
        "event_marks",
        "frame",
        "handle",
        "health",
        "holder",
        "hook_mark",
        "kind",
        "narrows",
        "outbox_mark",
        "read_only",
        "serial",
        "state",
        "tx",
    )

    def __init__(self, kind: Kind, tx: _Transaction, read_only: bool, health: _Health) -> None:
        self.kind = kind
        self.tx = tx
        self.read_only = read_only
        #: The health of the innermost scope that can roll back on its own, where an error in this one
        #: lands: its transaction's for an owner, its own for a savepoint, shared with the scope it
        #: joined otherwise.
        self.health = health
        self.state = OPEN
        #: The generator whose code entered it, if that generator can pause with it open while its
        #: caller goes on outside it; None when plain code, or a generator run as a context manager,
        #: entered it.
        self.holder: FrameType | None = None
        #: The frame whose ``with uow:`` statement entered it, which its ``__exit__`` comes from.
        self.frame: FrameType | None = None
        #: When it was entered, in the order of its unit of work's scopes.
        self.serial = 0
        #: For a joined scope: read-only inside a read-write one, so its writes are checked at its end.
        self.narrows = False
        #: For a savepoint: its handle, and the hooks, domain events and messages there were when it began.
        self.handle: Any = None
        self.hook_mark = 0
        self.event_marks: Mapping[int, int] = _NO_MARKS
        self.outbox_mark = 0

    @property
    def suspended(self) -> bool:
        """Whether the generator that holds this scope is paused, so that the code running now is outside it.

        A generator's frame has a caller (``f_back``) only while it runs; seen
        from its own thread or task, a paused one is paused at a ``yield``.
        """
        holder = self.holder
        return holder is not None and holder.f_back is None

    def releases(self, exc: BaseException | None) -> bool:
        """Whether a savepoint ending with *exc* keeps its work."""
        health = self.health
        return exc is None and health.poison is None and not health.rollback_only

    def __repr__(self) -> str:
        return f"<{self.kind.value} scope, {self.state.value}>"
