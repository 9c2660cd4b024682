"""Chapter 11 without its hole: allocations reach the read model through the outbox, a relay and Redis Streams."""

from __future__ import annotations

import asyncio
import secrets

import redis
from sqlalchemy import Engine, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from allocation import orm, read_model, services
from allocation.unit_of_work import SqlAlchemyAllocationUnitOfWork
from tests.integration.allocation.conftest import Rows
from tests.support.databases import ASYNC_DRIVERS
from uow.brokers import RedisStreams
from uow.relay import Relay


def test_allocations_reach_the_read_model_once_through_the_relay_and_redis(
    engine: Engine, rows: Rows, redis_url: str
) -> None:
    """Allocate, relay to Redis, consume: the read model has each line's batch; copies sent again change nothing."""
    uow = SqlAlchemyAllocationUnitOfWork(engine)
    services.add_batch("b1", "LAMP", 10, None, uow)
    services.add_batch("b2", "DESK", 10, None, uow)
    assert "b1" == services.allocate("o1", "LAMP", 4, uow)
    assert "b2" == services.allocate("o1", "DESK", 1, uow)
    prefix = f"uow-test-{secrets.token_hex(4)}:"
    url = make_url(str(engine.url.render_as_string(hide_password=False)))
    async_url = url.set(drivername=ASYNC_DRIVERS[url.get_backend_name()])

    async def relay() -> int:
        async_engine = create_async_engine(async_url)
        broker = RedisStreams(redis_url, prefix=prefix)
        try:
            return await Relay(async_engine, orm.OUTBOX, broker).relay_once()
        finally:
            await broker.close()
            await async_engine.dispose()

    assert 2 == asyncio.run(relay())
    client = redis.Redis.from_url(redis_url)
    stream = prefix + read_model.STREAM
    try:
        assert 2 == read_model.consume(client, uow, prefix=prefix, block_ms=100)
        for _, fields in client.xrange(stream):  # delivered again, as after a crash before the acknowledgement
            read_model.add_allocation(fields[b"id"].decode(), fields[b"payload"], uow)
    finally:
        client.delete(stream)
        client.close()
    assert [("o1", "DESK", "b2"), ("o1", "LAMP", "b1")] == rows(
        "SELECT orderid, sku, batchref FROM allocations_view ORDER BY orderid, sku"
    )
    assert {"LAMP": "b1", "DESK": "b2"} == read_model.allocations_of("o1", uow)
