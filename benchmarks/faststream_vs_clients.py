"""FastStream against each broker's own client, for what a relay does: send a batch, confirmed, in order per key.

Run from the repository root, with the brokers up and the bench group plus
``faststream[redis,rabbit,nats]`` installed::

    python benchmarks/faststream_vs_clients.py

Each way sends the same 2,000 messages of 100 keys, each with its id and
headers, and waits for the broker's confirmations: a key's messages one after
another, the keys side by side, as ``uow.relay.send_by_key`` does (Redis:
one pipeline). Prints messages per second, the median of 5 runs.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

from uow.brokers import NatsJetStream, RabbitMQ, RedisStreams
from uow.relay import Record, send_by_key

COUNT, KEYS, RUNS = 2_000, 100, 5


def records(topic: str) -> list[Record]:
    return [
        Record(number, secrets.token_hex(16), topic, f"k{number % KEYS}", b'{"n":%d}' % number, {"by": "bench"}, 0)
        for number in range(COUNT)
    ]


async def rate(send: Callable[[list[Record]], Awaitable[object]], topic: str) -> float:
    runs = []
    for _ in range(RUNS):
        batch = records(topic)
        start = time.perf_counter()
        await send(batch)
        runs.append(COUNT / (time.perf_counter() - start))
    return statistics.median(runs)


async def main() -> None:
    import aio_pika
    import nats
    import redis.asyncio
    from faststream.nats import NatsBroker
    from faststream.rabbit import RabbitBroker
    from faststream.redis import RedisBroker

    prefix = f"uoweval{secrets.token_hex(3)}"
    results: dict[str, tuple[float, float]] = {}

    # Redis Streams
    native_redis = RedisStreams(prefix=f"{prefix}:")
    fast_redis = RedisBroker("redis://127.0.0.1:6379")
    await fast_redis.connect()

    async def fast_redis_send(batch: list[Record]) -> None:
        async with fast_redis._connection.pipeline(transaction=False) as pipe:
            for record in batch:
                await fast_redis.publish(
                    record.payload,
                    stream=f"{prefix}:fs:{record.topic}",
                    headers={**record.headers, "id": record.id, "key": record.key or ""},
                    pipeline=pipe,
                )
            await pipe.execute()

    results["Redis Streams"] = (await rate(native_redis.send, "orders"), await rate(fast_redis_send, "orders"))
    client = redis.asyncio.from_url("redis://127.0.0.1:6379")
    await client.delete(f"{prefix}:orders", f"{prefix}:fs:orders")
    await client.aclose()
    await native_redis.close()
    await fast_redis.stop()

    # RabbitMQ with publisher confirms
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    channel = await connection.channel()
    queue = await channel.declare_queue(f"{prefix}.orders")
    native_rabbit = RabbitMQ()
    fast_rabbit = RabbitBroker("amqp://guest:guest@127.0.0.1:5672/")
    await fast_rabbit.connect()

    async def fast_rabbit_send(batch: list[Record]) -> None:
        async def one(record: Record) -> None:
            await fast_rabbit.publish(
                record.payload,
                queue=record.topic,
                headers={**record.headers, "uow-key": record.key or ""},
                message_id=record.id,
                persist=True,
                mandatory=True,
            )

        await send_by_key(batch, one)

    results["RabbitMQ (confirms)"] = (
        await rate(native_rabbit.send, f"{prefix}.orders"),
        await rate(fast_rabbit_send, f"{prefix}.orders"),
    )
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    await native_rabbit.close()
    await fast_rabbit.stop()

    # NATS JetStream
    client_nats = await nats.connect("nats://127.0.0.1:4222")
    stream = prefix.upper()
    await client_nats.jetstream().add_stream(name=stream, subjects=[f"{prefix}.>"])
    native_nats = NatsJetStream(prefix=f"{prefix}.")
    fast_nats = NatsBroker("nats://127.0.0.1:4222")
    await fast_nats.connect()

    async def fast_nats_send(batch: list[Record]) -> None:
        async def one(record: Record) -> None:
            await fast_nats.publish(
                record.payload,
                subject=f"{prefix}.fs.{record.topic}",
                headers={**record.headers, "Nats-Msg-Id": record.id, "uow-key": record.key or ""},
                stream=stream,
            )

        await send_by_key(batch, one)

    results["NATS JetStream"] = (await rate(native_nats.send, "orders"), await rate(fast_nats_send, "orders"))
    await client_nats.jetstream().delete_stream(stream)
    await client_nats.close()
    await native_nats.close()
    await fast_nats.stop()

    print(f"{COUNT:,} messages over {KEYS} keys, confirmed, median of {RUNS} runs (messages/s)")
    print(f"{'broker':<22} {'own client':>12} {'FastStream':>12} {'ratio':>7}")
    for name, (native, fast) in results.items():
        print(f"{name:<22} {native:>12.0f} {fast:>12.0f} {native / fast:>6.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
