"""Who runs the code: the thread, the asyncio task and the frame that a unit of work belongs to.

A unit of work belongs to the thread (and asyncio task) that entered its
outermost block; the transaction active in a context is kept in a
``ContextVar``, which :func:`current` reads. Each block also remembers the
frame whose ``with`` statement entered it, so that a block left by a
suspended generator, or left in a different order than it was entered, is
recognised rather than mistaken for the innermost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .errors import InactiveUnitOfWorkError

if TYPE_CHECKING:
    from ._async_unit_of_work import AsyncUnitOfWork
    from ._machine import _UnitOfWorkCore
    from ._scope import _Transaction
    from ._unit_of_work import UnitOfWork

__all__ = ["current"]

#: The transaction active in this context, if any: set by an owner's block, copied into the tasks and
#: threads that copy the context.
_current: ContextVar[_Transaction | None] = ContextVar("uow_current", default=None)

_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR

#: The frames that run a generator as a context manager: its body is inside the generator's block
#: while the generator is suspended, as in ``@contextlib.contextmanager``.
_CONTEXT_MANAGER_CODES = frozenset(
    {
        contextlib._GeneratorContextManager.__enter__.__code__,
        contextlib._AsyncGeneratorContextManager.__aenter__.__code__,
    }
)


def in_generator(frame: FrameType) -> bool:
    """Whether *frame* is a generator's that can be suspended with a block open, its caller outside it.

    A generator that ``contextlib.contextmanager`` runs is not one: the body
    of its ``with`` statement is inside the generator's block.
    """
    if not frame.f_code.co_flags & _GENERATOR_FLAGS:
        return False
    driver = frame.f_back
    return driver is None or driver.f_code not in _CONTEXT_MANAGER_CODES


def is_generator_frame(frame: FrameType) -> bool:
    """Whether *frame* runs a generator or an async generator."""
    return bool(frame.f_code.co_flags & _GENERATOR_FLAGS)


def where(frame: FrameType | None) -> str:
    """Name the code of *frame* for a message: its function, file and line."""
    if frame is None:
        return "code that did not use a `with` statement"
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    return f"{name}() at {code.co_filename}:{frame.f_lineno}"


def thread_and_task(
    _loop: Callable[[], object] = asyncio._get_running_loop,
    _thread: Callable[[], int] = threading.get_ident,
    _task: Callable[[], object] = asyncio.current_task,
) -> object:
    """Where sync code runs: its thread, and its asyncio task if it runs in one."""
    if _loop() is None:
        return _thread()
    return (_thread(), _task())


def current_task() -> object:
    """Where async code runs: its asyncio task."""
    return asyncio.current_task() if asyncio._get_running_loop() is not None else None


def describe(owner: object) -> str:
    if isinstance(owner, tuple):
        return f"{describe(owner[1])} of thread {owner[0]}"
    if isinstance(owner, int):
        return f"thread {owner}"
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_name()!r}"
    return "code outside any task"


_release_waiter: Any = getattr(asyncio.tasks, "_release_waiter", None)


def waits_for(owner: object, here: object) -> bool:
    """Whether task *owner* is blocked in ``asyncio.wait_for()`` on task *here*.

    Before Python 3.12, ``wait_for()`` runs its awaitable in a new task while
    the caller waits: that task works on the caller's behalf, and may use its
    unit of work. It is recognised by the callback that ``wait_for()`` gave
    it, which releases the future the caller waits on; those versions of
    asyncio no longer change. From 3.12 on, ``wait_for()`` runs the awaitable
    in the caller's own task.
    """
    if sys.version_info >= (3, 12) or not (isinstance(owner, asyncio.Task) and isinstance(here, asyncio.Task)):
        return False
    waiter = getattr(owner, "_fut_waiter", None)
    if waiter is None:
        return False
    for callback, _context in getattr(here, "_callbacks", None) or ():
        if (
            isinstance(callback, functools.partial)
            and callback.func is _release_waiter
            and callback.args
            and callback.args[0] is waiter
        ):
            return True
    return False


def context_transaction() -> _Transaction | None:
    """The open transaction active in this context, even one that a parent task or thread started."""
    tx = _current.get()
    return tx if tx is not None and tx.open else None


def active_here() -> _UnitOfWorkCore | None:
    """The unit of work active in this thread or task, if any."""
    tx = _current.get()
    if tx is None:
        return None
    unit = tx.unit
    if not unit._scopes or unit._owner != unit._here():
        return None
    return unit


Any_U = TypeVar("Any_U")


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
    unit = active_here()
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
