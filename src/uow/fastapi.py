"""FastAPI integration: a dependency that gives an endpoint the request's unit of work, entered.

Declare the annotation once, with the type the endpoints should see::

    UnitOfWork = Annotated[AllocationUnitOfWork, uow.fastapi.depends(make_uow, commit="on_success")]

and endpoints read ``async def allocate(..., uow: UnitOfWork)``. For the
pure ASGI alternative, which makes the request's unit of work current
without a parameter, see :class:`uow.starlette.UnitOfWorkMiddleware`; it
works in a FastAPI application too.

Importing this module imports FastAPI; importing :mod:`uow` does not.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import params
from starlette.requests import HTTPConnection
from starlette.responses import Response

from ._asgi import CommitPolicy, RequestUnit, check_policy, declared_sync_unit, outcome
from ._async_unit_of_work import AsyncUnitOfWork
from .errors import ConfigurationError, _shown
from .starlette import _check_unit, _failure_response

__all__ = ["CommitPolicy", "depends"]


def depends(
    factory: Callable[..., AsyncUnitOfWork | Awaitable[AsyncUnitOfWork]], *, commit: CommitPolicy = "explicit"
) -> params.Depends:
    """The ``Depends`` marker that gives an endpoint the request's unit of work, entered.

    Use it in an annotation that keeps your type for the type checker::

        UnitOfWork = Annotated[AllocationUnitOfWork, uow.fastapi.depends(make_uow)]

    *factory* is itself a FastAPI dependency: FastAPI calls it once per
    request (so it may take a ``Request`` or other dependencies), and a test
    replaces it with ``app.dependency_overrides[make_uow] = lambda: fake``.
    It returns a new :class:`uow.AsyncUnitOfWork`, which the dependency
    enters as the owner for the request: it is current for the endpoint
    (``uow.current()``), and ``@uow.transactional`` functions join it.

    It ends after the endpoint returns and its result is serialized, before
    the response starts (the marker uses ``scope="function"``): with
    ``commit="on_success"`` it commits unless the endpoint raised (an
    ``HTTPException`` included) or set a status of 400 or more on FastAPI's
    ``Response`` parameter; with ``commit="explicit"`` (the default) it rolls
    back whatever the endpoint did not commit. A commit that fails is
    answered by the application's exception handler for the error, or else
    with a 500 (an ``HTTPException``), which uow logs. Background tasks run
    after it ended.

    The endpoint must be ``async def``: FastAPI runs a ``def`` endpoint in a
    worker thread, where the request's async unit of work cannot be used,
    and the first request to one raises
    :class:`~uow.errors.ConfigurationError`. A sync unit of work cannot be
    entered by a dependency either, as it belongs to the thread that entered
    it: declare it with ``Depends(factory)`` and enter it in the endpoint, or
    decorate the endpoint with ``@uow.transactional``.
    """
    if not callable(factory):
        msg = f"uow.fastapi.depends() takes a factory that returns a new unit of work, not {_shown(factory)}"
        raise ConfigurationError(msg)
    commit_on_success = check_policy(commit)
    _refuse_sync_factory(factory)
    name = getattr(factory, "__qualname__", repr(factory))
    source = f"the factory {name} of uow.fastapi.depends()"

    # A default, not an annotation: FastAPI would resolve an annotation in this module's globals.
    built_by_factory: Any = params.Depends(factory)

    async def unit_of_work(
        connection: HTTPConnection, response: Response, unit: Any = built_by_factory
    ) -> AsyncIterator[Any]:
        _refuse_sync_endpoint(connection.scope.get("endpoint"))
        request = RequestUnit(_check_unit(unit, source), commit_on_success=commit_on_success)
        await request.begin()
        try:
            yield request.unit
        except BaseException as error:
            await request.end(error)
            raise
        try:
            # FastAPI's Response parameter: the status the endpoint set on it, if any, is the response's.
            await request.end(outcome(response.status_code))
        except Exception as error:
            answer = _failure_response(connection.scope, error)
            if answer is error:
                raise
            raise answer from error

    unit_of_work.__qualname__ = unit_of_work.__name__ = f"unit_of_work[{name}]"
    return params.Depends(unit_of_work, scope="function")


def _refuse_sync_factory(factory: Callable[..., Any]) -> None:
    """Raise ConfigurationError now if *factory* is declared to return a sync unit of work."""
    returns = declared_sync_unit(factory)
    if returns is not None:
        msg = (
            f"uow.fastapi.depends() got a factory of the sync {returns.__name__}: FastAPI runs a `def` endpoint "
            "in a worker thread, and a sync unit of work belongs to the thread that entered it. Declare it "
            f"with `Annotated[{returns.__name__}, Depends(factory)]` and enter it in the endpoint "
            "(`with uow:`), or decorate the endpoint with @uow.transactional"
        )
        raise ConfigurationError(msg)


def _refuse_sync_endpoint(endpoint: object) -> None:
    """Raise ConfigurationError if *endpoint* is a `def` function, which FastAPI runs in a worker thread."""
    call = endpoint
    while isinstance(call, functools.partial):
        call = call.func
    if call is None or inspect.isclass(call):
        return
    if not inspect.isroutine(call):
        call = getattr(call, "__call__", None)  # noqa: B004 - an instance whose __call__ is the endpoint
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return
    shown = getattr(endpoint, "__qualname__", None) or repr(endpoint)
    msg = (
        f"uow.fastapi.depends() gives the endpoint an async unit of work, entered in the request's task, but "
        f"{shown} is a `def` endpoint, which FastAPI runs in a worker thread, where that unit of work cannot "
        "be used. Declare the endpoint `async def`; or keep it `def` with a sync unit of work: declare it with "
        "`Annotated[YourUnitOfWork, Depends(factory)]` and decorate the endpoint with @uow.transactional (or "
        "enter it there with `with uow:`)"
    )
    raise ConfigurationError(msg)
