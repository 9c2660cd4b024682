"""Starlette integration: a unit of work for each HTTP request, from a pure ASGI middleware.

:class:`UnitOfWorkMiddleware` enters a new unit of work around each HTTP
request and makes it current, so that the endpoint and the code it awaits
reach it through :func:`uow.current` and join it from ``@uow.transactional``
functions. The unit of work ends, committed or rolled back as the commit
policy says, before the response starts: a commit that fails is answered by
the application's exception handlers, or with a 500, never with a 2xx whose
data was lost. The response's background tasks run after it ended, so they
get units of work of their own.

Importing this module imports Starlette; importing :mod:`uow` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _asgi
from ._asgi import CommitPolicy, ErrorResponse, RequestUnit, check_policy
from ._async_unit_of_work import AsyncUnitOfWork
from .errors import ConfigurationError, _shown

__all__ = ["CommitPolicy", "UnitOfWorkMiddleware"]

log = logging.getLogger("uow")


def _check_unit(unit: object, source: str) -> AsyncUnitOfWork:
    """The unit of work that *source* returned, checked: async, and idle."""
    return _asgi.check_unit(
        unit,
        source,
        sync_thread="a `def` endpoint",
        advice=(
            "Return an uow.AsyncUnitOfWork for async endpoints; in a `def` endpoint, enter a sync unit of work "
            "there (`with uow:`), or decorate the endpoint with @uow.transactional"
        ),
    )


# -- a failed commit, answered by the application --------------------------------------------


def _handler_for(scope: Scope, error: BaseException) -> Any:
    """The exception handler that the application registered for *error*, if any.

    Starlette's ``ExceptionMiddleware`` (in every Starlette and FastAPI
    application) puts its handlers in the scope: those registered for an
    exception class or a status, all but the ones for ``Exception`` and 500.
    """
    handlers = scope.get("starlette.exception_handlers")
    if not handlers:
        return None
    by_class: dict[Any, Any] = handlers[0]
    return next((by_class[cls] for cls in type(error).__mro__ if cls in by_class), None)


def _failure_response(scope: Scope, error: Exception) -> Exception:
    """What the application answers for a unit of work that failed to end with *error*.

    The error itself if the application has a handler for it (an
    ``IntegrityError`` that becomes a 409); otherwise an ``HTTPException``
    500, which the application's handler of ``HTTPException`` answers. The
    exception never reaches the server, which would log it and close the
    client's connection; uow logs it instead.
    """
    if _handler_for(scope, error) is not None:
        return error
    log.error("uow: the request's unit of work failed to commit; the request is answered with a 500", exc_info=error)
    server_error = HTTPException(status_code=500)
    server_error.__cause__ = error
    return server_error


async def _answer_failure(scope: Scope, receive: Receive, send: Send, error: Exception) -> None:
    """Answer the request whose unit of work failed to end with *error*, as the application's handlers say."""
    answer = _failure_response(scope, error)

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise answer

    try:
        await wrap_app_handling_exceptions(failing, Request(scope, receive, send))(scope, receive, send)
    except HTTPException as unhandled:
        if unhandled is not answer:
            raise
        # No Starlette application inside the middleware to answer it: answer as Starlette's default would.
        await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)


# -- the request's own tasks ---------------------------------------------------------------------

#: The request whose code runs here: set by the middleware in the request's task, and copied into the
#: context of every task that this task (or one of those) starts, such as Starlette's response tasks.
_REQUEST: ContextVar[_Exchange | None] = ContextVar("uow_starlette_request", default=None)


class _Exchange(_asgi.Exchange):
    """One request through the middleware: its unit of work, and how its own tasks ask it to end.

    Starlette streams a response from a task of its own on servers older
    than ASGI 2.4: that task asks the request's task, which meanwhile waits
    for the client in ``receive()``, to end the unit of work.
    """

    __slots__ = ()

    owner = "UnitOfWorkMiddleware"
    waits_while = "Starlette sends a streaming or file response"
    instead = "commit in the endpoint and use commit='explicit' for this route"

    def in_request(self) -> bool:
        return _REQUEST.get() is self


class UnitOfWorkMiddleware:
    """Give each HTTP request a unit of work of its own, current for the endpoint.

    ``Middleware(UnitOfWorkMiddleware, factory=make_uow, commit="on_success")``.
    *factory* is called with no arguments for each HTTP request and returns a
    new :class:`uow.AsyncUnitOfWork`; the middleware enters it as the owner
    before calling the application, so the endpoint reaches it through
    ``uow.current()`` and ``@uow.transactional`` functions join it.

    The unit of work ends when the response starts, before the
    ``http.response.start`` message is passed on: with
    ``commit="on_success"`` it commits if the status is below 400 and rolls
    back otherwise; with ``commit="explicit"`` (the default) it rolls back
    whatever the endpoint did not commit. A streaming or file response that
    Starlette sends from a task of its own (on servers older than ASGI 2.4)
    has the request's task end it, while that task waits for the client.

    If the commit fails, the response does not start: the application's
    exception handler for the error answers (an ``IntegrityError`` handler
    that gives a 409), or else an ``HTTPException`` 500, and uow logs the
    error. The exception never reaches the server, so the client keeps its
    connection. An exception, a cancellation, or a client that went away
    rolls the unit of work back, and the connection goes back to the pool.
    Background tasks and response bodies run after it ended.

    Lifespan and WebSocket connections pass through without a unit of work.
    """

    def __init__(
        self, app: ASGIApp, factory: Callable[[], AsyncUnitOfWork], *, commit: CommitPolicy = "explicit"
    ) -> None:
        if not callable(factory):
            msg = f"UnitOfWorkMiddleware takes a factory that returns a new unit of work, not {_shown(factory)}"
            raise ConfigurationError(msg)
        self.app = app
        self.factory = factory
        self.commit: CommitPolicy = commit
        self._commit_on_success = check_policy(commit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = RequestUnit(
            _check_unit(self.factory(), "the factory of UnitOfWorkMiddleware"),
            commit_on_success=self._commit_on_success,
        )
        exchange = _Exchange(request, receive, send, commit_on_success=self._commit_on_success)
        await request.begin()
        token = _REQUEST.set(exchange)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException as error:
            failure = exchange.failure_in(error)
            if failure is None:
                await request.end(error)
                raise
            await _answer_failure(scope, receive, send, failure)
            return
        finally:
            _REQUEST.reset(token)
            exchange.close()
        # The application returned without starting a response (the server answers 500), or another task
        # sent it: nothing says the request succeeded, so roll back.
        await request.end(ErrorResponse("no response started in the request's task"))
