"""OpenTelemetry spans, events and metrics of transactions, and the structured log records, on the fakes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode
from sqlalchemy.exc import IntegrityError, OperationalError

import uow
from tests.support.models import Sku
from tests.support.otel import Recorded, events
from tests.support.uows import AsyncFakeShopUnitOfWork, FakeShopUnitOfWork, ShopUnitOfWork
from uow import errors

UNIT = "FakeShopUnitOfWork"
ROOT = Path(__file__).resolve().parents[2]


class Boom(Exception):
    """Raised by the services of these tests."""


class SerializationFailure(Exception):
    """A driver's error with the SQLSTATE of a serialization failure, as psycopg raises it."""

    sqlstate = "40001"


def serialization_failure() -> OperationalError:
    return OperationalError("UPDATE skus", {}, SerializationFailure("could not serialize access"))


def test_a_committed_transaction_is_one_span_with_its_attributes(otel: Recorded) -> None:
    """A block that commits: one span named after the unit of work, with its options, outcome and a commit event."""
    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add(Sku("a"))
        fake.commit()
    span = otel.span(UNIT)
    assert {
        "uow.unit_of_work": UNIT,
        "uow.propagation": "required",
        "uow.read_only": False,
        "uow.attempt": 1,
        "uow.outcome": "committed",
        "uow.savepoints": 0,
        "uow.flushed.Sku": 1,
    } == dict(span.attributes or {})
    assert ["uow.commit"] == events(span)
    assert StatusCode.UNSET == span.status.status_code
    assert [(UNIT, None)] == otel.tree()


def test_a_rolled_back_transaction_says_why(otel: Recorded) -> None:
    """An exception that leaves the owner: outcome rolled_back, an error status and a rollback event naming it."""
    fake = FakeShopUnitOfWork()
    with pytest.raises(Boom), fake:
        fake.skus.add(Sku("a"))
        raise Boom("out of stock")
    span = otel.span(UNIT)
    assert "rolled_back" == (span.attributes or {})["uow.outcome"]
    assert StatusCode.ERROR == span.status.status_code
    assert "Boom: out of stock" == span.status.description
    [rollback] = span.events
    assert ("uow.rollback", "Boom", "rolled_back") == (
        rollback.name,
        (rollback.attributes or {})["error.type"],
        (rollback.attributes or {})["uow.outcome"],
    )


def test_a_failed_commit_is_its_own_outcome(otel: Recorded) -> None:
    """A commit that raises IntegrityError: outcome failed_commit, and the rollback event names the error."""
    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add(Sku("dup"))
        fake.commit()
    with fake:
        fake.skus.add(Sku("dup"))
        with pytest.raises(IntegrityError):
            fake.commit()
    first, second = otel.spans()
    assert ("committed", "failed_commit") == (
        (first.attributes or {})["uow.outcome"],
        (second.attributes or {})["uow.outcome"],
    )
    assert ["uow.rollback"] == events(second)
    assert "IntegrityError" == (second.events[0].attributes or {})["error.type"]


def test_a_retry_that_succeeds_is_two_spans_and_an_event(otel: Recorded) -> None:
    """@transactional retries: a span per attempt, named after the service, and a retry event on the caller's span."""
    attempts: list[int] = []

    @uow.transactional(factory=FakeShopUnitOfWork, retries=uow.Retry(retries=2, backoff=0))
    def add_sku(code: str, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        attempts.append(1)
        uow.skus.add(Sku(code))
        if len(attempts) == 1:
            raise serialization_failure()

    with otel.tracer_provider.get_tracer("test").start_as_current_span("request"):
        add_sku("a")
    name = f"{UNIT} test_a_retry_that_succeeds_is_two_spans_and_an_event.<locals>.add_sku"
    assert [(name, "request"), (name, "request"), ("request", None)] == otel.tree()
    first, second, request = otel.spans()
    assert (1, "rolled_back") == ((first.attributes or {})["uow.attempt"], (first.attributes or {})["uow.outcome"])
    assert (2, "committed") == ((second.attributes or {})["uow.attempt"], (second.attributes or {})["uow.outcome"])
    assert name.split(" ")[1] == (second.attributes or {})["code.function.name"]
    [retry] = request.events
    assert ("uow.retry", 1, "40001", "OperationalError") == (
        retry.name,
        (retry.attributes or {})["uow.attempt"],
        (retry.attributes or {})["db.response.status_code"],
        (retry.attributes or {})["error.type"],
    )
    assert [
        (
            {
                "code.function.name": name.split(" ")[1],
                "uow.attempt": 1,
                "error.type": "OperationalError",
                "db.response.status_code": "40001",
            },
            1,
        )
    ] == otel.points("uow.transaction.retries")


def test_a_savepoint_rolled_back_inside_a_committed_transaction(otel: Recorded) -> None:
    """A savepoint that rolls back and one released: two savepoint events, then the commit; two savepoints counted."""
    fake = FakeShopUnitOfWork()
    with fake:
        with pytest.raises(Boom), fake.savepoint():
            fake.skus.add(Sku("dropped"))
            raise Boom("inner")
        with fake.savepoint():
            fake.skus.add(Sku("kept"))
        fake.commit()
    span = otel.span(UNIT)
    assert ["uow.savepoint.rollback", "uow.savepoint.release", "uow.commit"] == events(span)
    assert ("committed", 2) == ((span.attributes or {})["uow.outcome"], (span.attributes or {})["uow.savepoints"])


def test_a_joined_scope_that_poisons_makes_the_outcome_rollback_only(otel: Recorded) -> None:
    """A joined scope's swallowed error: the owner's span says rollback_only, and its status names the error."""
    fake = FakeShopUnitOfWork()
    with pytest.raises(errors.RollbackOnlyError), fake:
        fake.skus.add(Sku("a"))
        try:
            with fake:
                raise Boom("inner")
        except Boom:
            pass
    span = otel.span(UNIT)
    assert "rollback_only" == (span.attributes or {})["uow.outcome"]
    assert "Boom: inner" == span.status.description


def test_requires_new_is_a_child_span(otel: Recorded) -> None:
    """A requires_new transaction inside another: its span is a child of the outer one's, with its propagation."""
    fake = FakeShopUnitOfWork()
    with fake:
        with fake.transaction(propagation="requires_new"):
            fake.skus.add(Sku("inner"))
            fake.commit()
        fake.skus.add(Sku("outer"))
        fake.commit()
    assert [(UNIT, UNIT), (UNIT, None)] == otel.tree()
    inner, outer = otel.spans()
    assert ("requires_new", "required") == (
        (inner.attributes or {})["uow.propagation"],
        (outer.attributes or {})["uow.propagation"],
    )


async def test_async_transactions_are_spans_too(otel: Recorded) -> None:
    """An async fake's transaction: one span with its outcome, under the span current in the task."""
    fake = AsyncFakeShopUnitOfWork()
    with otel.tracer_provider.get_tracer("test").start_as_current_span("message"):
        async with fake:
            await fake.skus.add(Sku("a"))
            await fake.commit()
    assert [("AsyncFakeShopUnitOfWork", "message"), ("message", None)] == otel.tree()
    assert "committed" == (otel.spans()[0].attributes or {})["uow.outcome"]


def test_metrics_count_commits_rollbacks_durations_and_active_units(otel: Recorded) -> None:
    """Commits and rollbacks are counted, durations recorded by outcome, and the active gauge goes back to 0."""
    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add(Sku("a"))
        fake.commit()
        assert [({"uow.unit_of_work": UNIT}, 1)] == otel.points("uow.transaction.active")
    with pytest.raises(Boom), fake:
        fake.skus.add(Sku("b"))
        raise Boom("service")
    assert [({"uow.unit_of_work": UNIT, "uow.outcome": "committed"}, 1)] == otel.points("uow.transaction.commits")
    assert [({"uow.unit_of_work": UNIT, "uow.outcome": "rolled_back", "error.type": "Boom"}, 1)] == otel.points(
        "uow.transaction.rollbacks"
    )
    assert sorted([("committed", 1), ("rolled_back", 1)]) == sorted(
        (attributes["uow.outcome"], count) for attributes, count in otel.points("uow.transaction.duration")
    )
    assert [({"uow.unit_of_work": UNIT}, 0)] == otel.points("uow.transaction.active")


def test_hook_failures_and_ownership_violations_are_span_events(otel: Recorded) -> None:
    """A robust hook that raises and a use from another thread: each an event on the transaction's span."""
    import threading

    fake = FakeShopUnitOfWork()

    def broken() -> None:
        raise Boom("mail server down")

    def other_thread() -> None:
        with pytest.raises(errors.OwnershipError):
            fake.skus.list()

    with fake:
        fake.skus.add(Sku("a"))
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        fake.on_commit(broken, robust=True)
        fake.commit()
    span = otel.span(UNIT)
    assert ["uow.ownership_violation", "uow.commit", "uow.hook.failed"] == events(span)
    hook = span.events[2].attributes or {}
    assert ("on_commit", "Boom") == (hook["uow.hook"], hook["error.type"])
    assert "thread" in str((span.events[0].attributes or {})["uow.message"])


def test_nothing_is_recorded_once_switched_off(otel: Recorded) -> None:
    """After uninstrument() a transaction makes no span."""
    from uow.otel import UowInstrumentor

    UowInstrumentor().uninstrument()
    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add(Sku("a"))
        fake.commit()
    assert [] == otel.spans()
    assert trace.INVALID_SPAN is trace.get_current_span()


# -- structured log records -------------------------------------------------------------


def test_log_records_carry_their_fields_in_extra(caplog: pytest.LogCaptureFixture) -> None:
    """begin and commit at DEBUG, a rollback with an error at INFO: each with the unit, event, outcome and duration."""
    fake = FakeShopUnitOfWork()
    with caplog.at_level(logging.DEBUG, logger="uow"):
        with fake:
            fake.skus.add(Sku("a"))
            fake.commit()
        with pytest.raises(Boom), fake:
            fake.skus.add(Sku("b"))
            raise Boom("no stock")
    records = [record for record in caplog.records if hasattr(record, "uow_event")]
    assert [
        ("begin", logging.DEBUG),
        ("commit", logging.DEBUG),
        ("begin", logging.DEBUG),
        ("rollback", logging.INFO),
    ] == [(getattr(record, "uow_event", None), record.levelno) for record in records]
    commit, rollback = records[1], records[3]
    assert (UNIT, "committed") == (commit.uow_unit, commit.uow_outcome)  # type: ignore[attr-defined]
    assert commit.uow_duration_ms >= 0  # type: ignore[attr-defined]
    assert ("rolled_back", "Boom: no stock") == (rollback.uow_outcome, rollback.uow_error)  # type: ignore[attr-defined]
    assert "FakeShopUnitOfWork rolled back after" in rollback.getMessage()


def test_nothing_is_logged_or_measured_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    """With the uow logger at WARNING and no instrumentation, a transaction is not watched at all."""
    fake = FakeShopUnitOfWork()
    with caplog.at_level(logging.WARNING, logger="uow"), fake:
        fake.skus.add(Sku("a"))
        assert fake._scopes[0].tx.watch is None
        fake.commit()
    assert [] == [record for record in caplog.records if hasattr(record, "uow_event")]


def test_a_read_only_block_that_refuses_its_write_says_why(otel: Recorded) -> None:
    """A read-only block left with a pending write: its span has the ReadOnlyError as the rollback's cause."""
    fake = FakeShopUnitOfWork()
    with pytest.raises(errors.ReadOnlyError), fake.transaction(read_only=True):
        fake.skus.add(Sku("a"))
    span = otel.span(UNIT)
    assert ("rolled_back", True) == ((span.attributes or {})["uow.outcome"], (span.attributes or {})["uow.read_only"])
    assert ["uow.rollback"] == events(span)
    assert "ReadOnlyError" == (span.events[0].attributes or {})["error.type"]
    assert 1 == fake.rollbacks


def test_a_telemetry_failure_never_fails_or_locks_the_unit_of_work(otel: Recorded) -> None:
    """A span processor that raises when a span ends: the commit stands, the hooks run, and the unit is free again."""

    class Broken(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            raise ConnectionError("the collector is down")

    otel.tracer_provider.add_span_processor(Broken())
    fake = FakeShopUnitOfWork()
    ran: list[str] = []
    with fake:
        fake.skus.add(Sku("a"))
        fake.after_completion(ran.append)
        fake.commit()
    assert ["committed"] == ran
    with fake:  # not claimed for ever
        assert ["a"] == [sku.code for sku in fake.skus.list()]


def test_switching_off_mid_transaction_still_ends_its_span(otel: Recorded) -> None:
    """uninstrument() while a transaction runs: its span still ends, and no span stays current after the block."""
    from uow.otel import UowInstrumentor

    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add(Sku("a"))
        UowInstrumentor().uninstrument()
        fake.commit()
    assert [UNIT] == [span.name for span in otel.spans()]
    assert trace.INVALID_SPAN is trace.get_current_span()


def test_the_retry_record_names_the_transaction_and_the_attempts_duration(caplog: pytest.LogCaptureFixture) -> None:
    """A retry's record carries the unit of work and service, the next attempt, and how long the failed one ran."""
    attempts: list[int] = []

    @uow.transactional(factory=FakeShopUnitOfWork, retries=uow.Retry(retries=1, backoff=0))
    def add_sku(code: str, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        attempts.append(1)
        uow.skus.add(Sku(code))
        if len(attempts) == 1:
            raise serialization_failure()

    with caplog.at_level(logging.WARNING, logger="uow"):
        add_sku("a")
    [record] = [record for record in caplog.records if getattr(record, "uow_event", None) == "retry"]
    function = "test_the_retry_record_names_the_transaction_and_the_attempts_duration.<locals>.add_sku"
    assert (f"{UNIT} {function}", 2) == (getattr(record, "uow_unit", None), getattr(record, "uow_attempt", None))
    assert getattr(record, "uow_duration_ms", -1) >= 0
    assert "OperationalError (40001) from SerializationFailure" == getattr(record, "uow_error", None)


def test_without_opentelemetry_the_import_says_which_extra(tmp_path: Path) -> None:
    """In an interpreter without OpenTelemetry, uow works and `import uow.otel` names the extra to install."""
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["opentelemetry"] = None\n')
    script = "import uow\ntry:\n    import uow.otel\nexcept ImportError as error:\n    print(error)\n"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    assert "pip install 'uow[otel]'" in done.stdout
