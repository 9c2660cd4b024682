"""The allocation service over HTTP, with Flask: ``flask --app allocation.flask_app run``.

Each request has a unit of work of its own, given by
:class:`uow.flask.UnitOfWorkExtension` with the ``on_success`` policy. The
views pass it to the services and to the message bus, whose ``with uow:``
blocks join it: a request commits once, when its response is a 2xx or a 3xx,
and rolls back otherwise. A commit that fails gives a 500, or a 409 when
the database refused it because a concurrent request got there first (a
unique constraint, or the product's version counter).

Domain events go to the bus after that commit. While the request runs, the
services' commits are part of the request's transaction, so no event is
collected yet; an ``on_commit`` hook hands the events of the committed work
to :func:`allocation.messagebus.handle`, in a unit of work of its own. When
a batch shrinks, for instance, the request commits the change, and then the
bus reallocates the order lines that came off it.

* ``POST /add_batch`` with ``ref``, ``sku``, ``qty`` and ``eta`` (a date or
  ``null``): 201 ``{"ref": ...}``; 409 for a reference that exists already,
  400 for a quantity under 1.
* ``POST /allocate`` with ``orderid``, ``sku`` and ``qty``: 201
  ``{"batchref": ...}``, ``null`` when no batch can take the line; 400 for an
  unknown SKU or a quantity under 1.
* ``POST /change_batch_quantity`` with ``ref`` and ``qty``: 200
  ``{"ref": ..., "qty": ...}``; 404 for an unknown batch, 400 for a negative
  quantity.

A body that is not a JSON object with these fields gets a 400. Errors,
including Flask's own (404, 405, 500), come as ``{"message": ...}``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from datetime import date
from typing import TypeVar

from flask import Blueprint, Flask, request
from flask.typing import ResponseReturnValue
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError
from werkzeug.exceptions import BadRequest, HTTPException, InternalServerError

from uow.errors import QueryError
from uow.flask import UnitOfWorkExtension

from . import config, messagebus, orm, services
from .domain import AllocationRequired, Batch, BatchQuantityChanged, Event, InvalidQuantity
from .unit_of_work import AllocationUnitOfWork, SqlAlchemyAllocationUnitOfWork

__all__ = ["api", "create_app", "ext"]

T = TypeVar("T")

#: The unit of work of each request; ``ext.engine`` is the current app's engine.
ext: UnitOfWorkExtension[AllocationUnitOfWork] = UnitOfWorkExtension(
    factory=SqlAlchemyAllocationUnitOfWork, commit="on_success"
)

#: The endpoints.
api = Blueprint("allocation", __name__)


def create_app(database_url: str | None = None) -> Flask:
    """The allocation app on *database_url*, or else on :func:`allocation.config.database_url`'s choice.

    It creates the tables if they are missing, as ``python -m allocation``
    does.
    """
    url = config.database_url(database_url)
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = url
    app.config["UOW_ENGINE_OPTIONS"] = config.engine_options(url)
    ext.init_app(app)
    app.register_blueprint(api)
    with app.app_context():
        orm.metadata.create_all(ext.engine)
    return app


# -- endpoints -------------------------------------------------------------------


@api.post("/add_batch")
def add_batch() -> ResponseReturnValue:
    body = _body()
    ref = _field(body, "ref", str)
    services.add_batch(ref, _field(body, "sku", str), _field(body, "qty", int), _eta(body), ext.uow)
    return {"ref": ref}, 201


@api.post("/allocate")
def allocate() -> ResponseReturnValue:
    body = _body()
    event = AllocationRequired(_field(body, "orderid", str), _field(body, "sku", str), _field(body, "qty", int))
    batchref = _handle(event)[0]
    return {"batchref": batchref}, 201


@api.get("/batches")
def batches() -> ResponseReturnValue:
    """A page of the batches of a SKU: ``?sku=...&limit=...&after=...``."""
    sku = request.args.get("sku")
    if not sku:
        raise BadRequest("the query string needs sku=")
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit must be a whole number") from None
    page = services.batches_of(sku, ext.uow, limit=limit, after=request.args.get("after"))
    return {"items": [_batch(batch) for batch in page.items], "total": page.total, "next": page.next}, 200


@api.post("/change_batch_quantity")
def change_batch_quantity() -> ResponseReturnValue:
    body = _body()
    ref, qty = _field(body, "ref", str), _field(body, "qty", int)
    _handle(BatchQuantityChanged(ref, qty))
    return {"ref": ref, "qty": qty}, 200


#: What the database refuses when a concurrent request got there first; trying again may succeed.
_CONFLICTS = (IntegrityError, StaleDataError)
_CONFLICT_MESSAGE = "the request conflicts with a concurrent change; try again"


@api.errorhandler(services.InvalidSku)
@api.errorhandler(InvalidQuantity)
@api.errorhandler(QueryError)
def invalid_request(error: Exception) -> ResponseReturnValue:
    return {"message": str(error)}, 400


@api.errorhandler(services.UnknownBatch)
def unknown_batch(error: services.UnknownBatch) -> ResponseReturnValue:
    return {"message": str(error)}, 404


@api.errorhandler(services.DuplicateBatch)
def duplicate_batch(error: services.DuplicateBatch) -> ResponseReturnValue:
    return {"message": str(error)}, 409


@api.errorhandler(IntegrityError)
@api.errorhandler(StaleDataError)
def conflict(error: Exception) -> ResponseReturnValue:
    return {"message": _CONFLICT_MESSAGE}, 409


@api.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> ResponseReturnValue:
    """Flask's own errors as JSON, a 500 included.

    A commit that fails after the view, in the extension's ``after_request``
    function, and that no handler answered, arrives here as the original
    exception of a 500: a conflict is still a 409.
    """
    if isinstance(error, InternalServerError):
        if isinstance(error.original_exception, _CONFLICTS):
            return conflict(error.original_exception)
        return {"message": "internal server error"}, 500
    return {"message": error.description}, error.code or 500


def _batch(batch: Batch) -> dict[str, object]:
    eta = batch.eta
    return {"ref": batch.reference, "sku": batch.sku, "qty": batch.purchased_quantity, "eta": eta and eta.isoformat()}


# -- the message bus -------------------------------------------------------------


def _handle(message: Event) -> list[object]:
    """Handle *message* in the request's unit of work; the events of its work go to the bus after the commit."""
    unit = ext.uow
    results = messagebus.handle(message, unit)
    # robust: the request's work is committed whatever a handler does; a failure is logged on the "uow" logger.
    unit.on_commit(functools.partial(_handle_committed_events, unit, ext.engine), robust=True)
    return results


def _handle_committed_events(unit: AllocationUnitOfWork, engine: Engine) -> None:
    """Hand the events of *unit*'s committed work to the bus, in a unit of work of their own."""
    bus_uow = SqlAlchemyAllocationUnitOfWork(engine)
    for event in unit.collect_new_events():
        if isinstance(event, Event):
            messagebus.handle(event, bus_uow)


# -- reading the body ------------------------------------------------------------


def _body() -> Mapping[str, object]:
    body = request.get_json()
    if not isinstance(body, dict):
        msg = "the body must be a JSON object"
        raise BadRequest(msg)
    return body


def _field(body: Mapping[str, object], name: str, kind: type[T]) -> T:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        msg = f"{name} must be {'an integer' if kind is int else 'a string'}"
        raise BadRequest(msg)
    return value


def _eta(body: Mapping[str, object]) -> date | None:
    eta = body.get("eta")
    if eta is None:
        return None
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            return date.fromisoformat(eta)
    msg = "eta must be null or a date, YYYY-MM-DD"
    raise BadRequest(msg)
