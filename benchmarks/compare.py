"""uow now against uow at an earlier revision, in one process: the before and after of a change.

Run from the repository root::

    python benchmarks/compare.py 24e13a1            # the working tree against that revision
    python benchmarks/compare.py v0.1.0 --rounds 60

The earlier revision's ``src/uow`` is read with ``git archive`` into a
temporary directory and imported under the name ``uow_baseline``, so that
both versions run side by side, on the same engine and the same SQLite
database in memory, in interleaved rounds with a rotating order. Separate
runs of ``run.py`` move by about 1% from process to process; measured in the
same process, the two versions' ratios to raw SQLAlchemy can be compared.
The service call is ``run.py``'s, through a repository and through
``@transactional``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sqlalchemy import create_engine, insert
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

sys.path.insert(0, os.path.dirname(__file__))
import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baseline(revision: str, into: str) -> ModuleType:
    """uow at *revision*, imported as ``uow_baseline`` from a copy in *into*."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "src/uow"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    os.rename(os.path.join(into, "src", "uow"), os.path.join(into, "uow_baseline"))
    sys.path.insert(0, into)
    return importlib.import_module("uow_baseline")


def service_calls(lib: Any, factory: sessionmaker[Any]) -> dict[str, Callable[[int], None]]:
    """The service call through *lib*'s repository and through its decorator."""

    class Shop(lib.UnitOfWork):  # type: ignore[name-defined,misc]
        products = lib.repository(run.Product)
        order_lines = lib.repository(run.OrderLine)

    class SqlShop(lib.SqlAlchemyUnitOfWork, Shop):  # type: ignore[name-defined,misc]
        pass

    shared = SqlShop(factory)

    def repository(product_id: int) -> None:
        with shared:
            product = shared.products.get(product_id)
            product.stock -= 1
            shared.order_lines.add(run.OrderLine(product_id, 1))
            shared.commit()

    @lib.transactional(factory=lambda: SqlShop(factory))
    def decorated(product_id: int, uow: Shop = lib.NEW_UOW) -> None:
        product = uow.products.get(product_id)
        product.stock -= 1
        uow.order_lines.add(run.OrderLine(product_id, 1))

    return {"repository": repository, "@transactional": decorated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the git revision to compare with, e.g. a commit or a tag")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (40)")
    parser.add_argument("--batch", type=int, default=400, help="calls per variant and round (400)")
    args = parser.parse_args()

    engine = create_engine("sqlite://", poolclass=StaticPool)
    run.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(run.products_table), [{"name": f"p{n}", "stock": run.INITIAL_STOCK} for n in range(1, 101)]
        )
    factory = sessionmaker(engine, expire_on_commit=False)

    def raw(product_id: int) -> None:
        with factory.begin() as session:
            product = session.get(run.Product, product_id)
            product.stock -= 1
            session.add(run.OrderLine(product_id, 1))

    with tempfile.TemporaryDirectory() as directory:
        before = baseline(args.revision, directory)
        import uow

        variants: dict[str, Callable[[int], None]] = {"raw SQLAlchemy": raw}
        for label, lib in ((args.revision, before), ("working tree", uow)):
            for name, call in service_calls(lib, factory).items():
                variants[f"uow {name} ({label})"] = call
        names = list(variants)
        times: dict[str, list[float]] = {name: [] for name in names}
        for call in variants.values():
            for n in range(300):
                call(n % 100 + 1)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                call = variants[name]
                started = time.perf_counter()
                for n in range(args.batch):
                    call(n % 100 + 1)
                times[name].append((time.perf_counter() - started) / args.batch * 1e6)

    raw_median = statistics.median(times["raw SQLAlchemy"])
    print(f"SQLite in memory, {args.rounds} interleaved rounds of {args.batch} calls, median per call:")
    for name in names:
        median = statistics.median(times[name])
        print(f"  {name:44} {median:7.1f} us  {median / raw_median:.3f}x raw")


if __name__ == "__main__":
    main()
