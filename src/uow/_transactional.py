"""The ``@transactional`` decorator: join the caller's unit of work, or own one, and retry."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import sys
import time
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, ParamSpec, TypeVar, Union, overload

import attrs

from . import _observe
from ._async_unit_of_work import AsyncBlock, AsyncUnitOfWork
from ._machine import _BlockOptions, _UnitOfWorkCore
from ._ownership import _current, active_here
from ._scope import Propagation, check_options
from ._unit_of_work import Block, UnitOfWork
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

    def _again(self, error: Exception, block: _BlockOptions) -> None:
        """After the pause: re-raise *error* if work of the failed attempt was committed meanwhile.

        A child task or thread of the attempt that was not waited for may
        commit during the pause; its work is as durable as any other.
        """
        if block._durable:
            raise error

    def _next(self, error: Exception, attempt: int, block: _BlockOptions, name: str, started: float) -> float:
        """The pause before retry number *attempt* after *error*; re-raises *error* if it is not retried.

        Only the owner of the transaction retries. An attempt that committed
        work for real (itself, or through a transaction started inside it, in
        any task or thread that inherited its context), or whose commit may
        have reached the database, is never run again; and *retry_if* has the
        last word.
        """
        if (
            not block.owner
            or attempt > self.retries
            or block._durable
            or block._outcome_unknown
            or not self.retry_if(error)
        ):
            raise error
        delay = self.delay(attempt)
        unit = getattr(block, "_unit", None)
        label = f"{type(unit).__name__} {name}" if unit is not None else name
        _observe.retry(name, attempt, self.retries, delay, error, label, (time.perf_counter() - started) * 1000.0)
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
        func: Callable[P, R],
        /,
        *,
        factory: Callable[[], UnitOfWork | AsyncUnitOfWork] | None = ...,
        propagation: Propagation = ...,
        read_only: bool | None = ...,
        isolation_level: str | None = ...,
        retries: int | Retry = ...,
    ) -> Callable[P, R]: ...

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
        changes = {
            "factory": factory,
            "propagation": propagation,
            "read_only": read_only,
            "isolation_level": isolation_level,
        }
        options = {name: value for name, value in changes.items() if value is not _NOT_SET}
        if retries is not _NOT_SET:
            options["retry"] = _as_retry(retries)
        configured = self._with(options) if options else self
        if func is None:
            return configured
        # Where the function is defined: the names its annotations may refer to, which a function
        # defined inside another one cannot find later through its module's globals.
        definition = sys._getframe(1)
        names = definition.f_locals if definition.f_locals is not definition.f_globals else None
        return configured._decorate(func, names)

    def _with(self, options: dict[str, Any]) -> Transactional:
        configured = attrs.evolve(self, **options)
        # Entering a scope validates these too; checking now reports the mistake at import.
        check_options(configured.propagation, configured.isolation_level)
        if configured.factory is not None and not callable(configured.factory):
            msg = f"factory must be a callable that returns a unit of work, not {_shown(configured.factory)}"
            raise ConfigurationError(msg)
        if configured.read_only is not None and not isinstance(configured.read_only, bool):
            msg = f"read_only takes True, False or None, not {configured.read_only!r}"
            raise ConfigurationError(msg)
        return configured

    def _decorate(self, func: Any, names: Mapping[str, Any] | None = None) -> Any:
        if isinstance(func, (classmethod, staticmethod)):
            return type(func)(self._decorate(func.__func__, names))
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
            return _async_wrapper(self, func, index, name, _Route(self, func, parameter, AsyncUnitOfWork, name, names))
        return _sync_wrapper(self, func, index, name, _Route(self, func, parameter, UnitOfWork, name, names))

    def _bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, route: _Route
    ) -> tuple[Any, tuple[Any, ...]]:
        """The unit of work of a call, and the call's positional arguments with it in place."""
        positional = index is not None and len(args) > index
        given = args[index] if index is not None and positional else kwargs.get("uow")
        unit = self._resolve(given, route)
        if unit is not given:
            args, _ = _placed(args, kwargs, index, positional, unit)
        return unit, args

    def _resolve(self, given: Any, route: _Route) -> Any:
        """The unit of work a call runs in: the one given, the active one here of its kind, or a new one."""
        base, name = route.base, route.name
        if given is not None and given is not NEW_UOW:
            if not isinstance(given, base):
                msg = f"{name} was given uow={_shown(given)}, which is not a {base.__name__}"
                raise ConfigurationError(msg)
            return given
        active = active_here(route.kind())
        if active is not None and not (self.propagation == "requires_new" and self.factory is not None):
            return active
        if self.propagation == "mandatory":
            msg = (
                f"{name} needs an active unit of work (propagation='mandatory'), and none is active in this "
                "thread or task: pass uow=..., or call it inside `with uow:`"
            )
            raise InactiveUnitOfWorkError(msg)
        if self.factory is None:
            msg = (
                f"{name} was called without a unit of work, none of its kind ({route.shown()}) is active in this "
                "thread or task, and the decorator has no factory: pass uow=..., call it inside `with uow:`, or "
                "decorate it with `transactional(factory=...)`"
            )
            raise InactiveUnitOfWorkError(msg)
        return self._made(self.factory(), route)

    def _made(self, unit: Any, route: _Route) -> Any:
        """*unit*, which the factory returned, if it is a unit of work of the function's sync or async kind."""
        if isinstance(unit, _UnitOfWorkCore) and unit._sync is (route.base is UnitOfWork):
            return unit  # a plain class: cheaper than isinstance() against the abstract base
        if not isinstance(unit, route.base):
            msg = f"the factory of @transactional on {route.name} returned {_shown(unit)}, not a {route.base.__name__}"
            raise ConfigurationError(msg)
        return unit


class _Route:
    """Which active units of work a decorated function joins: those of the kind its decorator would create.

    That kind is the factory's class (or the class its return annotation
    names), else the class that the ``uow`` parameter is annotated with. A
    service decorated with ``transactional(factory=AuditUnitOfWork)`` called
    inside a block of another unit of work does not join that block: it
    runs in an audit unit of work of its own. The kind is worked out on the
    first call, when the annotations can be resolved.
    """

    __slots__ = ("_factory", "_func", "_kind", "_names", "_parameter", "base", "joins", "name")

    def __init__(
        self,
        options: Transactional,
        func: Callable[..., Any],
        parameter: inspect.Parameter,
        base: type[Any],
        name: str,
        names: Mapping[str, Any] | None,
    ) -> None:
        self._factory = options.factory
        #: The local names where the function was defined, if not its module's: for its annotations.
        self._names = names
        self._func = func
        self._parameter = parameter
        self._kind: type[Any] | tuple[type[Any], ...] | None = None
        #: The unit of work type that a call of this kind of function (sync or async) takes.
        self.base = base
        self.name = name
        #: Whether an active unit of work of each class met so far is of the kind: an isinstance()
        #: against an abstract class goes through ABCMeta, and the decorator's fast path asks each call.
        self.joins: dict[type[Any], bool] = {}

    def kind(self) -> type[Any] | tuple[type[Any], ...]:
        kind = self._kind
        if kind is None:
            kind = self._kind = self._work_out()
        return kind

    def accepts(self, cls: type[Any]) -> bool:
        """Whether an active unit of work of class *cls* is of the kind; remembered per class."""
        accepted = self.joins[cls] = issubclass(cls, self.kind())
        return accepted

    def shown(self) -> str:
        kind = self.kind()
        return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__

    def _work_out(self) -> type[Any] | tuple[type[Any], ...]:
        if self._factory is not None:
            made = _made_by(self._factory)
            if made is not None:
                return made
        annotation = self._parameter.annotation
        if annotation is inspect.Parameter.empty:
            return self.base
        if isinstance(annotation, str):
            func = inspect.unwrap(self._func)
            try:
                annotation = eval(annotation, getattr(func, "__globals__", {}), self._names)  # its own annotation
            except Exception as error:
                msg = (
                    f"@transactional on {self.name} joins only an active unit of work of the kind the function takes, "
                    f"and could not resolve the annotation of its `uow` parameter ({type(error).__name__}: {error}). "
                    "Import that class at run time, not only under TYPE_CHECKING, and define it before the "
                    "function, or give transactional(factory=...) a unit of work class"
                )
                raise ConfigurationError(msg) from error
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        if annotation in (Any, object):
            return self.base  # the function says it takes any unit of work
        classes = _unit_classes(annotation)
        if classes is None:
            msg = (
                f"@transactional on {self.name} joins only an active unit of work of the kind the function takes, "
                f"and the annotation of its `uow` parameter, {annotation!r}, names no unit of work class. Annotate "
                "it with one (or a union of them, or Any for any kind), or give transactional(factory=...) a "
                "unit of work class"
            )
            raise ConfigurationError(msg)
        return classes


def _made_by(factory: Callable[..., Any]) -> type[Any] | tuple[type[Any], ...] | None:
    """The unit of work class that *factory* builds, if it says: a class, a partial of one, or a return annotation."""
    if isinstance(factory, functools.partial):
        return _made_by(factory.func)
    if isinstance(factory, type):
        return factory if issubclass(factory, _UnitOfWorkCore) else None
    try:
        returned = typing.get_type_hints(factory).get("return")
    except Exception:
        return None
    return _unit_classes(returned)


def _unit_classes(annotation: Any) -> type[Any] | tuple[type[Any], ...] | None:
    """The unit of work classes an annotation names: one class, or the members of a union; None if it names none."""
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, _UnitOfWorkCore) else None
    if typing.get_origin(annotation) in (Union, types.UnionType):
        classes = tuple(
            member
            for member in typing.get_args(annotation)
            if isinstance(member, type) and issubclass(member, _UnitOfWorkCore)
        )
        if classes:
            return classes[0] if len(classes) == 1 else classes
    return None


def _placed(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, positional: bool, unit: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with *unit* in the ``uow`` parameter's place."""
    if positional:
        assert index is not None
        return (*args[:index], unit, *args[index + 1 :]), kwargs
    kwargs["uow"] = unit
    return args, kwargs


def _sync_wrapper(options: Transactional, func: Callable[..., Any], index: int | None, name: str, route: _Route) -> Any:
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
        bound = False
        if plain:
            # The common case, kept to a few attribute reads: join a healthy unit of work of the
            # function's kind that this thread entered. Anything else takes the full path.
            positional = index is not None and len(args) > index
            given = args[index] if positional else kwargs.get("uow")  # type: ignore[index]
            unit: Any
            if given is None or given is NEW_UOW:
                tx = _current.get()
                unit = tx.unit if tx is not None else None
                if unit is not None and not (route.joins.get(type(unit)) or route.accepts(type(unit))):
                    unit = None
            else:
                unit, tx = given, None
            if unit is None and tx is None and options.factory is not None:
                # Nothing is active in this context: nothing to join, and nothing for _bind() to look for again.
                route.kind()  # as _bind() would: a kind that cannot be worked out is refused on the first call
                unit = options._made(options.factory(), route)
                args, kwargs = _placed(args, kwargs, index, positional, unit)
                bound = True
            elif isinstance(unit, _UnitOfWorkCore) and unit._sync:  # a plain class: cheaper than an ABC's isinstance
                scope = unit._join_here()
                if scope is not None:
                    if unit is not given:
                        args, kwargs = _placed(args, kwargs, index, positional, unit)
                    try:
                        result = func(*args, **kwargs)
                    except BaseException as error:
                        if not unit._leave_joined(scope, error):
                            unit._exit_scope(scope, error)
                        raise
                    if not unit._leave_joined(scope, None):
                        unit._exit_scope(scope, None)
                    return result
        if not bound:
            unit, args = options._bind(args, kwargs, index, route)
        attempt = 0
        while True:
            block = Block(
                unit, propagation, read_only, isolation_level, commit_on_exit=True, function=name, attempt=attempt + 1
            )
            started = time.perf_counter()
            try:
                with block:
                    return func(*args, **kwargs)
            except Exception as error:
                attempt += 1
                delay = retry._next(error, attempt, block, name, started)
                failure = error
            sleep(delay)
            retry._again(failure, block)

    return wrapper


def _async_wrapper(
    options: Transactional, func: Callable[..., Awaitable[Any]], index: int | None, name: str, route: _Route
) -> Any:
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
        bound = False
        if plain:
            # As in the sync wrapper: join a healthy unit of work of the function's kind that this task entered.
            positional = index is not None and len(args) > index
            given = args[index] if positional else kwargs.get("uow")  # type: ignore[index]
            unit: Any
            if given is None or given is NEW_UOW:
                tx = _current.get()
                unit = tx.unit if tx is not None else None
                if unit is not None and not (route.joins.get(type(unit)) or route.accepts(type(unit))):
                    unit = None
            else:
                unit, tx = given, None
            if unit is None and tx is None and options.factory is not None:
                # As in the sync wrapper: nothing is active in this context, so nothing for _bind() to look for.
                route.kind()
                unit = options._made(options.factory(), route)
                args, kwargs = _placed(args, kwargs, index, positional, unit)
                bound = True
            elif isinstance(unit, _UnitOfWorkCore) and not unit._sync:  # a plain class: cheaper than an ABC
                scope = unit._join_here()
                if scope is not None:
                    if unit is not given:
                        args, kwargs = _placed(args, kwargs, index, positional, unit)
                    try:
                        result = await func(*args, **kwargs)
                    except BaseException as error:
                        if not unit._leave_joined(scope, error):
                            await unit._exit_scope(scope, error)
                        raise
                    if not unit._leave_joined(scope, None):
                        await unit._exit_scope(scope, None)
                    return result
        if not bound:
            unit, args = options._bind(args, kwargs, index, route)
        attempt = 0
        while True:
            block = AsyncBlock(
                unit, propagation, read_only, isolation_level, commit_on_exit=True, function=name, attempt=attempt + 1
            )
            started = time.perf_counter()
            try:
                async with block:
                    return await func(*args, **kwargs)
            except Exception as error:
                attempt += 1
                delay = retry._next(error, attempt, block, name, started)
                failure = error
            paused = sleep(delay)
            if inspect.isawaitable(paused):
                await paused
            retry._again(failure, block)

    return wrapper


transactional = Transactional()
"""Run a function in a unit of work: ``@transactional``, or ``@transactional(option=...)``.

The function must take a parameter named ``uow``. A unit of work passed in
(by position or keyword) is used: an active one is joined and never
committed or closed by the decorator; an idle one is entered for the call
and committed on normal return. ``None`` or :data:`NEW_UOW` means "not
given": the decorator joins the unit of work active in this thread or task
if it is of the kind the decorator would create (the factory's class, else
the ``uow`` parameter's annotation), or else creates one with *factory*,
owns it, and commits on normal return.

Options: ``factory``, ``propagation``, ``read_only``, ``isolation_level``, and
``retries`` (an ``int`` or a :class:`Retry`), which only the owner of the
transaction uses. ``read_only`` and ``isolation_level`` left unset take the
unit of work's own settings. ``transactional(factory=...)`` returns a
configured decorator to share across an application; calling that with more
options returns another one, and ``transactional(func, factory=...)``
decorates *func* with them.
"""
