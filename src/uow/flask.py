"""Flask integration: a unit of work for each request, and for each application context.

::

    ext = UnitOfWorkExtension(factory=SqlAlchemyShopUnitOfWork, commit="on_success")

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["UOW_DATABASE_URL"] = "postgresql+psycopg://..."
        ext.init_app(app)  # or ext.init_app(app, engine=the_engine_the_app_already_has)
        return app

Views reach the request's unit of work as ``ext.uow``; services they call
reach it through ``uow.current()`` and ``@uow.transactional``, which joins it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar, cast, get_args

from flask import Flask, current_app, g, has_app_context, has_request_context, request
from flask.signals import request_started, request_tearing_down
from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import sessionmaker
from werkzeug.wrappers import Response

from ._sqlalchemy import _async_kinds
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError, InactiveUnitOfWorkError, RollbackOnlyError, _shown

__all__ = ["CommitPolicy", "UnitOfWorkExtension"]

log = logging.getLogger("uow")

U = TypeVar("U", bound=UnitOfWork)

CommitPolicy = Literal["explicit", "on_success"]
"""When the extension commits: never (the view calls ``commit()``), or on a 2xx or 3xx response."""

_POLICIES: tuple[str, ...] = get_args(CommitPolicy)

#: Where things are kept: the app's state in ``app.extensions``, the request's unit of work in the
#: request's WSGI environ, an application context's unit of work on ``flask.g``.
_EXTENSION_KEY = "uow"
_REQUEST_KEY = "uow.flask.unit"
_APP_CONTEXT_KEY = "_uow_flask_unit"
#: What is kept there once the extension's teardown function ended the unit of work, while the teardown
#: functions that run after it run...
_TEARING_DOWN = "tearing down"
#: ...and, for a request, once all of them ran: what runs then is a response body that Flask streams after
#: tearing the request down (``stream_with_context()`` pushes the request's context again for it).
_TORN_DOWN = "torn down"


class _AppState(Generic[U]):
    """What the extension keeps for one app: its engine (given, or built from its configuration), and its factory."""

    __slots__ = ("engine", "extension", "factory")

    def __init__(self, extension: UnitOfWorkExtension[U], engine: Engine, factory: Callable[[Engine], U]) -> None:
        self.extension = extension
        self.engine = engine
        self.factory = factory


class _Entry(Generic[U]):
    """A unit of work entered for a request or an application context."""

    __slots__ = ("ended", "handled", "state", "unit")

    def __init__(self, state: _AppState[U], unit: U, handled: BaseException | None) -> None:
        self.state = state
        self.unit = unit
        #: The exception being handled when the unit of work was entered, if any (see _ended_by).
        self.handled = handled
        #: Whether the extension has ended the unit of work's block.
        self.ended = False


class UnitOfWorkExtension(Generic[U]):
    """Give each request, and each application context, a unit of work of its own.

    *factory* builds a unit of work from the app's engine; a
    ``SqlAlchemyUnitOfWork`` subclass is such a factory. The engine is the
    one given to :meth:`init_app` as ``engine=``, or else one that
    :meth:`init_app` builds from ``app.config["UOW_DATABASE_URL"]``, with
    ``app.config["UOW_ENGINE_OPTIONS"]`` as keyword arguments of
    ``create_engine()``. An engine the extension built is disposed of when
    the app is garbage collected or the interpreter exits; an engine it was
    given is never disposed of by uow. Several apps may share one extension
    object.

    Each request gets a new unit of work, entered before the view runs, and
    ended when the request is torn down: whatever it has not committed is
    rolled back, and its session closed. An application context outside a
    request (a CLI command, ``with app.app_context():``) gets one when it
    first uses :attr:`uow`, ended when the context ends.

    *commit* is the commit policy. ``"explicit"``: the view calls
    ``uow.commit()``. ``"on_success"``: the extension commits when the
    response is a 2xx or a 3xx, in an ``after_request`` function, before the
    response is sent; a commit that fails goes to the app's error handlers,
    as an exception of the view would, and without one Flask answers 500. An
    application context outside a request commits when it ends without an
    exception.
    """

    def __init__(
        self, app: Flask | None = None, *, factory: Callable[[Engine], U], commit: CommitPolicy = "explicit"
    ) -> None:
        if commit not in _POLICIES:
            msg = f"commit must be one of {', '.join(map(repr, _POLICIES))}, not {commit!r}"
            raise ConfigurationError(msg)
        _check_factory(factory)
        #: Builds a unit of work from an app's engine; init_app() may give an app another one.
        self.factory = factory
        #: The commit policy, given as ``commit=``.
        self.commit_policy: CommitPolicy = commit
        if app is not None:
            self.init_app(app)

    def init_app(
        self, app: Flask, *, engine: Engine | None = None, factory: Callable[[Engine], U] | None = None
    ) -> None:
        """Set up *app*: its engine, and the extension's hooks.

        *engine*, if given, is the app's engine: one the application already
        has, shared with the rest of it, which uow never disposes of. The app
        must then have no ``UOW_DATABASE_URL`` nor ``UOW_ENGINE_OPTIONS``.
        Without it, the extension builds the app's engine from them, and
        disposes of it when the app is garbage collected or the interpreter
        exits.

        *factory*, if given, replaces the extension's factory for this app
        only: for example one that builds units of work from a sessionmaker
        the application already has, or returns a fake in a test.
        """
        if _EXTENSION_KEY in app.extensions:
            msg = (
                f"{app.name!r} already has a unit of work extension: call init_app() once per app, "
                "and use one UnitOfWorkExtension per app"
            )
            raise ConfigurationError(msg)
        if factory is not None:
            _check_factory(factory)
        if engine is None:
            engine = _build_engine(app)
            _dispose_with(app, engine)
        else:
            _check_given_engine(app, engine)
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.teardown_request(self._teardown_request)
        app.teardown_appcontext(self._teardown_appcontext)
        request_tearing_down.connect(_request_torn_down, app)
        request_started.connect(_nest_in_traced_requests, app)
        app.extensions[_EXTENSION_KEY] = _AppState(self, engine, factory or self.factory)

    @property
    def uow(self) -> U:
        """The unit of work of the current request, or else of the current application context.

        The request's is entered before the view runs. An application
        context outside a request gets its own on first use. Raises
        :class:`~uow.errors.InactiveUnitOfWorkError` outside any context, and
        once the context's unit of work was ended at its teardown.
        """
        if not has_app_context():
            msg = (
                "ext.uow was used outside an application context: use it in a view, a CLI command, "
                "or inside `with app.app_context():`. A response body that a generator streams runs after "
                "the view returned, outside the request: read what it needs in the view"
            )
            raise InactiveUnitOfWorkError(msg)
        state = self._state()
        if has_request_context():
            entry = self._request_entry(state, create=True)
            if entry is not None:
                return entry.unit
        return self._app_context_entry(state).unit

    @property
    def engine(self) -> Engine:
        """The engine of the current app, given to or built by :meth:`init_app`; needs an application context."""
        if not has_app_context():
            msg = "ext.engine needs an application context: use it inside `with app.app_context():`"
            raise InactiveUnitOfWorkError(msg)
        return self._state().engine

    # -- where the units of work are kept -------------------------------------

    def _state(self) -> _AppState[U]:
        state = current_app.extensions.get(_EXTENSION_KEY)
        if not isinstance(state, _AppState) or state.extension is not self:
            msg = f"this UnitOfWorkExtension was not set up for {current_app.name!r}: call ext.init_app(app) first"
            raise ConfigurationError(msg)
        return cast("_AppState[U]", state)

    def _request_entry(self, state: _AppState[U], *, create: bool) -> _Entry[U] | None:
        """The request's entry; None if it has none yet (and *create* is false) or another app's."""
        entry = request.environ.get(_REQUEST_KEY)
        if entry is _TEARING_DOWN:
            raise _used_in_a_later_teardown_function("request")
        if entry is _TORN_DOWN:
            raise _used_in_a_streamed_body()
        if entry is None:
            if not create:
                return None
            entry = request.environ[_REQUEST_KEY] = self._enter(state)
        if not isinstance(entry, _Entry) or entry.state is not state:
            return None  # another app's context was pushed inside this request
        return cast("_Entry[U]", entry)

    def _app_context_entry(self, state: _AppState[U]) -> _Entry[U]:
        entry = g.get(_APP_CONTEXT_KEY)
        if entry is _TEARING_DOWN:
            raise _used_in_a_later_teardown_function("application context")
        if entry is None:
            entry = self._enter(state)
            setattr(g, _APP_CONTEXT_KEY, entry)
        return cast("_Entry[U]", entry)

    def _enter(self, state: _AppState[U]) -> _Entry[U]:
        """Build a unit of work with the app's factory, and enter it."""
        unit = state.factory(state.engine)
        if not isinstance(unit, UnitOfWork):
            msg = (
                f"the unit of work factory returned {_shown(unit)}, not a uow.UnitOfWork: Flask views are "
                "synchronous, so the factory must build a sync unit of work"
            )
            raise ConfigurationError(msg)
        if unit.active:
            msg = (
                f"the unit of work factory returned {_shown(unit)}, which is already active: return a new "
                "unit of work on each call, or one that no request or context is using"
            )
            raise ConfigurationError(msg)
        # The policy decides how the extension's block ends: on_success commits on a clean exit.
        unit.autocommit = self.commit_policy == "on_success"
        unit.__enter__()
        return _Entry(state, unit, sys.exc_info()[1])

    # -- hooks -----------------------------------------------------------------

    def _before_request(self) -> None:
        self._request_entry(self._state(), create=True)

    def _after_request(self, response: Response) -> Response:
        """On a 2xx or 3xx response, under on_success, commit: a failure goes to the app's error handlers."""
        if self.commit_policy != "on_success" or not 200 <= response.status_code < 400:
            return response
        entry = self._request_entry(self._state(), create=False)
        if entry is None or entry.ended:
            return response
        entry.ended = True
        try:
            entry.unit.__exit__(None, None, None)
        except Exception as error:
            # As for an exception of the view: a handler registered for it answers (an IntegrityError
            # handler may answer 409); without one, it raises on, and Flask answers 500.
            app = current_app
            return app.make_response(app.handle_user_exception(error))
        return response

    # Teardown leaves a marker where the entry was: what uses ext.uow afterwards gets an error that says why,
    # instead of entering a unit of work that nothing would end.

    def _teardown_request(self, exc: BaseException | None) -> None:
        """Roll back what the request did not commit, and close its session; never raises."""
        entry = request.environ.get(_REQUEST_KEY)
        request.environ[_REQUEST_KEY] = _TEARING_DOWN
        if isinstance(entry, _Entry) and not entry.ended:
            entry.ended = True
            _discard(entry.unit, exc)

    def _teardown_appcontext(self, exc: BaseException | None) -> None:
        """End the application context's unit of work: commit under on_success if no exception ended it."""
        entry = g.get(_APP_CONTEXT_KEY)
        setattr(g, _APP_CONTEXT_KEY, _TEARING_DOWN)
        if not isinstance(entry, _Entry) or entry.ended:
            return
        entry.ended = True
        exc = exc if exc is not None else _ended_by(entry)
        if exc is None and self.commit_policy == "on_success":
            entry.unit.__exit__(None, None, None)  # a failed commit raises to whoever ends the context
        else:
            _discard(entry.unit, exc)


#: The module of OpenTelemetry's Flask instrumentation, whose hooks start and end a request's span.
_TRACING_MODULE = "opentelemetry.instrumentation.flask"


def _nest_in_traced_requests(sender: Flask, **extra: object) -> None:
    """Once per app, at its first request: begin each request's unit of work inside the request's span.

    OpenTelemetry's Flask instrumentation starts the request's span in a
    ``before_request`` function and ends it in a ``teardown_request`` one.
    Set up after the extension (``instrument_app(app)`` on an app that an
    app factory built), its functions would run after the extension's: the
    transaction's span would begin first and become the request span's
    parent, and the two would leave the context in the wrong order. So
    OpenTelemetry's two functions move, once, to just before the
    extension's in their lists: its ``before_request`` then runs right
    before the extension's, and its ``teardown_request`` right after it
    (Flask runs teardown functions last registered first). Every other
    function keeps its place. The lists are replaced, not changed in place,
    so a request running them meanwhile is not disturbed. Nothing moves when
    OpenTelemetry came first.
    """
    request_started.disconnect(_nest_in_traced_requests, sender)
    state = sender.extensions.get(_EXTENSION_KEY)
    if not isinstance(state, _AppState):
        return
    extension = state.extension
    for functions, ours in (
        (sender.before_request_funcs, extension._before_request),
        (sender.teardown_request_funcs, extension._teardown_request),
    ):
        moved = _traced_first(functions.get(None, []), ours)
        if moved is not None:
            functions[None] = moved


def _traced_first(functions: list[Any], ours: Any) -> list[Any] | None:
    """*functions* with OpenTelemetry's that come after *ours* moved to just before it; None if none does."""
    if ours not in functions:
        return None
    position = functions.index(ours)
    late = [function for function in functions[position + 1 :] if _traced(function)]
    if not late:
        return None
    rest = [function for function in functions if not any(function is traced for traced in late)]
    position = rest.index(ours)
    return [*rest[:position], *late, *rest[position:]]


def _traced(function: object) -> bool:
    return getattr(function, "__module__", None) == _TRACING_MODULE


def _request_torn_down(sender: Flask, **extra: object) -> None:
    """Flask ran all the request's teardown functions: what uses ext.uow from now on is a streamed body."""
    if request.environ.get(_REQUEST_KEY) is _TEARING_DOWN:
        request.environ[_REQUEST_KEY] = _TORN_DOWN


def _check_factory(factory: object) -> None:
    if not callable(factory):
        msg = (
            f"factory must be a callable that takes an Engine and returns a unit of work, such as a "
            f"SqlAlchemyUnitOfWork subclass, not {_shown(factory)}"
        )
        raise ConfigurationError(msg)


def _build_engine(app: Flask) -> Engine:
    """The engine built from *app*'s configuration."""
    url = app.config.get("UOW_DATABASE_URL")
    if not isinstance(url, (str, URL)) or not url:
        msg = (
            f"app.config['UOW_DATABASE_URL'] is {_shown(url)}: set it to the SQLAlchemy URL of the database "
            "before calling init_app(), or pass the engine the application already has as "
            "init_app(app, engine=...)"
        )
        raise ConfigurationError(msg)
    options = app.config.get("UOW_ENGINE_OPTIONS") or {}
    if not isinstance(options, Mapping):
        msg = f"app.config['UOW_ENGINE_OPTIONS'] must be a dict of create_engine() arguments, not {_shown(options)}"
        raise ConfigurationError(msg)
    try:
        return create_engine(url, **options)
    except (ArgumentError, TypeError) as error:
        msg = f"cannot build the engine of {app.name!r} from UOW_DATABASE_URL and UOW_ENGINE_OPTIONS: {error}"
        raise ConfigurationError(msg) from error


def _check_given_engine(app: Flask, engine: object) -> None:
    """Refuse what is not a sync Engine, and an engine given to an app that also configures one."""
    if isinstance(engine, _async_kinds()):
        msg = (
            f"init_app() was given {_shown(engine)}, which is async: Flask views are synchronous, so pass a "
            "sync Engine, made by create_engine()"
        )
        raise ConfigurationError(msg)
    if isinstance(engine, sessionmaker):
        msg = (
            f"init_app() takes the app's Engine as engine=, not {_shown(engine)}: to build units of work from "
            "a sessionmaker, pass factory=lambda engine: YourUnitOfWork(the_sessionmaker), with the engine it "
            "is bound to as engine="
        )
        raise ConfigurationError(msg)
    if not isinstance(engine, Engine):
        msg = (
            f"init_app() takes the app's Engine as engine=, not {_shown(engine)}: pass create_engine(url), "
            "or set app.config['UOW_DATABASE_URL'] and pass no engine"
        )
        raise ConfigurationError(msg)
    configured = [key for key in ("UOW_DATABASE_URL", "UOW_ENGINE_OPTIONS") if app.config.get(key)]
    if configured:
        msg = (
            f"init_app() was given an engine, and {app.name!r} also sets {' and '.join(configured)}: the engine "
            "would be used and the configuration ignored; remove the configuration, or pass no engine"
        )
        raise ConfigurationError(msg)


def _dispose_with(app: Flask, engine: Engine) -> None:
    """Dispose of *engine*, built for *app*, when the app is garbage collected or the interpreter exits.

    A process forked from this one (a preloading server's worker) gets a
    pool of its own, as SQLAlchemy recommends: the connections already
    pooled are the parent's, and the child never uses nor closes them.
    """
    weakref.finalize(app, _dispose, engine)
    if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
        # A registration cannot be undone: it holds the engine weakly, and does nothing once it is gone.
        os.register_at_fork(after_in_child=functools.partial(_forget_pool, weakref.ref(engine)))


def _dispose(engine: Engine) -> None:
    try:
        engine.dispose()
    except Exception:
        log.exception("uow: disposing of %r failed", engine)


def _forget_pool(ref: weakref.ref[Engine]) -> None:
    engine = ref()
    if engine is not None:
        engine.dispose(close=False)


def _used_in_a_later_teardown_function(where: str) -> InactiveUnitOfWorkError:
    msg = (
        f"ext.uow was used in a teardown function that runs after the extension's, which has already ended "
        f"the {where}'s unit of work: Flask runs teardown functions in the reverse order of registration, "
        "so register this one after calling init_app()"
    )
    return InactiveUnitOfWorkError(msg)


def _used_in_a_streamed_body() -> InactiveUnitOfWorkError:
    msg = (
        "ext.uow was used in a response body streamed after the request was torn down: Flask ends the "
        "request, and the extension its unit of work, before it streams the body; stream_with_context() gives "
        "the body the request's context back, not its unit of work. Read what the body needs in the view, "
        "before it returns the response, and stream from that"
    )
    return InactiveUnitOfWorkError(msg)


def _ended_by(entry: _Entry[Any]) -> BaseException | None:
    """The exception that is ending the context although Flask was not told of it, if any.

    Click before 8.3 ends the application context of a CLI command without
    passing it the command's exception; the exception is then the one being
    handled. One already handled when the unit of work was entered is not it.
    """
    handled = sys.exc_info()[1]
    return handled if handled is not None and handled is not entry.handled else None


def _discard(unit: UnitOfWork, exc: BaseException | None) -> None:
    """End *unit*'s block without committing: roll back, close; log what fails, never raise it."""
    unit.autocommit = False
    try:
        if exc is None:
            unit.__exit__(None, None, None)
        else:
            unit.__exit__(type(exc), exc, exc.__traceback__)
    except RollbackOnlyError:
        pass  # a joined scope failed and its error was caught: rolled back, as it would be anyway
    except Exception:
        log.exception("uow: ending %r at the end of a Flask context failed", unit)
