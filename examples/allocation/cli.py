"""``python -m allocation``: a short end-to-end run of the allocation service.

It creates the tables if they are missing, adds batches, allocates orders,
shrinks a batch so that an order is reallocated through its domain event,
and prints what happened. Every run uses SKUs and references of its own, so
it can run again and again on the same database.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable, Sequence
from datetime import date, timedelta

from sqlalchemy import Engine, make_url

from . import config, messagebus, orm, services
from .domain import AllocationRequired, BatchQuantityChanged
from .unit_of_work import AllocationUnitOfWork, SqlAlchemyAllocationUnitOfWork

__all__ = ["main", "run_scenario"]

Output = Callable[[str], None]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m allocation",
        description="Run a short allocation scenario against a database.",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="SQLAlchemy database URL (default: $DATABASE_URL, else an SQLite file in the temporary directory)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario on the database chosen by ``--database`` or ``$DATABASE_URL``."""
    args = _parser().parse_args(argv)
    url = make_url(config.database_url(args.database))
    print(f"database: {url.render_as_string(hide_password=True)}")
    engine = config.make_engine(url)
    try:
        run_scenario(engine, print)
    finally:
        engine.dispose()
    return 0


def _allocate(orderid: str, sku: str, qty: int, uow: AllocationUnitOfWork, out: Output) -> None:
    batchref = messagebus.handle(AllocationRequired(orderid, sku, qty), uow)[0]
    if batchref is None:
        out(f"out of stock: {orderid} ({qty} x {sku}) was not allocated")
    else:
        out(f"allocated {orderid} ({qty} x {sku}) to {batchref}")


def _allocations(sku: str, uow: AllocationUnitOfWork) -> dict[str, str]:
    """The batch reference of each allocated order of *sku*."""
    with uow:
        product = uow.products.get(sku)
        assert product is not None
        return {line.orderid: batch.reference for batch in product.batches for line in batch.allocations}


def _report(sku: str, uow: AllocationUnitOfWork, out: Output) -> None:
    with uow:
        product = uow.products.get(sku)
        assert product is not None
        for batch in product.batches:
            orders = ", ".join(line.orderid for line in batch.allocations) or "none"
            out(
                f"  {batch.reference}: {batch.available_quantity} of {batch.purchased_quantity} "
                f"available; orders: {orders}"
            )


def run_scenario(engine: Engine, out: Output = print) -> None:
    """Run the scenario on *engine*, writing one line per step to *out*."""
    orm.metadata.create_all(engine)
    uow = SqlAlchemyAllocationUnitOfWork(engine)
    run = secrets.token_hex(4)
    table, lamp = f"SMALL-TABLE-{run}", f"BLUE-LAMP-{run}"
    stock, shipment, lamps = f"stock-{run}", f"shipment-{run}", f"lamps-{run}"
    eta = date.today() + timedelta(days=14)
    out(f"run: {run}")

    services.add_batch(stock, table, 20, None, uow)
    out(f"added batch {stock}: 20 x {table} in the warehouse")
    services.add_batch(shipment, table, 100, eta, uow)
    out(f"added batch {shipment}: 100 x {table} arriving {eta.isoformat()}")
    services.add_batch(lamps, lamp, 5, None, uow)
    out(f"added batch {lamps}: 5 x {lamp} in the warehouse")

    _allocate(f"order-{run}-1", table, 10, uow, out)
    _allocate(f"order-{run}-2", table, 8, uow, out)
    _allocate(f"order-{run}-3", lamp, 5, uow, out)
    _allocate(f"order-{run}-4", lamp, 1, uow, out)

    before = _allocations(table, uow)
    messagebus.handle(BatchQuantityChanged(stock, 10), uow)
    out(f"changed batch {stock} to 10 units")
    after = _allocations(table, uow)
    for orderid, old in before.items():
        new = after.get(orderid)
        if new is None:
            out(f"out of stock: {orderid} lost its allocation in {old}")
        elif new != old:
            out(f"reallocated {orderid} from {old} to {new}")

    out("batches:")
    _report(table, uow, out)
    _report(lamp, uow, out)
