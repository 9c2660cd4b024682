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

#: The code between a ``with`` statement and the unit of work it enters: contextlib's context managers and
#: exit stacks, and the ``__enter__`` methods of context managers that enter a unit of work in turn (or of
#: a unit of work class that overrides it).
_CONTEXTLIB = contextlib.__dict__
_ENTER_NAMES = frozenset({"__enter__", "__aenter__"})

#: The modules whose code runs a generator as a context manager, so that its caller is inside the block
#: the generator has open while it is paused: contextlib's decorators, and pytest's fixtures.
_CONTEXT_RUNNERS = frozenset({"contextlib", "_pytest.fixtures", "pytest_asyncio.plugin"})


def holder_of(frame: FrameType) -> FrameType | None:
    """The generator that holds a block entered from *frame*, if it can pause with its caller outside the block.

    Called when *frame* runs a generator, or is contextlib's or an
    ``__enter__`` method (the test is written out where a scope is planned).

    From *frame* outwards, it skips the code between the ``with`` statement
    and the unit of work (contextlib, ``__enter__`` methods),
    and generators run as context managers (by contextlib or pytest), whose
    callers are inside their blocks. The first frame left is the one whose
    code the block belongs to: a generator's, or None for plain code, which
    cannot pause with the block open.
    """
    current: FrameType | None = frame
    while current is not None:
        code = current.f_code
        if current.f_globals is _CONTEXTLIB or code.co_name in _ENTER_NAMES:
            current = current.f_back
            continue
        if code.co_flags & _GENERATOR_FLAGS:
            driver = current.f_back
            if driver is not None and driver.f_globals.get("__name__") in _CONTEXT_RUNNERS:
                current = driver
                continue
            return current
        return None
    return None


def on_this_stack(frames: list[FrameType]) -> FrameType | None:
    """The first of *frames* that the code running now was called from, if any."""
    current: FrameType | None = sys._getframe(2)
    while current is not None:
        for frame in frames:
            if frame is current:
                return frame
        current = current.f_back
    return None


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


def active_here(kind: Any = None) -> _UnitOfWorkCore | None:
    """The innermost unit of work active in this thread or task (of *kind*, if given), if any.

    Blocks of several units of work can be open at once (an audit block inside
    an orders block): the transactions started in this context form a chain,
    innermost first.
    """
    tx = _current.get()
    while tx is not None:
        unit = tx.unit
        if tx.open and unit._scopes and unit._owner == unit._here() and (kind is None or isinstance(unit, kind)):
            return unit
        tx = tx.parent
    return None


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
    narrows the type: ``current(AllocationUnitOfWork)``, the innermost active
    one of that kind. Raises :class:`~uow.errors.InactiveUnitOfWorkError`
    when none is active here, or none of the active ones is a *kind*. A unit of work entered by another
    thread or task (whose context this one copied) is not returned.
    """
    unit = active_here(kind)
    if unit is not None:
        return unit
    innermost = active_here()
    if innermost is None:
        msg = (
            "no unit of work is active in this thread or task: call this code inside `with uow:` "
            "(or a @transactional function), or pass the unit of work to it"
        )
        raise InactiveUnitOfWorkError(msg)
    msg = f"the active unit of work is a {type(innermost).__name__}, not a {kind.__name__}, and no other active one is"
    raise InactiveUnitOfWorkError(msg)
