"""The ``@transactional`` decorator: join the caller's unit of work, or own one, and retry."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

import attrs

from ._unit_of_work import (
    AsyncBlock,
    AsyncUnitOfWork,
    Block,
    Propagation,
    UnitOfWork,
    _active_here,
    _BlockBase,
    _check_options,
    _current,
    _current_task,
    _thread_and_task,
    _UnitOfWorkCore,
)
from .errors import ConfigurationError, InactiveUnitOfWorkError, _shown, is_retryable

__all__ = ["NEW_UOW", "Retry", "Transactional", "transactional"]

log = logging.getLogger("uow")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _NewUow:
    """The type of :data:`NEW_UOW`."""

    _instance: _NewUow | None = None

    def __new__(cls) -> _NewUow:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEW_UOW"

    def __reduce__(self) -> str:
        return "NEW_UOW"


NEW_UOW: Any = _NewUow()
"""The default of a ``uow`` parameter, meaning "not given": ``@transactional`` provides one.

It is typed as ``Any``, so that ``uow: MyUnitOfWork = NEW_UOW`` type-checks.
"""


def _at_least_zero(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        msg = f"Retry({attribute.name}=...) takes a number of 0 or more, not {value!r}"
        raise ConfigurationError(msg)


@attrs.frozen
class Retry:
    """How ``@transactional(retries=...)`` retries a unit of work that failed retryably.

    Up to *retries* more attempts, each after a pause that starts at
    *backoff* seconds, doubles each time up to *max_backoff*, and is then
    jittered to a random value between half and all of it. *retry_if*
    decides which exceptions are worth another attempt
    (:func:`uow.errors.is_retryable` by default). *sleep* is called with the
    pause (``time.sleep``, or ``asyncio.sleep`` for an ``async def``); tests
    pass their own.
    """

    retries: int = attrs.field(default=3, validator=_at_least_zero)
    backoff: float = attrs.field(default=0.05, validator=_at_least_zero)
    max_backoff: float = attrs.field(default=2.0, validator=_at_least_zero)
    retry_if: Callable[[BaseException], bool] = is_retryable
    sleep: Callable[[float], object] | None = None

    def delay(self, attempt: int) -> float:
        """The pause before retry number *attempt* (1 for the first retry), with jitter."""
        cap = min(self.max_backoff, self.backoff * 2.0 ** min(attempt - 1, 64))
        return random.uniform(cap / 2, cap)

    def _next(
        self, error: Exception, attempt: int, unit: _UnitOfWorkCore, block: _BlockBase, name: str, commits: int
    ) -> float:
        """The pause before retry number *attempt* after *error*; re-raises *error* if it is not retried.

        Only the owner of the transaction retries; an attempt that committed
        (*commits* was the count before it), or whose commit may have reached
        the database, is never run again; and *retry_if* has the last word.
        """
        if (
            not block.owner
            or attempt > self.retries
            or unit.commits + unit._nested_commits != commits
            or unit._commit_outcome_unknown
            or not self.retry_if(error)
        ):
            raise error
        delay = self.delay(attempt)
        log.warning(
            "uow: %s failed with %s; retry %d of %d in %.3f s",
            name,
            _describe_error(error),
            attempt,
            self.retries,
            delay,
        )
        return delay


_NO_RETRY = Retry(retries=0)
_NOT_SET: Any = object()


def _as_retry(retries: int | Retry) -> Retry:
    if isinstance(retries, Retry):
        return retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        msg = f"retries takes a number of retries (0 or more) or a uow.Retry, not {retries!r}"
        raise ConfigurationError(msg)
    return Retry(retries=retries) if retries else _NO_RETRY


def _describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


@attrs.frozen
class Transactional:
    """The ``transactional`` decorator, with its options; see :data:`transactional`."""

    factory: Callable[[], UnitOfWork | AsyncUnitOfWork] | None = None
    propagation: Propagation = "required"
    read_only: bool | None = None
    isolation_level: str | None = None
    retry: Retry = _NO_RETRY

    @overload
    def __call__(self, func: classmethod[T, P, R], /) -> classmethod[T, P, R]: ...

    @overload
    def __call__(self, func: staticmethod[P, R], /) -> staticmethod[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Callable[P, R]: ...

    @overload
    def __call__(
        self,
        func: None = None,
        /,
        *,
        factory: Callable[[], UnitOfWork | AsyncUnitOfWork] | None = ...,
        propagation: Propagation = ...,
        read_only: bool | None = ...,
        isolation_level: str | None = ...,
        retries: int | Retry = ...,
    ) -> Transactional: ...

    def __call__(
        self,
        func: Any = None,
        /,
        *,
        factory: Any = _NOT_SET,
        propagation: Any = _NOT_SET,
        read_only: Any = _NOT_SET,
        isolation_level: Any = _NOT_SET,
        retries: Any = _NOT_SET,
    ) -> Any:
        if func is None:
            changes = {
                "factory": factory,
                "propagation": propagation,
                "read_only": read_only,
                "isolation_level": isolation_level,
            }
            options = {name: value for name, value in changes.items() if value is not _NOT_SET}
            if retries is not _NOT_SET:
                options["retry"] = _as_retry(retries)
            configured = attrs.evolve(self, **options)
            # Entering a scope validates these too; checking now reports the mistake at import.
            _check_options(configured.propagation, configured.isolation_level)
            if configured.factory is not None and not callable(configured.factory):
                msg = f"factory must be a callable that returns a unit of work, not {_shown(configured.factory)}"
                raise ConfigurationError(msg)
            return configured
        return self._decorate(func)

    def _decorate(self, func: Any) -> Any:
        if isinstance(func, (classmethod, staticmethod)):
            return type(func)(self._decorate(func.__func__))
        if not callable(func):
            msg = f"@transactional decorates a function, not {_shown(func)}"
            raise ConfigurationError(msg)
        name = getattr(func, "__qualname__", repr(func))
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            msg = f"@transactional cannot decorate the generator {name}: its transaction would end at the first yield"
            raise ConfigurationError(msg)
        parameter = inspect.signature(func).parameters.get("uow")
        if parameter is None or parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            msg = (
                f"@transactional needs {name} to take a parameter named `uow` that can be passed by keyword, "
                "for example `uow: MyUnitOfWork = NEW_UOW`"
            )
            raise ConfigurationError(msg)
        index = None
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            index = list(inspect.signature(func).parameters).index("uow")
        if inspect.iscoroutinefunction(func):
            return _async_wrapper(self, func, index, name)
        return _sync_wrapper(self, func, index, name)

    def _bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, kind: type[Any], name: str
    ) -> tuple[Any, tuple[Any, ...]]:
        """The unit of work of a call, and the call's positional arguments with it in place."""
        positional = index is not None and len(args) > index
        given = args[index] if index is not None and positional else kwargs.get("uow")
        unit = self._resolve(given, kind, name)
        if unit is not given:
            args, _ = _placed(args, kwargs, index, positional, unit)
        return unit, args

    def _resolve(self, given: Any, kind: type[Any], name: str) -> Any:
        """The unit of work a call runs in: the one given, the active one here, or a new one."""
        if given is not None and given is not NEW_UOW:
            if not isinstance(given, kind):
                msg = f"{name} was given uow={_shown(given)}, which is not a {kind.__name__}"
                raise ConfigurationError(msg)
            return given
        active = _active_here()
        if isinstance(active, kind) and not (self.propagation == "requires_new" and self.factory is not None):
            return active
        if self.propagation == "mandatory":
            msg = (
                f"{name} needs an active unit of work (propagation='mandatory'), and none is active in this "
                "thread or task: pass uow=..., or call it inside `with uow:`"
            )
            raise InactiveUnitOfWorkError(msg)
        if self.factory is None:
            msg = (
                f"{name} was called without a unit of work, none is active in this thread or task, and the "
                "decorator has no factory: pass uow=..., call it inside `with uow:`, or decorate it with "
                "`transactional(factory=...)`"
            )
            raise InactiveUnitOfWorkError(msg)
        unit = self.factory()
        if not isinstance(unit, kind):
            msg = f"the factory of @transactional on {name} returned {_shown(unit)}, not a {kind.__name__}"
            raise ConfigurationError(msg)
        return unit


def _placed(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, positional: bool, unit: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with *unit* in the ``uow`` parameter's place."""
    if positional:
        assert index is not None
        return (*args[:index], unit, *args[index + 1 :]), kwargs
    kwargs["uow"] = unit
    return args, kwargs


def _sync_wrapper(options: Transactional, func: Callable[..., Any], index: int | None, name: str) -> Any:
    propagation, read_only, isolation_level, retry = (
        options.propagation,
        options.read_only,
        options.isolation_level,
        options.retry,
    )
    sleep = retry.sleep or time.sleep
    plain = propagation == "required" and read_only is None and isolation_level is None

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if plain:
            # The common case, kept to a few attribute reads: join a healthy unit
            # of work that this thread entered. Anything else takes the full path.
            positional = index is not None and len(args) > index
            given = args[index] if positional else kwargs.get("uow")  # type: ignore[index]
            unit = _current.get() if given is None or given is NEW_UOW else given
            if (
                isinstance(unit, _UnitOfWorkCore)
                and unit._sync
                and not unit._alarm
                and unit._owner == _thread_and_task()
            ):
                if unit is not given:
                    args, kwargs = _placed(args, kwargs, index, positional, unit)
                scopes = unit._scopes
                top = scopes[-1]
                if not top.tx.session_guarded:
                    unit._nest(top.tx)
                scopes.append(top.tx.joined(top.read_only))
                try:
                    result = func(*args, **kwargs)
                except BaseException as error:
                    unit._leave_joined(error)
                    raise
                scopes.pop()
                return result
        unit, args = options._bind(args, kwargs, index, UnitOfWork, name)
        attempt = 0
        while True:
            commits = unit.commits + unit._nested_commits
            block = Block(unit, propagation, read_only, isolation_level, commit_on_exit=True)
            try:
                with block:
                    return func(*args, **kwargs)
            except Exception as error:
                attempt += 1
                delay = retry._next(error, attempt, unit, block, name, commits)
            sleep(delay)

    return wrapper


def _async_wrapper(options: Transactional, func: Callable[..., Awaitable[Any]], index: int | None, name: str) -> Any:
    propagation, read_only, isolation_level, retry = (
        options.propagation,
        options.read_only,
        options.isolation_level,
        options.retry,
    )
    sleep = retry.sleep or asyncio.sleep
    plain = propagation == "required" and read_only is None and isolation_level is None

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if plain:
            # As in the sync wrapper: join a healthy unit of work that this task entered.
            positional = index is not None and len(args) > index
            given = args[index] if positional else kwargs.get("uow")  # type: ignore[index]
            unit = _current.get() if given is None or given is NEW_UOW else given
            if (
                isinstance(unit, _UnitOfWorkCore)
                and unit._sync is False
                and not unit._alarm
                and unit._owner == _current_task()
            ):
                if unit is not given:
                    args, kwargs = _placed(args, kwargs, index, positional, unit)
                scopes = unit._scopes
                top = scopes[-1]
                if not top.tx.session_guarded:
                    unit._nest(top.tx)
                scopes.append(top.tx.joined(top.read_only))
                try:
                    result = await func(*args, **kwargs)
                except BaseException as error:
                    unit._leave_joined(error)
                    raise
                scopes.pop()
                return result
        unit, args = options._bind(args, kwargs, index, AsyncUnitOfWork, name)
        attempt = 0
        while True:
            commits = unit.commits + unit._nested_commits
            block = AsyncBlock(unit, propagation, read_only, isolation_level, commit_on_exit=True)
            try:
                async with block:
                    return await func(*args, **kwargs)
            except Exception as error:
                attempt += 1
                delay = retry._next(error, attempt, unit, block, name, commits)
            paused = sleep(delay)
            if inspect.isawaitable(paused):
                await paused

    return wrapper


transactional = Transactional()
"""Run a function in a unit of work: ``@transactional``, or ``@transactional(option=...)``.

The function must take a parameter named ``uow``. A unit of work passed in
(by position or keyword) is used: an active one is joined and never
committed or closed by the decorator; an idle one is entered for the call
and committed on normal return. ``None`` or :data:`NEW_UOW` means "not
given": the decorator joins the unit of work active in this thread or task,
or else creates one with *factory*, owns it, and commits on normal return.

Options: ``factory``, ``propagation``, ``read_only``, ``isolation_level``, and
``retries`` (an ``int`` or a :class:`Retry`), which only the owner of the
transaction uses. ``transactional(factory=...)`` returns a configured
decorator to share across an application; calling that with more options
returns another one.
"""
