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
An error is described by its class and its SQLSTATE or driver code; a
database error's message is left out, as drivers put the refused values in
it, and for an error of the application only its first line is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from sqlalchemy import exc as sa_exc

if TYPE_CHECKING:
    from ._machine import _UnitOfWorkCore
    from ._scope import _Transaction

log = logging.getLogger("uow")

_DEBUG = logging.DEBUG
_INFO = logging.INFO

#: The outcomes of a transaction, as log records and spans name them. The first three are also the
#: statuses an ``after_completion`` hook is given (``_hooks.Completion``).
COMMITTED: Final = "committed"
ROLLED_BACK: Final = "rolled_back"
UNKNOWN: Final = "unknown"
ROLLBACK_ONLY: Final = "rollback_only"
FAILED_COMMIT: Final = "failed_commit"


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
        "asked",
        "attempt",
        "connected",
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
        "telemetry",
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
        #: The OpenTelemetry side that began it, which ends it even if switched off meanwhile; None if none did.
        self.telemetry: Telemetry | None = None
        #: When its session first needed a connection since the last commit or rollback, and whether it got one.
        self.asked: float | None = None
        self.connected = False

    @property
    def duration_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


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
    on = telemetry
    if on is not None:
        try:
            on.begin(unit, tx, watch)
        except Exception:
            _failed("begin")
        else:
            watch.telemetry = on


def _failed(step: str) -> None:
    """OpenTelemetry failed at *step* (a span processor that raised, say): logged, never the transaction's failure.

    The data is committed or rolled back by then, and the unit of work must
    be released whatever its telemetry does.
    """
    log.exception("uow: OpenTelemetry failed at the transaction's %s; the transaction is not affected", step)


def _tell(step: str, method: Callable[..., object], *args: Any) -> None:
    """Call *method* of the telemetry; if it raises, :func:`_failed` at *step* logs it, and nothing is raised."""
    try:
        method(*args)
    except Exception:
        _failed(step)


def ended(watch: Watch, outcome: str, cause: BaseException | None) -> None:
    """A real commit or rollback of a watched transaction, with what caused a rollback, if anything did."""
    watch.outcome = outcome
    watch.asked, watch.connected = None, False  # the session gives its connection back: the next is measured too
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
    on = watch.telemetry
    if on is not None:
        _tell(outcome, on.ended, watch, outcome, code, cause)


def savepoint(watch: Watch, released: bool) -> None:
    on = watch.telemetry
    if on is not None:
        _tell("savepoint", on.savepoint, watch, released)


def closed(tx: _Transaction) -> None:
    """The owner's scope of a watched transaction closed: its span ends, whatever happened to the telemetry."""
    watch = tx.watch
    tx.watch = None
    if watch is not None and watch.telemetry is not None:
        _tell("close", watch.telemetry.close, watch)


def retry(
    name: str, attempt: int, retries: int, delay: float, error: BaseException, unit: str, duration_ms: float
) -> None:
    """``@transactional`` runs *name* again after *error*: retry number *attempt* of *retries*.

    *unit* is the transaction's name, as the other records give it, and
    *duration_ms* how long the failed attempt ran.
    """
    code = error_code(error)
    described = describe(error, code)
    log.warning(
        "uow: %s failed with %s; retry %d of %d in %.3f s",
        name,
        described,
        attempt,
        retries,
        delay,
        extra={
            "uow_unit": unit,
            "uow_event": "retry",
            "uow_attempt": attempt + 1,
            "uow_error": described,
            "uow_duration_ms": round(duration_ms, 3),
        },
    )
    on = telemetry
    if on is not None:
        _tell("retry", on.retry, name, attempt, error, code)


def waited(watch: Watch, seconds: float) -> None:
    """A watched transaction took *seconds* to get its connection."""
    on = watch.telemetry
    if on is not None:
        _tell("connection", on.waited, watch, seconds)


def event(watch: Watch | None, name: str, **attributes: Any) -> None:
    """An event of a transaction's span (a hook that failed, an ownership violation), while OpenTelemetry is on."""
    on = watch.telemetry if watch is not None and watch.telemetry is not None else telemetry
    if on is not None:
        _tell(name, on.event, watch, name, attributes)


def inject(headers: Mapping[str, str]) -> Mapping[str, str]:
    """An outbox message's headers, with the current trace context while OpenTelemetry is on."""
    on = telemetry
    if on is None:
        return headers
    try:
        return on.inject(headers)
    except Exception:
        _failed("publish")
        return headers


def sending(system: str, topic: str, message_id: str, headers: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """A relay sends a message: its producer span (None when off) and the headers to send it with."""
    on = telemetry
    if on is None:
        return None, headers
    try:
        return on.sending(system, topic, message_id, headers)
    except Exception:
        _failed("send")
        return None, headers


def sent(span: Any, error: BaseException | None) -> None:
    """The broker answered for the message of *span*: None once it took it, or its refusal."""
    on = telemetry
    if on is not None and span is not None:
        _tell("send", on.sent, span, error)


def relayed(system: str, topic: str, result: str, lag: float | None) -> None:
    """A relay's record of a message: ``published``, ``refused`` or ``dead``; *lag* from its commit, if published."""
    on = telemetry
    if on is not None:
        _tell("relay", on.relayed, system, topic, result, lag)


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
    """*error* as a log record shows it: its class and code; for an error of the application, its message's first line.

    A database error's message is left out: drivers put the values that a
    statement refused in it (MySQL's "Duplicate entry 'alice@example.com'"),
    and SQLAlchemy the statement and its parameters on the lines after.
    """
    name = f"{type(error).__name__} ({code})" if code else type(error).__name__
    if isinstance(error, sa_exc.StatementError) or code is not None:
        driver = getattr(error, "orig", None)
        return f"{name} from {type(driver).__qualname__}" if driver is not None else name
    lines = str(error).strip().splitlines()
    return f"{name}: {lines[0][:200]}" if lines else name
