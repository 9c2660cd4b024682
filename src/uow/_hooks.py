"""Lifecycle hooks and domain events: what runs, or is collected, around a real commit or rollback.

Hooks belong to a transaction, in one list in registration order, each
tagged with its kind:

* ``before_commit`` hooks run inside the transaction when its owner commits,
  before the flush; one that raises vetoes the commit, which rolls back;
* ``on_commit`` hooks run after the real commit;
* ``on_rollback`` hooks run after a real rollback, a failed commit included,
  when the database is known not to have committed;
* ``after_completion`` hooks run once the transaction ended either way, with
  its status: ``"committed"``, ``"rolled_back"`` or ``"unknown"`` (the
  COMMIT failed in a way that may still have reached the database).

A savepoint that rolls back drops the hooks registered inside it, of every
kind; a released one keeps them for the transaction. Domain events are read
from the ``events`` lists of the aggregates the transaction's repositories
saw: moved to the unit of work's queue after the commit, cleared after a
rollback, cut back to a savepoint's start when the savepoint rolls back.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

from . import _observe
from ._observe import COMMITTED, ROLLED_BACK, UNKNOWN
from .errors import ConfigurationError, _shown

if TYPE_CHECKING:
    from ._scope import _Hook, _Transaction

log = logging.getLogger("uow")

#: How a transaction ended, as an ``after_completion`` hook is told: COMMITTED, ROLLED_BACK or UNKNOWN.
Completion = Literal["committed", "rolled_back", "unknown"]

#: The kinds of hooks, named after the methods that register them.
BEFORE_COMMIT = "before_commit"
ON_COMMIT = "on_commit"
ON_ROLLBACK = "on_rollback"
AFTER_COMPLETION = "after_completion"


#: The hooks that a hook may register while the hooks of a transaction's end run: those of the same pass.
_LATE: dict[str, tuple[str, ...]] = {
    COMMITTED: (ON_COMMIT, AFTER_COMPLETION),
    ROLLED_BACK: (ON_ROLLBACK, AFTER_COMPLETION),
    UNKNOWN: (AFTER_COMPLETION,),
}


def check_late(kind: str, status: str) -> None:
    """Refuse a hook of *kind* registered by a hook of a transaction that ended with *status*.

    Such a hook runs in the same pass if the pass runs its kind; any other
    would belong to no transaction: the one that ended has no more steps,
    and the next has not begun.
    """
    if kind not in _LATE[status]:
        msg = (
            f"{kind}() was called by a hook of a transaction that has {status.replace('_', ' ')}: only "
            f"{' and '.join(f'{late}()' for late in _LATE[status])} can still run in this pass. To act in a new "
            "transaction, enter the unit of work in the hook (`with uow:`) and register hooks there"
        )
        raise ConfigurationError(msg)


def check_hook(callback: object, kind: str, *, sync: bool) -> None:
    """Refuse what cannot be a hook of *kind* of a sync (*sync*) or async unit of work."""
    if not callable(callback):
        takes = "a callable that takes the status" if kind == AFTER_COMPLETION else "a callable with no arguments"
        msg = f"{kind}() takes {takes}, not {_shown(callback)}"
        raise ConfigurationError(msg)
    kind_of_callable: type[object] = type(callback)
    if sync and kind_of_callable in (types.FunctionType, types.MethodType) and inspect.iscoroutinefunction(callback):
        msg = f"{_shown(callback)} is a coroutine function; a sync unit of work runs sync hooks only"
        raise ConfigurationError(msg)


def _refuse_awaitable(result: object, callback: Callable[..., object], kind: str) -> None:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        msg = f"{kind} hook {_shown(callback)} returned an awaitable; a sync unit of work cannot await it"
        raise ConfigurationError(msg)


def _next(hooks: list[_Hook], kind: str) -> tuple[Callable[..., object], bool] | None:
    """Take the first hook of *kind* out of *hooks*: the order of registration, hooks added meanwhile included."""
    for index, (when, callback, robust) in enumerate(hooks):
        if when == kind:
            del hooks[index]
            return callback, robust
    return None


def _drop(hooks: list[_Hook], kind: str) -> None:
    hooks[:] = [hook for hook in hooks if hook[0] != kind]


def _failed(kind: str, callback: Callable[..., object], error: BaseException, *, logged: bool = True) -> None:
    """A hook of *kind* raised *error*: log it (unless it propagates), and tell the transaction's span."""
    if logged:
        log.exception("uow: %s hook %r failed", kind, callback, extra={"uow_hook": kind})
    _observe.event(
        None,
        "uow.hook.failed",
        **{
            "uow.hook": kind,
            "code.function.name": getattr(callback, "__qualname__", type(callback).__qualname__),
            "error.type": type(error).__qualname__,
        },
    )


def run_before_commit(hooks: list[_Hook]) -> None:
    """Run the ``before_commit`` hooks of *hooks*; the first that raises stops them, and its error vetoes."""
    while (found := _next(hooks, BEFORE_COMMIT)) is not None:
        callback = found[0]
        _refuse_awaitable(callback(), callback, BEFORE_COMMIT)


async def run_before_commit_async(hooks: list[_Hook]) -> None:
    """The async twin of :func:`run_before_commit`: what a hook returns is awaited."""
    while (found := _next(hooks, BEFORE_COMMIT)) is not None:
        result = found[0]()
        if inspect.isawaitable(result):
            await result


def committed(hooks: list[_Hook]) -> None:
    """The transaction committed: drop its ``on_rollback`` hooks; the others run next."""
    _drop(hooks, ON_ROLLBACK)


def rolled_back(hooks: list[_Hook]) -> None:
    """The transaction rolled back: keep its ``on_rollback`` and ``after_completion`` hooks, which run next."""
    hooks[:] = [hook for hook in hooks if hook[0] == ON_ROLLBACK or hook[0] == AFTER_COMPLETION]


def run_hooks(hooks: list[_Hook], status: Completion) -> None:
    """Run the hooks of a transaction that ended with *status*, and drain them.

    After a commit: the ``on_commit`` hooks, then the ``after_completion``
    ones. After a rollback: the ``on_rollback`` hooks (not when the status is
    unknown: the work may have been committed), then the ``after_completion``
    ones. A hook registered by a hook of this pass runs in it too. An
    ``on_commit`` hook that raises, unless robust, drops the ``on_commit``
    hooks after it, and its error is raised once the ``after_completion``
    hooks have run; any other failure is logged.
    """
    failure: Exception | None = None
    first = ON_COMMIT if status == COMMITTED else ON_ROLLBACK
    while (found := _next(hooks, first)) is not None:
        callback, robust = found
        if status == UNKNOWN:
            continue  # the work may be committed: no compensation runs
        try:
            _refuse_awaitable(callback(), callback, first)
        except Exception as error:
            if first == ON_COMMIT and not robust:
                _drop(hooks, ON_COMMIT)
                failure = error
                _failed(first, callback, error, logged=False)  # raised from commit() instead
            else:
                _failed(first, callback, error)
    while (found := _next(hooks, AFTER_COMPLETION)) is not None:
        callback = found[0]
        try:
            _refuse_awaitable(callback(status), callback, AFTER_COMPLETION)
        except Exception as error:
            _failed(AFTER_COMPLETION, callback, error)
    if failure is not None:
        raise failure


async def run_hooks_async(hooks: list[_Hook], status: Completion) -> None:
    """The async twin of :func:`run_hooks`: what a hook returns is awaited."""
    failure: Exception | None = None
    first = ON_COMMIT if status == COMMITTED else ON_ROLLBACK
    while (found := _next(hooks, first)) is not None:
        callback, robust = found
        if status == UNKNOWN:
            continue
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            if first == ON_COMMIT and not robust:
                _drop(hooks, ON_COMMIT)
                failure = error
                _failed(first, callback, error, logged=False)  # raised from commit() instead
            else:
                _failed(first, callback, error)
    while (found := _next(hooks, AFTER_COMPLETION)) is not None:
        callback = found[0]
        try:
            result = callback(status)
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            _failed(AFTER_COMPLETION, callback, error)
    if failure is not None:
        raise failure


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
