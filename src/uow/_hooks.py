"""``on_commit`` hooks and domain events: what runs, or is collected, after a real commit.

Hooks belong to a transaction: they run after its owner's real commit, in
order, and are dropped when it rolls back, or with a savepoint that rolls
back. Domain events are read from the ``events`` lists of the aggregates the
transaction's repositories saw: moved to the unit of work's queue after the
commit, cleared after a rollback, cut back to a savepoint's start when the
savepoint rolls back.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .errors import ConfigurationError, _shown

if TYPE_CHECKING:
    from ._scope import _Transaction

log = logging.getLogger("uow")


def check_hook(callback: object, *, sync: bool) -> None:
    """Refuse what cannot be an ``on_commit`` hook of a sync (*sync*) or async unit of work."""
    if not callable(callback):
        msg = f"on_commit() takes a callable with no arguments, not {_shown(callback)}"
        raise ConfigurationError(msg)
    kind: type[object] = type(callback)
    if sync and kind in (types.FunctionType, types.MethodType) and inspect.iscoroutinefunction(callback):
        msg = f"{_shown(callback)} is a coroutine function; a sync unit of work runs sync hooks only"
        raise ConfigurationError(msg)


def run_hooks(hooks: list[tuple[Callable[[], object], bool]]) -> None:
    """Run and drain *hooks* in order; a hook's new hooks run in the same pass."""
    while hooks:
        callback, robust = hooks.pop(0)
        try:
            result = callback()
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                msg = f"on_commit hook {_shown(callback)} returned an awaitable; a sync unit of work cannot await it"
                raise ConfigurationError(msg)
        except Exception:
            if not robust:
                hooks.clear()
                raise
            log.exception("uow: on_commit hook %r failed", callback)


async def run_hooks_async(hooks: list[tuple[Callable[[], object], bool]]) -> None:
    """The async twin of :func:`run_hooks`: what a hook returns is awaited."""
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


def collect_events(tx: _Transaction, queue: deque[object]) -> None:
    """After *tx* committed: move the events of the objects its repositories saw into *queue*.

    ``_UnitOfWorkCore._committed`` runs a copy of this loop, written out on the path of every commit.
    """
    for repo in tx.repositories.values():
        for obj in repo._seen.values():
            events = getattr(obj, "events", None)
            if events:
                queue.extend(events)
                events.clear()


def clear_events(tx: _Transaction) -> None:
    """After *tx* rolled back: drop the events of the objects its repositories saw."""
    for repo in tx.repositories.values():
        for obj in repo._seen.values():
            events = getattr(obj, "events", None)
            if events:
                events.clear()


def event_marks(tx: _Transaction) -> dict[int, int]:
    """How many domain events each object seen in *tx* holds now: taken when a savepoint begins."""
    marks: dict[int, int] = {}
    for repo in tx.repositories.values():
        for key, obj in repo._seen.items():
            events = getattr(obj, "events", None)
            if isinstance(events, list):
                marks[key] = len(events)
    return marks


def drop_events_since(tx: _Transaction, marks: Mapping[int, int]) -> None:
    """Drop the events raised since *marks* were taken: their work was rolled back."""
    for repo in tx.repositories.values():
        for key, obj in repo._seen.items():
            events = getattr(obj, "events", None)
            if isinstance(events, list):
                del events[marks.get(key, 0) :]
