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

import asyncio
import functools
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Literal, get_args

from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._async_unit_of_work import AsyncBlock, AsyncUnitOfWork
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError, OwnershipError, _shown

__all__ = ["CommitPolicy", "UnitOfWorkMiddleware"]

log = logging.getLogger("uow")

CommitPolicy = Literal["explicit", "on_success"]
"""When the request's unit of work commits.

``"explicit"``: only when the code calls ``commit()``; whatever it did not
commit is rolled back. ``"on_success"``: also when the request succeeds: no
exception reached uow, and the response status is below 400.
"""

_POLICIES: tuple[str, ...] = get_args(CommitPolicy)


def _check_policy(commit: object) -> bool:
    """Whether *commit* asks to commit on success; raise ConfigurationError if it is no policy."""
    if commit not in _POLICIES:
        msg = f"commit must be one of {', '.join(map(repr, _POLICIES))}, not {commit!r}"
        raise ConfigurationError(msg)
    return commit == "on_success"


def _check_unit(unit: object, source: str) -> AsyncUnitOfWork:
    """The unit of work that *source* returned, checked: async, and idle."""
    if isinstance(unit, UnitOfWork):
        msg = (
            f"{source} returned the sync {type(unit).__name__}, which a request cannot own: the event loop would "
            "enter it, and the thread that runs a `def` endpoint could not use it. Return an "
            "uow.AsyncUnitOfWork for async endpoints; in a `def` endpoint, enter a sync unit of work there "
            "(`with uow:`), or decorate the endpoint with @uow.transactional"
        )
        raise ConfigurationError(msg)
    if not isinstance(unit, AsyncUnitOfWork):
        msg = f"{source} returned {_shown(unit)}, not a unit of work: return a new uow.AsyncUnitOfWork"
        raise ConfigurationError(msg)
    if unit.active:
        msg = (
            f"{source} returned a {type(unit).__name__} that is already active: the request must own its unit "
            "of work, so return a new one for each request"
        )
        raise ConfigurationError(msg)
    return unit


class _ErrorResponse(Exception):
    """Handed to the unit of work's exit, never raised: the response says the request failed."""


def _outcome(status: int | None) -> _ErrorResponse | None:
    """What ends the request's unit of work for a response of *status*: nothing (success) below 400."""
    return None if status is None or status < 400 else _ErrorResponse(status)


class _RequestUnit:
    """The request's unit of work: entered by the request's task, ended once, by that task."""

    __slots__ = ("_block", "_task", "open", "unit")

    def __init__(self, unit: AsyncUnitOfWork, *, commit_on_success: bool) -> None:
        self.unit = unit
        # The block of a @transactional call: it commits on a clean exit if the unit of work was used,
        # rolls back quietly after set_rollback_only(), and raises RollbackOnlyError if it was poisoned.
        self._block = AsyncBlock(unit, "required", None, None, commit_on_exit=commit_on_success)
        self._task = asyncio.current_task()
        self.open = False

    async def begin(self) -> None:
        await self._block.__aenter__()
        self.open = True

    def here(self) -> bool:
        """Whether the code runs in the task that entered the unit of work."""
        return asyncio.current_task() is self._task

    async def end(self, error: BaseException | None) -> None:
        """Leave the block: commit as the policy says if *error* is None, else roll back; always close."""
        if not self.open:
            return
        self.open = False
        await self._block.__aexit__(None if error is None else type(error), error, None)


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


class _CommitFailed(Exception):
    """Raised from ``send`` instead of starting a response whose unit of work failed to commit.

    It unwinds the application, which must not run the response's background
    tasks; the middleware catches it and answers the request.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the request's unit of work failed to commit: {type(error).__name__}: {error}")
        self.error = error


# -- the request's own tasks ---------------------------------------------------------------------

#: The request whose code runs here: set by the middleware in the request's task, and copied into the
#: context of every task that this task (or one of those) starts, such as Starlette's response tasks.
_REQUEST: ContextVar[_Exchange | None] = ContextVar("uow_starlette_request", default=None)


class _Exchange:
    """One request through the middleware: its unit of work, and how its own tasks ask it to end.

    Only the request's task may end the unit of work. When another of the
    request's tasks starts the response (Starlette streams from a task of its
    own on servers older than ASGI 2.4), it asks the request's task, which
    meanwhile waits for the client in ``receive()``, to end it, and waits
    for the answer before the response goes on.
    """

    __slots__ = ("_asked", "_body_read", "_pending", "_receive", "_send", "commit_on_success", "failure", "request")

    def __init__(self, request: _RequestUnit, receive: Receive, send: Send, *, commit_on_success: bool) -> None:
        self.request = request
        self.commit_on_success = commit_on_success
        self._receive = receive
        self._send = send
        #: Set while the request's task waits for the client: another task of the request puts its ask in it.
        self._asked: asyncio.Future[tuple[int, asyncio.Future[None]] | None] | None = None
        #: Whether the request's task has received the whole request: it then waits for the client to leave.
        self._body_read = False
        #: The server's receive() that a cancelled wait left running: the next receive() takes it over.
        self._pending: asyncio.Future[Message] | None = None
        #: Why the unit of work failed to end, if it did: the middleware answers it.
        self.failure: Exception | None = None

    async def _end(self, status: int) -> None:
        """End the unit of work for a response of *status*, in the request's task; raise _CommitFailed if it fails."""
        try:
            await self.request.end(_outcome(status))
        except Exception as error:
            self.failure = error
            raise _CommitFailed(error) from error

    # -- send: the response starts once the unit of work has ended

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.request.open:
            status = int(message["status"])
            if self.request.here():
                await self._end(status)
            else:
                await self._ask_to_end(status)
        await self._send(message)

    async def _ask_to_end(self, status: int) -> None:
        """Another task starts the response: the request's task ends the unit of work first, if it can."""
        asked = self._asked
        if _REQUEST.get() is self and asked is not None and not asked.done():
            reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asked.set_result((status, reply))
            await reply
            return
        if not self.commit_on_success:
            # Nothing to commit: the response goes on, and the unit of work ends when the application returns.
            # The request has answered, so its background tasks get transactions of their own.
            self.request.unit._seal()
            return
        if _REQUEST.get() is not self:
            why = "a task that the request did not start is sending it"
        else:
            why = (
                "another task of the request is sending it while the request's task, which alone may use its "
                "unit of work, is not waiting for the client (as it does while Starlette sends a streaming or "
                "file response)"
            )
        msg = (
            f"UnitOfWorkMiddleware cannot commit before this response starts: {why}. Send the response from "
            "the request's task, or commit in the endpoint and use commit='explicit' for this route"
        )
        raise OwnershipError(msg)

    # -- receive: the request's task waits for the client, and ends the unit of work when asked

    async def receive(self) -> Message:
        if self.request.open and self.request.here():
            if self._body_read:
                return await self._wait_for_the_client()
            return await self._read_the_body()
        pending = self._pending
        if pending is not None:
            self._pending = None
            return await pending
        return await self._receive()

    async def _read_the_body(self) -> Message:
        """Receive a part of the request; an ask that came meanwhile is served once it is here."""
        asked: asyncio.Future[tuple[int, asyncio.Future[None]] | None] = asyncio.get_running_loop().create_future()
        self._asked = asked
        try:
            message = await self._receive()
        except BaseException:
            _refuse_unserved(asked)
            raise
        finally:
            self._asked = None
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self._body_read = True
        ask = asked.result() if asked.done() else None
        if ask is not None:
            await self._serve(*ask)
        return message

    async def _wait_for_the_client(self) -> Message:
        """Receive what the client says next (it has sent its request): an ask wakes this task up to serve it."""
        loop = asyncio.get_running_loop()
        receiving = self._pending or asyncio.ensure_future(self._receive())
        self._pending = None
        try:
            while not receiving.done():
                asked: asyncio.Future[tuple[int, asyncio.Future[None]] | None] = loop.create_future()
                self._asked = asked
                wake = functools.partial(_wake, asked)
                receiving.add_done_callback(wake)
                try:
                    ask = await asked
                except BaseException:
                    _refuse_unserved(asked)
                    raise
                finally:
                    self._asked = None
                    receiving.remove_done_callback(wake)
                if ask is not None:
                    await self._serve(*ask)
            return receiving.result()
        except BaseException:
            if not receiving.done() or (not receiving.cancelled() and receiving.exception() is None):
                self._pending = receiving  # a message the server handed over is not lost
            raise

    async def _serve(self, status: int, reply: asyncio.Future[None]) -> None:
        """End the unit of work for the task that starts a response of *status*, and tell it how that went."""
        try:
            await self._end(status)
        except BaseException as error:
            if not reply.done():
                reply.set_exception(error if isinstance(error, _CommitFailed) else _CommitFailed(error))
            if not isinstance(error, _CommitFailed):
                raise
        else:
            if not reply.done():
                reply.set_result(None)

    def close(self) -> None:
        """The request is over: stop a receive() that nobody waits for any more."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()

    def failure_in(self, error: BaseException) -> Exception | None:
        """The failed commit that *error* unwinds the application for, if that is all it does."""
        failure = self.failure
        if failure is None:
            return None
        return failure if all(isinstance(leaf, _CommitFailed) for leaf in _leaves(error)) else None


def _wake(asked: asyncio.Future[Any], receiving: object) -> None:
    """The client spoke: the request's task stops waiting for an ask."""
    if not asked.done():
        asked.set_result(None)


def _refuse_unserved(asked: asyncio.Future[Any]) -> None:
    """The request's task stops waiting: an ask it did not serve gets an error, not an endless wait."""
    if not asked.done() or asked.cancelled() or asked.result() is None:
        return
    _status, reply = asked.result()
    if not reply.done():
        msg = "the request's task stopped waiting for the client before it could end the unit of work"
        reply.set_exception(OwnershipError(msg))


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in *error*, exception groups (of task groups) opened."""
    inner = getattr(error, "exceptions", None)
    if not isinstance(inner, tuple):
        return [error]
    return [leaf for exc in inner for leaf in _leaves(exc)]


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
        self._commit_on_success = _check_policy(commit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _RequestUnit(
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
        await request.end(_ErrorResponse("no response started in the request's task"))
