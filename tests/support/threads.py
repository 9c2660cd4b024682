"""Helpers for tests that run units of work at once: threads and tasks, retries, database errors, pools.

Every wait has a timeout, a hang guard that is never asserted: :data:`TIMEOUT`,
unless the test passes a timeout of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine

from uow import errors

#: How long a thread or a task may wait before the test gives up on it, unless the test says otherwise.
TIMEOUT = 60.0


def thread_failures(count: int, target: Callable[[int], None], *, timeout: float = TIMEOUT) -> dict[int, BaseException]:
    """Run *target(n)* in *count* threads, wait for them all, and return what each one raised, in the order raised."""
    failures: dict[int, BaseException] = {}

    def run(n: int) -> None:
        try:
            target(n)
        except BaseException as error:  # the test thread judges every failure
            failures[n] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert [] == [thread.name for thread in threads if thread.is_alive()]
    return failures


def run_threads(count: int, target: Callable[[int], None], *, timeout: float = TIMEOUT) -> None:
    """Run *target(n)* in *count* threads; re-raise the first failure of any of them."""
    failures = list(thread_failures(count, target, timeout=timeout).values())
    if failures:
        raise failures[0]


class TaskBarrier:
    """Makes *parties* tasks wait for each other once (``asyncio.Barrier`` needs Python 3.11)."""

    def __init__(self, parties: int, *, timeout: float = TIMEOUT) -> None:
        self._waiting = parties
        self._timeout = timeout
        self._all_here = asyncio.Event()

    async def wait(self) -> None:
        self._waiting -= 1
        if not self._waiting:
            self._all_here.set()
        await asyncio.wait_for(self._all_here.wait(), self._timeout)


def counting(retried: list[BaseException]) -> Callable[[BaseException], bool]:
    """The default retry predicate, recording in *retried* each error it lets retry."""

    def retry_if(error: BaseException) -> bool:
        if errors.is_retryable(error):
            retried.append(error)
            return True
        return False

    return retry_if


def database_errors(eng: Engine) -> list[BaseException]:
    """Every error *eng* reports from now on, as the driver raised it, in order."""
    seen: list[BaseException] = []

    @event.listens_for(eng, "handle_error")
    def record(context: Any) -> None:
        seen.append(context.original_exception)

    return seen


def checked_out(eng: AsyncEngine | Engine) -> int:
    """How many connections of *eng* are out of its pool."""
    sync = eng.sync_engine if isinstance(eng, AsyncEngine) else eng
    return int(sync.pool.checkedout())  # type: ignore[attr-defined]
