"""What the Starlette middleware and the Litestar plugin share: pure ASGI, importing neither framework.

The request's unit of work (:class:`RequestUnit`), the commit policy, the
checks of what a factory returns, and :class:`Exchange`: how another task of
the request asks the request's task, which alone may end the unit of work,
to end it while that task waits for the client in ``receive()``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal, get_args, get_type_hints

from ._async_unit_of_work import AsyncBlock, AsyncUnitOfWork
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError, OwnershipError, _shown

#: An ASGI message. Starlette types it as a mapping and Litestar as typed dicts: this module reads only its
#: ``type`` and ``more_body``, and hands it on unchanged.
Message = Any
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CommitPolicy = Literal["explicit", "on_success"]
"""When the request's unit of work commits.

``"explicit"``: only when the code calls ``commit()``; whatever it did not
commit is rolled back. ``"on_success"``: also when the request succeeds: no
exception reached uow, and the response status is below 400.
"""

_POLICIES: tuple[str, ...] = get_args(CommitPolicy)


def check_policy(commit: object) -> bool:
    """Whether *commit* asks to commit on success; raise ConfigurationError if it is no policy."""
    if commit not in _POLICIES:
        msg = f"commit must be one of {', '.join(map(repr, _POLICIES))}, not {commit!r}"
        raise ConfigurationError(msg)
    return commit == "on_success"


def check_unit(unit: object, source: str, *, sync_thread: str, advice: str) -> AsyncUnitOfWork:
    """The unit of work that *source* returned, checked: async, and idle.

    A sync one is refused: the thread that runs *sync_thread* could not use
    it, and *advice* says what to do instead.
    """
    if isinstance(unit, UnitOfWork):
        msg = (
            f"{source} returned the sync {type(unit).__name__}, which a request cannot own: the event loop would "
            f"enter it, and the thread that runs {sync_thread} could not use it. {advice}"
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


def declared_sync_unit(factory: Callable[..., Any]) -> type[UnitOfWork] | None:
    """The sync unit of work class that *factory* is declared to return, if its annotation says so."""
    try:
        routine = inspect.isfunction(factory) or inspect.ismethod(factory)
        returns = get_type_hints(factory).get("return") if routine else None
    except Exception:  # an annotation that does not resolve here: the first request checks the unit
        return None
    if isinstance(returns, type) and issubclass(returns, UnitOfWork):
        return returns
    return None


class ErrorResponse(Exception):
    """Handed to the unit of work's exit, never raised: the response says the request failed."""


def outcome(status: int | None) -> ErrorResponse | None:
    """What ends the request's unit of work for a response of *status*: nothing (success) below 400."""
    return None if status is None or status < 400 else ErrorResponse(status)


class RequestUnit:
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


class CommitFailed(Exception):
    """Raised from ``send`` instead of starting a response whose unit of work failed to commit.

    It unwinds the application, which must not run the response's background
    tasks; the middleware catches what comes out and answers the request.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the request's unit of work failed to commit: {type(error).__name__}: {error}")
        self.error = error


class Exchange:
    """One request through the middleware: its unit of work, and how its own tasks ask it to end.

    Only the request's task may end the unit of work. When another of the
    request's tasks starts the response, it asks the request's task, which
    meanwhile waits for the client in ``receive()``, to end it, and waits for
    the answer before the response goes on. Each integration says which
    tasks are the request's (:meth:`in_request`), and names itself and its
    streaming responses in the error that refuses the others.
    """

    __slots__ = ("_asked", "_body_read", "_pending", "_receive", "_send", "commit_on_success", "failure", "request")

    #: The middleware's name, as its users know it.
    owner: ClassVar[str]
    #: The responses that the framework sends from another task while the request's task waits for the client.
    waits_while: ClassVar[str]
    #: What to do instead when another task may not end the unit of work.
    instead: ClassVar[str]

    def __init__(self, request: RequestUnit, receive: Receive, send: Send, *, commit_on_success: bool) -> None:
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

    def in_request(self) -> bool:
        """Whether the code runs in one of the request's tasks: its own, or one that it (or one of those) started."""
        raise NotImplementedError

    async def _end(self, status: int) -> None:
        """End the unit of work for a response of *status*, in the request's task; raise CommitFailed if it fails."""
        try:
            await self.request.end(outcome(status))
        except Exception as error:
            self.failure = error
            raise CommitFailed(error) from error

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
        if self.in_request() and asked is not None and not asked.done():
            reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asked.set_result((status, reply))
            await reply
            return
        if not self.commit_on_success:
            # Nothing to commit: the response goes on, and the unit of work ends when the application returns.
            # The request has answered, so its background tasks get transactions of their own.
            self.request.unit._seal()
            return
        if not self.in_request():
            why = "a task that the request did not start is sending it"
        else:
            why = (
                "another task of the request is sending it while the request's task, which alone may use its "
                f"unit of work, is not waiting for the client (as it does while {self.waits_while})"
            )
        msg = (
            f"{self.owner} cannot commit before this response starts: {why}. Send the response from the "
            f"request's task, or {self.instead}"
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
                reply.set_exception(error if isinstance(error, CommitFailed) else CommitFailed(error))
            if not isinstance(error, CommitFailed):
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
        return failure if all(isinstance(leaf, CommitFailed) for leaf in _leaves(error)) else None


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
