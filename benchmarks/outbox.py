"""The outbox on PostgreSQL: what one event costs a transaction, how fast relays send, how soon after the commit.

Run by ``run.py`` after its PostgreSQL measurements, in the same schema.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import run
from sqlalchemy import Engine, MetaData, delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import sessionmaker

import uow
from uow.relay import Broker, Record, Relay

outbox_metadata = MetaData()
OUTBOX = uow.Outbox(outbox_metadata)

#: Messages per throughput run, and the keys they are spread over.
RELAY_MESSAGES, RELAY_KEYS = 5_000, 100
#: The steady load of the latency run: messages per second, for this many seconds.
LATENCY_RATE, LATENCY_SECONDS = 200, 10


class PublishingShopUnitOfWork(run.SqlAlchemyShopUnitOfWork):
    outbox = OUTBOX


def measure_publish_cost(engine: Engine, plan: run.Plan) -> dict[str, float]:
    """µs per service call with and without one event published through the outbox; the median round ratio."""
    OUTBOX.table.create(engine, checkfirst=True)
    factory = sessionmaker(engine, expire_on_commit=False)
    plain, publishing = run.SqlAlchemyShopUnitOfWork(factory), PublishingShopUnitOfWork(factory)

    def without(product_id: int) -> None:
        run.place_order(plain, product_id)

    def with_event(product_id: int) -> None:
        with publishing:
            product = publishing.products.get(product_id)
            product.stock -= 1
            publishing.order_lines.add(run.OrderLine(product_id, 1))
            publishing.publish("orders.placed", {"product": product_id, "qty": 1}, key=str(product_id))
            publishing.commit()

    rounds = run.sample({"without": without, "with one event": with_event}, plan, "without")
    with engine.begin() as connection:
        connection.execute(delete(OUTBOX.table))
    base, value = rounds["without"], rounds["with one event"]
    return {
        "without": statistics.median(base),
        "with one event": statistics.median(value),
        "ratio": statistics.median(ours / theirs for ours, theirs in zip(value, base, strict=True)),
    }


def _fill(engine: Engine, count: int) -> None:
    messages = [
        (uow.Message("bench.orders", {"n": number}, key=f"k{number % RELAY_KEYS}"), b'{"n":%d}' % number)
        for number in range(count)
    ]
    with engine.begin() as connection:
        connection.execute(insert(OUTBOX.table), OUTBOX.rows(messages))


async def _work(relay: Relay) -> None:
    idle = 0
    while idle < 3:  # three empty passes in a row: nothing left that this relay could take
        idle = 0 if await relay.relay_once() else idle + 1


def _relay_process(schema: str, broker: str, prefix: str, ready: Any, start: Any, done: Any) -> None:
    """One relay in a process of its own, as relays run in production: ready, then drain from *start*."""

    async def main() -> None:
        async_engine = create_async_engine(
            run.ASYNCPG_URL, connect_args={"server_settings": {"search_path": schema}}, pool_size=2
        )
        sender = _broker(broker, prefix)
        relay = Relay(async_engine, OUTBOX, sender, batch_size=500)
        try:
            async with async_engine.connect():  # connected before the clock starts
                pass
            ready.release()
            await asyncio.to_thread(start.wait)
            await _work(relay)
        finally:
            await sender.close()
            await async_engine.dispose()
        done.release()

    asyncio.run(main())


def _broker(name: str, prefix: str) -> Broker:
    from uow.brokers import NatsJetStream, RabbitMQ, RedisStreams

    if name == "Redis Streams":
        return RedisStreams(prefix=prefix)
    if name.startswith("RabbitMQ"):
        return _Renamed(RabbitMQ(), f"{prefix}bench.orders")
    return NatsJetStream(prefix=prefix.replace(":", "."))


async def _drain(async_engine: AsyncEngine, schema: str, name: str, prefix: str, workers: int) -> float:
    """Seconds for *workers* relays, each in its own process (one: in this one), to send everything pending."""
    if workers == 1:
        broker = _broker(name, prefix)
        try:
            start = time.perf_counter()
            await _work(Relay(async_engine, OUTBOX, broker, batch_size=500))
            return time.perf_counter() - start
        finally:
            await broker.close()
    context = multiprocessing.get_context("spawn")
    ready, done, go = context.Semaphore(0), context.Semaphore(0), context.Event()
    processes = [
        context.Process(target=_relay_process, args=(schema, name, prefix, ready, go, done)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        await asyncio.to_thread(ready.acquire)
    start = time.perf_counter()
    go.set()
    for _ in processes:
        await asyncio.to_thread(done.acquire)
    elapsed = time.perf_counter() - start
    for process in processes:
        await asyncio.to_thread(process.join)
    return elapsed


async def _brokers(prefix: str) -> tuple[dict[str, Callable[[], Broker]], dict[str, str], Callable[[], Any]]:
    """The brokers reachable here, by name; the reason each other one is left out; and the cleanup of both."""
    from uow.brokers import NatsJetStream, RabbitMQ, RedisStreams

    found: dict[str, Callable[[], Broker]] = {}
    missing: dict[str, str] = {}
    cleanups: list[Callable[[], Any]] = []
    try:
        import redis.asyncio

        client = redis.asyncio.from_url("redis://127.0.0.1:6379")
        await client.ping()
        found["Redis Streams"] = lambda: RedisStreams(prefix=prefix)  # the latency run's

        async def drop_streams() -> None:
            await client.delete(f"{prefix}bench.orders")
            await client.aclose()

        cleanups.append(drop_streams)
    except Exception as error:
        missing["Redis Streams"] = f"{type(error).__name__}: {error}"
    try:
        import aio_pika

        connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{prefix}bench.orders")
        found["RabbitMQ (confirms)"] = lambda: RabbitMQ(exchange="")

        async def drop_queue() -> None:
            await queue.delete(if_unused=False, if_empty=False)
            await connection.close()

        cleanups.append(drop_queue)
    except Exception as error:
        missing["RabbitMQ (confirms)"] = f"{type(error).__name__}: {error}"
    try:
        import nats

        client_nats = await nats.connect("nats://127.0.0.1:4222")
        stream = prefix.replace(":", "").replace("-", "").upper()
        await client_nats.jetstream().add_stream(name=stream, subjects=[f"{prefix.replace(':', '.')}>"])
        found["NATS JetStream"] = lambda: NatsJetStream(prefix=prefix.replace(":", "."))

        async def drop_stream() -> None:
            await client_nats.jetstream().delete_stream(stream)
            await client_nats.close()

        cleanups.append(drop_stream)
    except Exception as error:
        missing["NATS JetStream"] = f"{type(error).__name__}: {error}"

    async def cleanup() -> None:
        for each in cleanups:
            await each()

    return found, missing, cleanup


def measure_relay(engine: Engine, schema: str) -> tuple[dict[tuple[str, int], float], dict[str, str], dict[str, float]]:
    """Messages per second per broker with 1 and 4 relays; why a broker was left out; and the latency run."""
    return asyncio.run(_measure_relay(engine, schema))


async def _measure_relay(
    engine: Engine, schema: str
) -> tuple[dict[tuple[str, int], float], dict[str, str], dict[str, float]]:
    OUTBOX.table.create(engine, checkfirst=True)
    async_engine = create_async_engine(
        run.ASYNCPG_URL, connect_args={"server_settings": {"search_path": schema}}, pool_size=8
    )
    prefix = f"uowbench{secrets.token_hex(3)}:"
    found, missing, cleanup = await _brokers(prefix)
    rates: dict[tuple[str, int], float] = {}
    latency: dict[str, float] = {}
    try:
        for name in found:
            for workers in (1, 4):
                _fill(engine, RELAY_MESSAGES)
                rates[(name, workers)] = RELAY_MESSAGES / await _drain(async_engine, schema, name, prefix, workers)
                with engine.begin() as connection:
                    connection.execute(delete(OUTBOX.table))
        if "Redis Streams" in found:
            latency = await _latency(engine, async_engine, found["Redis Streams"]())
    finally:
        await cleanup()
        await async_engine.dispose()
    return rates, missing, latency


class _Renamed:
    """A broker that sends every record under one topic: the queue of the RabbitMQ run."""

    def __init__(self, broker: Any, topic: str) -> None:
        self.broker, self.topic = broker, topic

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        renamed = [Record(r.position, r.id, self.topic, r.key, r.payload, r.headers, r.attempts) for r in records]
        return list(await self.broker.send(renamed))

    async def close(self) -> None:
        await self.broker.close()


class _Timed:
    """A broker that notes when each message was confirmed."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.confirmed: dict[str, float] = {}

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        outcomes = list(await self.broker.send(records))
        now = time.perf_counter()
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                self.confirmed.setdefault(record.id, now)
        return outcomes

    async def close(self) -> None:
        await self.broker.close()


async def _latency(engine: Engine, async_engine: AsyncEngine, broker: Broker) -> dict[str, float]:
    """p50 and p99 ms from the commit's return to the broker's confirmation, at a steady LATENCY_RATE."""
    timed = _Timed(broker)
    relay = Relay(async_engine, OUTBOX, timed, poll_interval=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    committed: dict[str, float] = {}
    factory = sessionmaker(engine, expire_on_commit=False)
    unit = PublishingShopUnitOfWork(factory)

    def produce() -> None:
        interval = 1 / LATENCY_RATE
        next_at = time.perf_counter()
        for number in range(LATENCY_RATE * LATENCY_SECONDS):
            with unit:
                message = unit.publish("bench.orders", {"n": number}, key=f"k{number % RELAY_KEYS}")
                unit.commit()
            committed[message.id] = time.perf_counter()
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))

    try:
        await asyncio.sleep(0.5)  # the relay listens
        producer = threading.Thread(target=produce)
        producer.start()
        await asyncio.to_thread(producer.join)
        for _ in range(200):
            if len(timed.confirmed) >= len(committed):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await timed.close()
    delays = sorted((timed.confirmed[key] - at) * 1000 for key, at in committed.items() if key in timed.confirmed)
    return {
        "p50": statistics.median(delays),
        "p99": delays[int(len(delays) * 0.99) - 1],
        "lost": float(len(committed) - len(delays)),
        "listening": float(relay.listening),
    }
