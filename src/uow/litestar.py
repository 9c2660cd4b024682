"""Litestar integration: a unit of work for each HTTP request, from a plugin.

:class:`UnitOfWorkPlugin` enters a new unit of work around each HTTP request
and makes it current, so that the handler and the code it awaits reach it
through :func:`uow.current` and join it from ``@uow.transactional``
functions; handlers may also take it as a dependency. The unit of work
ends, committed or rolled back as the commit policy says, before the
response starts: a commit that fails is answered by the application's
exception handlers, or with a 500, never with a 2xx whose data was lost.
The response's background tasks run after it ended, so they get units of
work of their own.

Importing this module imports Litestar; importing :mod:`uow` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.exceptions.responses import create_debug_response, create_exception_response
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPlugin, ReceiveRoutePlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from litestar.utils.sync import AsyncCallable

from . import _asgi
from ._asgi import CommitFailed, CommitPolicy, ErrorResponse, RequestUnit, check_policy, declared_sync_unit
from ._async_unit_of_work import AsyncUnitOfWork
from .errors import ConfigurationError, _shown

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.routes import BaseRoute
    from litestar.types import ExceptionHandler, ExceptionHandlersMap

__all__ = ["CommitPolicy", "UnitOfWorkPlugin"]

log = logging.getLogger("uow")

#: What to do instead of giving a sync handler, or a sync unit of work, to a request.
_SYNC_ALTERNATIVE = (
    "Declare the handler `async def`; or keep it `def` and give it a sync unit of work of its own, which it "
    "enters itself: `with make_sync_uow() as uow:` in the handler, or a service decorated with "
    "@uow.transactional(factory=make_sync_uow) that the handler calls"
)


def _check_unit(unit: object) -> AsyncUnitOfWork:
    """The unit of work that the plugin's factory returned, checked: async, and idle."""
    return _asgi.check_unit(
        unit,
        "the factory of UnitOfWorkPlugin",
        sync_thread="a sync handler",
        advice=f"Return an uow.AsyncUnitOfWork. {_SYNC_ALTERNATIVE}",
    )


def _refuse_sync_factory(factory: Callable[..., Any]) -> None:
    """Raise ConfigurationError now if *factory* is declared to return a sync unit of work."""
    returns = declared_sync_unit(factory)
    if returns is not None:
        msg = (
            f"UnitOfWorkPlugin got a factory of the sync {returns.__name__}, which a request cannot own: "
            f"give it a factory of an uow.AsyncUnitOfWork. {_SYNC_ALTERNATIVE}"
        )
        raise ConfigurationError(msg)


# -- the request's own tasks ---------------------------------------------------------------------

#: The requests whose code runs here, outermost first: set by the plugin's middleware in the request's task,
#: and copied into the context of every task that this task (or one of those) starts, such as the task that
#: Litestar streams a response from.
_REQUESTS: ContextVar[tuple[_Exchange, ...]] = ContextVar("uow_litestar_requests", default=())


class _Exchange(_asgi.Exchange):
    """One request through the plugin's middleware: its unit of work, and how its own tasks ask it to end.

    A ``Stream`` sends its body from a task of its own, and a middleware
    such as Litestar's compression holds the start of the response back
    until the body's first part: that task asks the request's task, which
    meanwhile waits for the client in ``receive()``, to end the unit of work.
    """

    __slots__ = ("plugin",)

    owner = "UnitOfWorkPlugin"
    waits_while = "Litestar streams a response"
    instead = "commit in the handler and use commit='explicit'"

    def __init__(
        self, plugin: UnitOfWorkPlugin, request: RequestUnit, receive: Receive, send: Send, *, commit_on_success: bool
    ) -> None:
        super().__init__(request, receive, send, commit_on_success=commit_on_success)
        self.plugin = plugin

    def in_request(self) -> bool:
        return self in _REQUESTS.get()

    async def send(self, message: Message) -> None:
        if self.failure is not None:
            # The response whose start failed goes no further (its body, a response sent after it): the
            # middleware answers the request.
            raise CommitFailed(self.failure)
        await super().send(message)


# -- a failed commit, answered by the application --------------------------------------------------


def _handler_for(handlers: ExceptionHandlersMap, error: Exception) -> ExceptionHandler[Any] | None:
    """The exception handler that the application registered for *error*, found as Litestar finds it.

    For an ``HTTPException``, the handler of its status code first; then the
    handler of the error's class or of the nearest of its bases; for any
    other exception, the handler of 500 last.
    """
    if isinstance(error, HTTPException) and error.status_code in handlers:
        return handlers[error.status_code]
    found = next((handlers[cls] for cls in type(error).__mro__ if cls in handlers), None)
    if found is None and not isinstance(error, HTTPException):
        return handlers.get(500)
    return found


async def _answer_failure(scope: Scope, receive: Receive, send: Send, error: Exception) -> None:
    """Answer the request whose unit of work failed to end with *error*, as the application's handlers say.

    The route's exception handlers (of the handler, its controller, routers
    and the application) answer it, after the application's
    ``after_exception`` hooks; without one, Litestar's default response for
    an exception, a 500, and uow logs the error. The exception never reaches
    the server, which would close the client's connection.
    """
    app: Litestar = scope["litestar_app"]
    route_handler = scope.get("route_handler")
    handlers = route_handler.resolve_exception_handlers() if route_handler is not None else app.exception_handlers
    request = app.request_class(scope, receive, send)
    for hook in app.after_exception:
        await hook(error, scope)
    handler = _handler_for(handlers, error)
    if handler is None:
        log.error(
            "uow: the request's unit of work failed to commit; the request is answered with a 500", exc_info=error
        )
        response = create_debug_response(request, error) if app.debug else create_exception_response(request, error)
    else:
        response = handler(request, error)
    encoders = route_handler.resolve_type_encoders() if route_handler is not None else app.type_encoders
    await response.to_asgi_response(app=None, request=request, type_encoders=encoders)(scope, receive, send)


def _is_sync(handler: object) -> bool:
    """Whether *handler* is a route handler of a sync function, which Litestar runs in a thread or in the event loop."""
    return bool(getattr(handler, "has_sync_callable", False)) or isinstance(getattr(handler, "fn", None), AsyncCallable)


# -- the plugin --------------------------------------------------------------------------------------


class _UnitOfWorkMiddleware:
    """The plugin's middleware, the outermost of the route's: a unit of work for each HTTP request."""

    def __init__(self, app: ASGIApp, plugin: UnitOfWorkPlugin) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        plugin = self.plugin
        request = RequestUnit(_check_unit(plugin.factory()), commit_on_success=plugin._commit_on_success)
        exchange = _Exchange(plugin, request, receive, send, commit_on_success=plugin._commit_on_success)
        await request.begin()
        token = _REQUESTS.set((*_REQUESTS.get(), exchange))
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as error:
            # A failed commit comes out as Litestar's "exception caught after response started", or as the
            # CommitFailed that Litestar's layers let through: whatever came after it, the client is answered.
            failure = exchange.failure
            if failure is None:
                await request.end(error)
                raise
        except BaseException as error:
            await request.end(error)
            raise
        else:
            failure = exchange.failure
            if failure is None:
                # No response started in the request's task (the server answers 500), or another task sent it:
                # nothing says the request succeeded, so roll back.
                await request.end(ErrorResponse("no response started in the request's task"))
                return
        finally:
            _REQUESTS.reset(token)
            exchange.close()
        await _answer_failure(scope, receive, send, failure)


class UnitOfWorkPlugin(InitPlugin, ReceiveRoutePlugin):
    """Give each HTTP request a unit of work of its own, current for the handler, and a dependency.

    ``Litestar(route_handlers=[...], plugins=[UnitOfWorkPlugin(make_uow, commit="on_success")])``.
    *factory* is called with no arguments for each HTTP request and returns a
    new :class:`uow.AsyncUnitOfWork`; the plugin's middleware enters it as
    the owner before the route's other middleware and the handler run, so the
    handler reaches it through ``uow.current()``, ``@uow.transactional``
    functions join it, and a handler (or a dependency) that has a parameter
    named *dependency_key* (``uow`` by default) is given it.

    The unit of work ends when the response starts, before the
    ``http.response.start`` message goes on to the server: with
    ``commit="on_success"`` it commits if the status is below 400 and rolls
    back otherwise (an exception that a handler raised is answered by
    Litestar with its status first); with ``commit="explicit"`` (the default)
    it rolls back whatever the handler did not commit. A ``Stream`` whose
    start another task sends has the request's task end it, while that task
    waits for the client.

    If the commit fails, the response does not start: the application's
    exception handler for the error answers (an ``IntegrityError`` handler
    that gives a 409), or else Litestar's 500, and uow logs the error. The
    exception never reaches the server, so the client keeps its connection.
    An exception, a cancellation, or a client that went away rolls the unit
    of work back, and the connection goes back to the pool. Background tasks
    and response bodies run after it ended.

    Handlers must be ``async def``: a sync handler that asks for the
    request's unit of work is refused with
    :class:`~uow.errors.ConfigurationError`, as is a factory of a sync unit
    of work. Lifespan events and WebSocket connections get no unit of work.
    """

    __slots__ = ("_commit_on_success", "commit", "dependency_key", "factory")

    def __init__(
        self,
        factory: Callable[[], AsyncUnitOfWork],
        *,
        commit: CommitPolicy = "explicit",
        dependency_key: str = "uow",
    ) -> None:
        if not callable(factory):
            msg = f"UnitOfWorkPlugin takes a factory that returns a new unit of work, not {_shown(factory)}"
            raise ConfigurationError(msg)
        if not isinstance(dependency_key, str) or not dependency_key.isidentifier():
            msg = f"dependency_key must name a handler's parameter, not {dependency_key!r}"
            raise ConfigurationError(msg)
        _refuse_sync_factory(factory)
        self.factory = factory
        self.commit: CommitPolicy = commit
        self._commit_on_success = check_policy(commit)
        self.dependency_key = dependency_key

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the middleware, outermost of every route's, and the dependency, under *dependency_key*."""
        app_config.middleware.insert(0, DefineMiddleware(_UnitOfWorkMiddleware, plugin=self))
        app_config.dependencies[self.dependency_key] = Provide(self._provide)
        return app_config

    def receive_route(self, route: BaseRoute) -> None:
        """Refuse a sync handler that takes the request's unit of work, as the application is built."""
        for handler in getattr(route, "route_handlers", ()):
            if _is_sync(handler) and self.dependency_key in handler.parsed_fn_signature.parameters:
                raise ConfigurationError(self._refused(handler))

    async def _provide(self, scope: Scope) -> AsyncUnitOfWork:
        """The request's unit of work, for a handler or a dependency that names it."""
        route_handler = scope.get("route_handler")
        if _is_sync(route_handler):
            raise ConfigurationError(self._refused(route_handler))
        exchange = next((exchange for exchange in _REQUESTS.get() if exchange.plugin is self), None)
        if exchange is None or not exchange.request.open:
            msg = (
                f"no unit of work of UnitOfWorkPlugin is open for {scope['type']} {scope.get('path', '')!r}: the "
                "plugin gives one to each HTTP request, until its response starts. WebSocket handlers, and code "
                "that runs after the response started, use a unit of work of their own (@uow.transactional)"
            )
            raise ConfigurationError(msg)
        return exchange.request.unit

    def _refused(self, handler: object) -> str:
        """Why *handler*, a sync handler, cannot have the request's unit of work, and what to do instead."""
        shown = getattr(handler, "handler_name", None) or repr(handler)
        return (
            f"UnitOfWorkPlugin gives the request's async unit of work to what asks for {self.dependency_key!r}, "
            f"but {shown} is a sync handler, which cannot use it (Litestar runs it in a worker thread, or in the "
            f"event loop without awaiting). {_SYNC_ALTERNATIVE}"
        )
