"""Optimistic-lock conflicts surface as uow.errors.ConcurrencyError, sync and async, and are retried."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm.exc import StaleDataError

import uow
from tests.support.fidelity import AsyncFakeFidelityUnitOfWork, FakeFidelityUnitOfWork, Stock
from uow import errors


def test_a_stale_commit_raises_concurrency_error_caused_by_stale_data() -> None:
    """commit() of a row another transaction moved on raises ConcurrencyError, a StaleDataError with that cause."""
    unit = FakeFidelityUnitOfWork()
    with unit:
        unit.stocks.add(Stock(sku="lamp", qty=10))
        unit.commit()
    with unit:
        stale = unit.stocks.get("lamp")
        with unit.transaction(propagation="requires_new"):
            unit.stocks.get("lamp").qty = 7
            unit.commit()
        stale.qty = 5
        with pytest.raises(errors.ConcurrencyError, match="Run the unit of work again") as raised:
            unit.commit()
    assert isinstance(raised.value, StaleDataError)
    assert isinstance(raised.value.__cause__, StaleDataError)
    assert not isinstance(raised.value.__cause__, errors.ConcurrencyError)
    assert errors.is_retryable(raised.value)


async def test_an_async_block_turns_a_stale_autoflush_into_concurrency_error() -> None:
    """A StaleDataError leaving an async block is raised as ConcurrencyError, once, with it as the cause."""
    unit = AsyncFakeFidelityUnitOfWork()
    async with unit:
        await unit.stocks.add(Stock(sku="lamp", qty=10))
        await unit.commit()
    with pytest.raises(errors.ConcurrencyError) as raised:
        async with unit:
            stale = await unit.stocks.get("lamp")
            async with unit.transaction(propagation="requires_new"):
                (await unit.stocks.get("lamp")).qty = 7
                await unit.commit()
            stale.qty = 5
            async with unit.transaction():  # a joined scope: the error passes through two exits
                await unit.stocks.list()
    cause = raised.value.__cause__
    assert isinstance(cause, StaleDataError)
    assert not isinstance(cause, errors.ConcurrencyError)


def test_transactional_retries_a_concurrency_error() -> None:
    """@transactional(retries=1) runs the service again after a ConcurrencyError, and the second run commits."""
    unit = FakeFidelityUnitOfWork()
    with unit:
        unit.stocks.add(Stock(sku="lamp", qty=10))
        unit.commit()
    rival = FakeFidelityUnitOfWork()
    rival.database = unit.database  # another process's unit of work, on the same database

    def take_one() -> None:
        with rival:
            rival.stocks.get("lamp").qty -= 1
            rival.commit()

    attempts: list[int] = []

    @uow.transactional(retries=uow.Retry(retries=1, sleep=lambda _: None))
    def take_two(uow: FakeFidelityUnitOfWork) -> None:
        stock = uow.stocks.get("lamp")
        if not attempts:  # the first attempt loses a race to a transaction that commits meanwhile
            racer = threading.Thread(target=take_one)
            racer.start()
            racer.join()
        attempts.append(stock.qty)
        stock.qty -= 2

    take_two(uow=unit)
    assert [10, 9] == attempts
    with unit:
        assert 7 == unit.stocks.get("lamp").qty
