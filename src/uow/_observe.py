"""What uow tells operators about its transactions: log records on the ``uow`` logger, and OpenTelemetry.

The state machine calls in here when an owner's transaction begins, at each
real commit and rollback, when a savepoint ends and when the owner's scope
closes; the decorator calls in on a retry. Nothing is measured unless the
``uow`` logger is enabled for INFO or below, or ``uow.otel.UowInstrumentor``
switched OpenTelemetry on: the machine asks :func:`watching` once per
transaction, and a transaction it did not watch costs nothing more.

Every log record carries its fields in ``extra``, so that structlog and JSON
formatters find them as attributes of the record: ``uow_unit`` (the unit of
work's class, and the service function when ``@transactional`` knows it),
``uow_event`` (``begin``, ``commit``, ``rollback``, ``retry``),
``uow_duration_ms``, ``uow_outcome``, ``uow_attempt`` and ``uow_error``.
An error is described by its class, its SQLSTATE or driver code, and the
first line of its message: SQLAlchemy puts the statement and its parameters
on the lines after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._machine import _UnitOfWorkCore
    from ._scope import _Transaction

log = logging.getLogger("uow")

_DEBUG = logging.DEBUG
_INFO = logging.INFO

#: The outcomes of a transaction, as log records and spans name them.
COMMITTED = "committed"
ROLLED_BACK = "rolled_back"
ROLLBACK_ONLY = "rollback_only"
FAILED_COMMIT = "failed_commit"
UNKNOWN = "unknown"


class Telemetry(Protocol):
    """What ``uow.otel`` does at each step; its one instance is :data:`telemetry` while it is on."""

    def begin(self, unit: _UnitOfWorkCore, tx: _Transaction, watch: Watch) -> None: ...

    def ended(self, watch: Watch, outcome: str, code: str | None, error: BaseException | None) -> None: ...

    def savepoint(self, watch: Watch, released: bool) -> None: ...

    def close(self, watch: Watch) -> None: ...

    def retry(self, name: str, attempt: int, error: BaseException, code: str | None) -> None: ...

    def event(self, watch: Watch | None, name: str, attributes: dict[str, Any]) -> None: ...

    def waited(self, watch: Watch, seconds: float) -> None: ...

    def inject(self, headers: Mapping[str, str]) -> Mapping[str, str]: ...

    def sending(
        self, system: str, topic: str, message_id: str, headers: dict[str, str]
    ) -> tuple[Any, dict[str, str]]: ...

    def sent(self, span: Any, error: BaseException | None) -> None: ...

    def relayed(self, system: str, topic: str, result: str, lag: float | None) -> None: ...


#: The OpenTelemetry side, while ``UowInstrumentor`` has it on; None otherwise.
telemetry: Telemetry | None = None


class Watch:
    """What is known about one watched owner's transaction, from its begin to its close."""

    __slots__ = (
        "attempt",
        "error",
        "flushed",
        "isolation_level",
        "kind",
        "name",
        "outcome",
        "propagation",
        "read_only",
        "savepoints",
        "session",
        "span",
        "started",
        "token",
    )

    def __init__(self, kind: str, name: str, tx: _Transaction) -> None:
        #: The unit of work's class name, and the transaction's name (with the service function, if known).
        self.kind = kind
        self.name = name
        self.started = time.perf_counter()
        self.propagation: str = getattr(tx, "propagation", "required")
        self.attempt: int = getattr(tx, "attempt", 1)
        self.read_only = tx.read_only
        self.isolation_level = tx.isolation_level
        #: How the latest real commit or rollback ended, and the error that caused a rollback, as logged.
        self.outcome: str | None = None
        self.error: str | None = None
        self.savepoints = 0
        #: Per mapped class name: the objects flushed (inserted, updated or deleted) in the transaction.
        self.flushed: dict[str, int] = {}
        #: OpenTelemetry's span, the token that made it current, and the ORM session whose flushes it counts.
        self.span: Any = None
        self.token: Any = None
        self.session: Any = None

    @property
    def duration_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


def watching() -> bool:
    """Whether a transaction beginning now is watched: OpenTelemetry is on, or the logger takes INFO records."""
    return telemetry is not None or log.isEnabledFor(_INFO)


def unit_name(unit: _UnitOfWorkCore, tx: _Transaction) -> str:
    """The name of a transaction: its unit of work's class, then the service function when the decorator knows it."""
    function: str | None = getattr(tx, "function", None)
    return f"{type(unit).__name__} {function}" if function else type(unit).__name__


def begin(unit: _UnitOfWorkCore, tx: _Transaction) -> None:
    """An owner's transaction begins: watch it."""
    watch = tx.watch = Watch(type(unit).__name__, unit_name(unit, tx), tx)
    if log.isEnabledFor(_DEBUG):
        log.debug(
            "uow: %s began a transaction",
            watch.name,
            extra={"uow_unit": watch.name, "uow_event": "begin", "uow_attempt": watch.attempt},
        )
    if telemetry is not None:
        telemetry.begin(unit, tx, watch)


def ended(watch: Watch, outcome: str, cause: BaseException | None) -> None:
    """A real commit or rollback of a watched transaction, with what caused a rollback, if anything did."""
    watch.outcome = outcome
    code = error_code(cause) if cause is not None else None
    watch.error = describe(cause, code) if cause is not None else None
    level = _DEBUG if outcome == COMMITTED or cause is None else _INFO
    if log.isEnabledFor(level):
        duration = watch.duration_ms
        extra: dict[str, object] = {
            "uow_unit": watch.name,
            "uow_event": "commit" if outcome == COMMITTED else "rollback",
            "uow_outcome": outcome,
            "uow_duration_ms": round(duration, 3),
            "uow_attempt": watch.attempt,
        }
        if cause is None:
            log.log(level, "uow: %s %s after %.1f ms", watch.name, outcome.replace("_", " "), duration, extra=extra)
        else:
            extra["uow_error"] = described = watch.error
            log.log(
                level,
                "uow: %s %s after %.1f ms: %s",
                watch.name,
                outcome.replace("_", " "),
                duration,
                described,
                extra=extra,
            )
    if telemetry is not None:
        telemetry.ended(watch, outcome, code, cause)


def savepoint(watch: Watch, released: bool) -> None:
    if telemetry is not None:
        telemetry.savepoint(watch, released)


def closed(tx: _Transaction) -> None:
    """The owner's scope of a watched transaction closed."""
    watch = tx.watch
    tx.watch = None
    if watch is not None and telemetry is not None:
        telemetry.close(watch)


def retry(name: str, attempt: int, retries: int, delay: float, error: BaseException) -> None:
    """``@transactional`` runs *name* again after *error*: retry number *attempt* of *retries*."""
    code = error_code(error)
    described = describe(error, code)
    log.warning(
        "uow: %s failed with %s; retry %d of %d in %.3f s",
        name,
        described,
        attempt,
        retries,
        delay,
        extra={"uow_unit": name, "uow_event": "retry", "uow_attempt": attempt + 1, "uow_error": described},
    )
    if telemetry is not None:
        telemetry.retry(name, attempt, error, code)


def waited(watch: Watch, seconds: float) -> None:
    """A watched transaction took *seconds* to get its connection."""
    if telemetry is not None:
        telemetry.waited(watch, seconds)


def event(watch: Watch | None, name: str, **attributes: Any) -> None:
    """An event of a transaction's span (a hook that failed, an ownership violation), while OpenTelemetry is on."""
    if telemetry is not None:
        telemetry.event(watch, name, attributes)


def error_code(error: BaseException) -> str | None:
    """The SQLSTATE, or the driver's numeric code, of a database error on *error* or its causes; None if none."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        orig = getattr(current, "orig", None)
        for candidate in (orig, current):
            for attribute in ("sqlstate", "pgcode"):
                value = getattr(candidate, attribute, None)
                if isinstance(value, str) and value:
                    return value
            args = getattr(candidate, "args", ())
            if candidate is orig and args and isinstance(args[0], int):
                return str(args[0])
        current = current.__cause__
    return None


def describe(error: BaseException, code: str | None) -> str:
    """*error* as a log record shows it: its class, its code, and the first line of its message only.

    SQLAlchemy writes the statement and its parameters on the lines after the first.
    """
    name = f"{type(error).__name__} ({code})" if code else type(error).__name__
    lines = str(error).strip().splitlines()
    return f"{name}: {lines[0][:200]}" if lines else name
