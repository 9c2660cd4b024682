"""A finished block leaves nothing for the garbage collector: its scope, transaction and session are freed at once.

A reference cycle through a scope (a scope that points to itself, or a kept
frame that points back to the unit of work) keeps the whole transaction,
with its session and identity map, alive until the collector runs: on a
busy service that costs more than the rest of uow together.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.support.models import Item, Sku
from tests.support.uows import SqlAlchemyShopUnitOfWork
from uow import NEW_UOW, transactional


def block(unit: SqlAlchemyShopUnitOfWork, n: int) -> None:
    with unit:
        unit.items.add(Item(f"block {n}"))
        unit.commit()


def nested(unit: SqlAlchemyShopUnitOfWork, n: int) -> None:
    with unit:
        with unit:
            unit.items.add(Item(f"joined {n}"))
        with unit.savepoint():
            unit.skus.add(Sku(f"savepoint {n}"))
        unit.commit()


def names(unit: SqlAlchemyShopUnitOfWork) -> Iterator[str]:
    with unit:
        for item in unit.items.list():
            yield item.name


def with_a_paused_generator(unit: SqlAlchemyShopUnitOfWork, n: int) -> None:
    with unit:
        stream = names(unit)
        next(stream, None)
        unit.items.add(Item(f"streamed {n}"))
        unit.commit()
    stream.close()


def decorated(unit: SqlAlchemyShopUnitOfWork, n: int) -> None:
    @transactional(factory=lambda: SqlAlchemyShopUnitOfWork(unit.session_factory))
    def add(name: str, uow: SqlAlchemyShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    add(f"decorated {n}")


SHAPES: dict[str, Callable[[SqlAlchemyShopUnitOfWork, int], None]] = {
    "block": block,
    "joined and savepoint": nested,
    "paused generator": with_a_paused_generator,
    "decorated": decorated,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_finished_blocks_leave_no_cycles(engine: Engine, shape: str) -> None:
    """After 50 blocks, the collector finds no scope, transaction or session of uow's among the garbage."""
    run = SHAPES[shape]
    unit = SqlAlchemyShopUnitOfWork(engine)
    run(unit, -1)  # warm up: imports and caches of the first call
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        for n in range(50):
            run(unit, n)
        gc.collect()
        kept: list[Any] = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    names_kept = sorted(
        {type(obj).__name__ for obj in kept if type(obj).__name__ in ("_Scope", "_Transaction", "Session")}
    )
    assert [] == names_kept
    assert not unit.active
