"""The allocation service over HTTP, with FastAPI: ``uvicorn --factory allocation.fastapi_app:create_app``.

The allocation unit of work is sync, so the endpoints are ``def`` functions,
which FastAPI runs in its thread pool. A sync unit of work belongs to the
thread that enters it, so a dependency does not enter it for the endpoint
(``uow.fastapi.depends()`` takes async units of work only): the ``UnitOfWork``
dependency gives the endpoint a new, idle one, and each service the endpoint
calls enters it and commits, in the endpoint's thread, before the response
starts. The message bus hands the events of each commit to their handlers,
so shrinking a batch reallocates its order lines, each reallocation a
commit of its own.

The endpoints and their answers are those of :mod:`allocation.flask_app`:

* ``POST /add_batch`` with ``ref``, ``sku``, ``qty`` and ``eta`` (a date or
  ``null``): 201 ``{"ref": ...}``; 409 for a reference that exists already,
  400 for a quantity under 1.
* ``POST /allocate`` with ``orderid``, ``sku`` and ``qty``: 201
  ``{"batchref": ...}``, ``null`` when no batch can take the line; 400 for an
  unknown SKU or a quantity under 1.
* ``POST /change_batch_quantity`` with ``ref`` and ``qty``: 200
  ``{"ref": ..., "qty": ...}``; 404 for an unknown batch, 400 for a negative
  quantity.

A commit that the database refuses because a concurrent request got there
first (a unique constraint, or the product's version counter) gives a 409.
Errors, including FastAPI's own 404, 405 and 500, come as
``{"message": ...}``, except for a body that does not match, which gets
FastAPI's 422 with its ``detail``.

The app builds its engine when it is created; its lifespan creates the
tables if they are missing, as ``python -m allocation`` does, and disposes
of the engine at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from uow.errors import QueryError

from . import config, messagebus, orm, services
from .domain import AllocationRequired, BatchQuantityChanged, InvalidQuantity
from .unit_of_work import AllocationUnitOfWork, SqlAlchemyAllocationUnitOfWork

__all__ = ["UnitOfWork", "create_app", "new_uow", "router"]

#: The endpoints.
router = APIRouter()


def create_app(database_url: str | None = None) -> FastAPI:
    """The allocation app on *database_url*, or else on :func:`allocation.config.database_url`'s choice."""
    engine = config.make_engine(config.database_url(database_url))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(orm.metadata.create_all, engine)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(title="allocation", lifespan=lifespan)
    app.state.engine = engine
    app.include_router(router)
    app.add_exception_handler(services.InvalidSku, _error_handler(400))
    app.add_exception_handler(InvalidQuantity, _error_handler(400))
    app.add_exception_handler(QueryError, _error_handler(400))
    app.add_exception_handler(services.UnknownBatch, _error_handler(404))
    app.add_exception_handler(services.DuplicateBatch, _error_handler(409))
    # The services commit in the endpoint, so what the database refuses at COMMIT reaches these handlers.
    for conflict in (IntegrityError, StaleDataError):
        app.add_exception_handler(
            conflict, _error_handler(409, "the request conflicts with a concurrent change; try again")
        )
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(500, _error_handler(500, "internal server error"))
    return app


def new_uow(request: Request) -> SqlAlchemyAllocationUnitOfWork:
    """A new, idle unit of work on the app's engine; each service the endpoint calls enters it."""
    engine = request.app.state.engine
    assert isinstance(engine, Engine), engine
    return SqlAlchemyAllocationUnitOfWork(engine)


#: The endpoints' unit of work; a test may replace it: ``app.dependency_overrides[new_uow] = ...``.
UnitOfWork = Annotated[AllocationUnitOfWork, Depends(new_uow)]


class BatchIn(BaseModel):
    ref: str
    sku: str
    qty: int
    eta: date | None = None


class OrderLineIn(BaseModel):
    orderid: str
    sku: str
    qty: int


class BatchQuantityIn(BaseModel):
    ref: str
    qty: int


@router.post("/add_batch", status_code=201)
def add_batch(batch: BatchIn, uow: UnitOfWork) -> dict[str, str]:
    services.add_batch(batch.ref, batch.sku, batch.qty, batch.eta, uow)
    return {"ref": batch.ref}


@router.post("/allocate", status_code=201)
def allocate(line: OrderLineIn, uow: UnitOfWork) -> dict[str, str | None]:
    batchref = messagebus.handle(AllocationRequired(line.orderid, line.sku, line.qty), uow)[0]
    return {"batchref": batchref if isinstance(batchref, str) else None}


class BatchOut(BaseModel):
    ref: str
    sku: str
    qty: int
    eta: date | None


class BatchPage(BaseModel):
    items: list[BatchOut]
    total: int
    next: str | None


@router.get("/batches")
def batches(uow: UnitOfWork, sku: str, limit: int = 20, after: str | None = None) -> BatchPage:
    """A page of the batches of a SKU: ``?sku=...&limit=...&after=...``."""
    page = services.batches_of(sku, uow, limit=limit, after=after)
    items = [BatchOut(ref=b.reference, sku=b.sku, qty=b.purchased_quantity, eta=b.eta) for b in page.items]
    return BatchPage(items=items, total=page.total, next=page.next)


@router.post("/change_batch_quantity")
def change_batch_quantity(change: BatchQuantityIn, uow: UnitOfWork) -> dict[str, str | int]:
    messagebus.handle(BatchQuantityChanged(change.ref, change.qty), uow)
    return {"ref": change.ref, "qty": change.qty}


def _error_handler(status: int, message: str | None = None) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """An exception handler that answers *status* with *message*, or else the error's own."""

    async def handler(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"message": str(error) if message is None else message}, status_code=status)

    return handler


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own errors (an unknown path, a wrong method) as ``{"message": ...}``."""
    assert isinstance(error, HTTPException), error
    return JSONResponse({"message": error.detail}, status_code=error.status_code, headers=error.headers)
