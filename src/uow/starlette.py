"""Starlette integration: a unit of work for each HTTP request, from a pure ASGI middleware.

:class:`UnitOfWorkMiddleware` enters a new unit of work around each HTTP
request and makes it the current one, so that the endpoint and the code it
awaits reach it through :func:`uow.current` and join it from
``@uow.transactional`` functions. The unit of work ends, committed or rolled
back as the commit policy says, before the response starts: a commit that
fails becomes a 500, never a 2xx with lost data. The response's background
tasks run after it ended, so they get units of work of their own.

Importing this module imports Starlette; importing :mod:`uow` does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal, get_args

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._async_unit_of_work import AsyncBlock, AsyncUnitOfWork
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError, OwnershipError, _shown

__all__ = ["CommitPolicy", "UnitOfWorkMiddleware"]

CommitPolicy = Literal["explicit", "on_success"]
"""When the request's unit of work commits.

``"explicit"``: only when the code calls ``commit()``; whatever it did not
commit is rolled back. ``"on_success"``: also when the request succeeds, as
a ``@uow.transactional`` function commits on normal return.
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


class UnitOfWorkMiddleware:
    """Give each HTTP request a unit of work of its own, current for the endpoint.

    ``Middleware(UnitOfWorkMiddleware, factory=make_uow, commit="on_success")``.
    *factory* is called with no arguments for each HTTP request and returns a
    new :class:`uow.AsyncUnitOfWork`; the middleware enters it as the owner
    before calling the application, so the endpoint reaches it through
    ``uow.current()`` and ``@uow.transactional`` functions join it.

    The unit of work ends when the request's task starts the response, before
    the ``http.response.start`` message is passed on: with
    ``commit="on_success"`` it commits if the status is below 400 and rolls
    back otherwise; with ``commit="explicit"`` (the default) it rolls back
    whatever the endpoint did not commit. If the commit fails, the response
    does not start and the error propagates, so the server answers 500. An
    exception, a cancellation, or a client that went away rolls it back, and
    the connection goes back to the pool. Background tasks and response
    bodies run after it ended.

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
        commit_on_success = self._commit_on_success

        async def send_after_the_unit_of_work(message: Message) -> None:
            if message["type"] == "http.response.start" and request.open:
                if request.here():
                    status = int(message["status"])
                    await request.end(None if status < 400 else _ErrorResponse(status))
                elif not commit_on_success:
                    # The request has answered: its background tasks, which the request's task runs after
                    # this response, must get transactions of their own, not the request's.
                    request.unit._seal()
                else:
                    msg = (
                        "UnitOfWorkMiddleware cannot commit before this response starts: another task than the "
                        "request's is sending it (Starlette sends streaming and file responses from a task of "
                        "their own on servers older than ASGI 2.4), and only the request's task may use its unit "
                        "of work. Commit in the endpoint and use commit='explicit' for such routes, or mount "
                        "them outside the middleware"
                    )
                    raise OwnershipError(msg)
            await send(message)

        await request.begin()
        try:
            await self.app(scope, receive, send_after_the_unit_of_work)
        except BaseException as error:
            await request.end(error)
            raise
        # The application returned without starting a response (the server answers 500), or another task
        # sent it: nothing says the request succeeded, so roll back.
        await request.end(_ErrorResponse("no response started in the request's task"))
