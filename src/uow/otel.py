"""OpenTelemetry for uow: a span for each transaction, its events, and metrics. Needs the ``otel`` extra.

Switch it on with one call, ``UowInstrumentor().instrument()``, or let
``opentelemetry-instrument`` do it: uow registers the instrumentor under
the ``opentelemetry_instrumentor`` entry point, as the instrumentations of
OpenTelemetry's contrib repository do. ``uninstrument()`` switches it off.

Each owner's transaction gets a span, named after the unit of work class
and, for a ``@transactional`` call that owns it, the service function. The
span is current while the transaction runs, so the statement spans of
``opentelemetry-instrumentation-sqlalchemy`` nest under it, and so does the
transaction span under the request or message span around it. See the
Observability page of the documentation for the span's attributes and
events, and the metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
        BaseInstrumentor,
    )
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as missing:  # pragma: no cover - runs in a test's interpreter without OpenTelemetry
    msg = f"uow.otel needs OpenTelemetry's API and instrumentation base: pip install 'uow[otel]' ({missing})"
    raise ImportError(msg) from missing
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from . import _observe
from ._memory import InMemorySession
from ._observe import COMMITTED, ROLLED_BACK, Watch

if TYPE_CHECKING:
    from ._machine import _UnitOfWorkCore
    from ._scope import _Transaction

__all__ = ["UowInstrumentor"]

#: How an outbox message carries its trace: W3C ``traceparent`` and ``tracestate`` only. The global
#: propagator would add the request's baggage, which has no business in a stored message.
_TRACE_CONTEXT = TraceContextTextMapPropagator()

#: Where a watched transaction's session keeps its watch, for the flush listener.
_WATCH_KEY = "uow.watch"

#: The metrics uow records, by name: see the Observability page.
DURATION = "uow.transaction.duration"
COMMITS = "uow.transaction.commits"
ROLLBACKS = "uow.transaction.rollbacks"
RETRIES = "uow.transaction.retries"
ACTIVE = "uow.transaction.active"
WAIT_TIME = "db.client.connection.wait_time"
RELAYED = "uow.relay.messages"
LAG = "uow.relay.lag"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("uow")
    except Exception:  # pragma: no cover - run from a checkout that is not installed
        return "0"


class _Telemetry:
    """What uow records through OpenTelemetry's API while the instrumentor is on."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        version = _version()
        self.tracer = trace.get_tracer("uow", version, tracer_provider)
        meter = metrics.get_meter("uow", version, meter_provider)
        self.duration = meter.create_histogram(
            DURATION, unit="s", description="How long owner transactions ran, from their begin to their close"
        )
        self.commits = meter.create_counter(COMMITS, unit="{commit}", description="Real commits")
        self.rollbacks = meter.create_counter(ROLLBACKS, unit="{rollback}", description="Real rollbacks")
        self.retries = meter.create_counter(RETRIES, unit="{retry}", description="Attempts run again by @transactional")
        # Counted here and read by the SDK when it collects: two records per transaction saved.
        self._active: dict[str, int] = {}
        self._active_lock = threading.Lock()
        meter.create_observable_up_down_counter(
            ACTIVE,
            callbacks=[self._observe_active],
            unit="{transaction}",
            description="Units of work with an owner's transaction open",
        )
        self.relayed_messages = meter.create_counter(
            RELAYED, unit="{message}", description="Messages a relay sent (published), or that a broker refused"
        )
        self.lag = meter.create_histogram(
            LAG, unit="s", description="From the commit that published a message to the relay's record of its send"
        )
        self.wait_time = meter.create_histogram(
            WAIT_TIME, unit="s", description="The time it took to obtain a connection for a transaction"
        )

    def begin(self, unit: _UnitOfWorkCore, tx: _Transaction, watch: Watch) -> None:
        kind = type(unit).__name__
        attributes: dict[str, Any] = {
            "uow.unit_of_work": kind,
            "uow.propagation": watch.propagation,
            "uow.read_only": watch.read_only,
            "uow.attempt": watch.attempt,
        }
        function = getattr(tx, "function", None)
        if function is not None:
            attributes["code.function.name"] = function
        if watch.isolation_level is not None:
            attributes["uow.isolation_level"] = watch.isolation_level
        span = self.tracer.start_span(watch.name, kind=SpanKind.INTERNAL, attributes=attributes)
        watch.span = span
        watch.token = otel_context.attach(trace.set_span_in_context(span))
        with self._active_lock:
            self._active[kind] = self._active.get(kind, 0) + 1
        session = _sync_session(tx.session)
        if session is not None:
            session.info[_WATCH_KEY] = watch
            watch.session = session
        elif isinstance(tx.session, InMemorySession):
            tx.session.flushed_counts = watch.flushed

    def ended(self, watch: Watch, outcome: str, code: str | None, error: BaseException | None) -> None:
        attributes: dict[str, Any] = {"uow.unit_of_work": watch.kind, "uow.outcome": outcome}
        if code is not None:
            attributes["db.response.status_code"] = code
        if error is not None:
            attributes["error.type"] = type(error).__qualname__
        if outcome == COMMITTED:
            self.commits.add(1, attributes)
            watch.span.add_event("uow.commit")
        else:
            self.rollbacks.add(1, attributes)
            watch.span.add_event("uow.rollback", attributes)

    def savepoint(self, watch: Watch, released: bool) -> None:
        watch.span.add_event("uow.savepoint.release" if released else "uow.savepoint.rollback")

    def close(self, watch: Watch) -> None:
        span = watch.span
        outcome = watch.outcome or ROLLED_BACK
        attributes: dict[str, Any] = {"uow.outcome": outcome, "uow.savepoints": watch.savepoints}
        for model, count in sorted(watch.flushed.items()):
            attributes[f"uow.flushed.{model}"] = count
        span.set_attributes(attributes)
        if outcome != COMMITTED and watch.error is not None:
            span.set_status(Status(StatusCode.ERROR, watch.error))
        session = watch.session
        if session is not None:
            session.info.pop(_WATCH_KEY, None)
        kind = watch.kind
        self.duration.record(time.perf_counter() - watch.started, {"uow.unit_of_work": kind, "uow.outcome": outcome})
        with self._active_lock:
            self._active[kind] -= 1
        try:
            otel_context.detach(watch.token)
        finally:
            span.end()

    def retry(self, name: str, attempt: int, error: BaseException, code: str | None) -> None:
        attributes: dict[str, Any] = {"uow.attempt": attempt, "error.type": type(error).__qualname__}
        if code is not None:
            attributes["db.response.status_code"] = code
        trace.get_current_span().add_event("uow.retry", {"code.function.name": name, **attributes})
        self.retries.add(1, {"code.function.name": name, **attributes})

    def event(self, watch: Watch | None, name: str, attributes: dict[str, Any]) -> None:
        span = watch.span if watch is not None and watch.span is not None else trace.get_current_span()
        span.add_event(name, attributes)

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._active_lock:
            counts = list(self._active.items())
        return [Observation(count, {"uow.unit_of_work": kind}) for kind, count in counts]

    def waited(self, watch: Watch, seconds: float) -> None:
        self.wait_time.record(seconds, {"uow.unit_of_work": watch.kind})

    def inject(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """An outbox message's headers with the current trace context (W3C ``traceparent``), unless they have one."""
        if "traceparent" in headers:
            return headers
        carrier = dict(headers)
        _TRACE_CONTEXT.inject(carrier)
        return carrier

    def sending(self, system: str, topic: str, message_id: str, headers: dict[str, str]) -> tuple[Any, dict[str, str]]:
        """A relay sends a message: a producer span in the trace of the transaction that published it.

        Returns the span and the headers to send, whose trace context is the span's, for the consumer.
        """
        span = self.tracer.start_span(
            f"send {topic}",
            context=_TRACE_CONTEXT.extract(headers),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": topic,
                "messaging.message.id": message_id,
            },
        )
        carrier = {name: value for name, value in headers.items() if name not in ("traceparent", "tracestate")}
        _TRACE_CONTEXT.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier

    def relayed(self, system: str, topic: str, result: str, lag: float | None) -> None:
        attributes = {"messaging.system": system, "messaging.destination.name": topic}
        self.relayed_messages.add(1, {**attributes, "uow.relay.result": result})
        if lag is not None:
            self.lag.record(lag, attributes)

    def sent(self, span: Any, error: BaseException | None) -> None:
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
        span.end()


def _sync_session(session: object) -> Session | None:
    """The ORM session whose flushes are counted: the session, or an AsyncSession's sync one."""
    if isinstance(session, Session):
        return session
    sync = getattr(session, "sync_session", None)
    return sync if isinstance(sync, Session) else None


def _after_flush(session: Session, flush_context: object) -> None:
    """Count the objects a flush of a watched session wrote, per mapped class: its new, changed and deleted ones."""
    watch = session.info.get(_WATCH_KEY)
    if watch is None:
        return
    counts = watch.flushed
    for obj in (*session.new, *session.deleted):
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    for obj in session.dirty:
        if session.is_modified(obj, include_collections=False):  # an UPDATE of its row, as the fake counts
            name = type(obj).__name__
            counts[name] = counts.get(name, 0) + 1


def _needs_connection(session: Session) -> None:
    """A watched session is about to flush or run a statement: if it has no connection yet, the wait starts now."""
    watch = session.info.get(_WATCH_KEY)
    if watch is not None and watch.asked is None and not watch.connected:
        watch.asked = time.perf_counter()


def _before_flush(session: Session, flush_context: object, instances: object) -> None:
    _needs_connection(session)


def _do_orm_execute(state: ORMExecuteState) -> None:
    _needs_connection(state.session)


def _after_begin(session: Session, transaction: object, connection: object) -> None:
    """A watched session got its connection: the time since it asked is the wait for it."""
    watch = session.info.get(_WATCH_KEY)
    if watch is None or watch.connected:
        return
    watch.connected = True
    if watch.asked is not None:
        _observe.waited(watch, time.perf_counter() - watch.asked)


#: The session events uow listens to while instrumented: flushed objects, and the wait for a connection.
_LISTENERS: tuple[tuple[str, Any], ...] = (
    ("after_flush", _after_flush),
    ("before_flush", _before_flush),
    ("do_orm_execute", _do_orm_execute),
    ("after_begin", _after_begin),
)


class UowInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Switch uow's OpenTelemetry spans and metrics on: ``UowInstrumentor().instrument()``.

    ``instrument()`` takes the usual ``tracer_provider=`` and
    ``meter_provider=`` (the global ones by default).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        _observe.telemetry = _Telemetry(kwargs.get("tracer_provider"), kwargs.get("meter_provider"))
        for name, listener in _LISTENERS:
            if not event.contains(Session, name, listener):
                event.listen(Session, name, listener)

    def _uninstrument(self, **kwargs: Any) -> None:
        _observe.telemetry = None
        for name, listener in _LISTENERS:
            if event.contains(Session, name, listener):
                event.remove(Session, name, listener)
