"""The relay on SQLite, PostgreSQL and MariaDB: committed messages sent once each, in order per key, refusals parked.

The outbox is written by the sync units of work under test and read back
through a separate connection; the relay runs on the async driver of each
backend.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.support.databases import Database
from tests.support.models import OUTBOX
from tests.support.uows import SqlAlchemyShopUnitOfWork
from uow.relay import InMemoryBroker, Record, Relay


@pytest.fixture(name="async_engine")
async def _async_engine(database: Database, engine: Engine) -> AsyncIterator[AsyncEngine]:
    built = create_async_engine(database.async_url, pool_size=6, max_overflow=0)
    try:
        yield built
    finally:
        await built.dispose()


def publish(engine: Engine, *messages: tuple[str, Any, str | None], commit: bool = True) -> None:
    """Publish each (topic, payload, key) in one block, and commit it or not."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        for topic, payload, key in messages:
            unit.publish(topic, payload, key=key)
        if commit:
            unit.commit()


def rows(engine: Engine) -> list[dict[str, Any]]:
    """The outbox's rows, through a separate connection, in order."""
    table = OUTBOX.table
    with engine.connect() as connection:
        return [dict(row) for row in connection.execute(select(table).order_by(table.c.position)).mappings()]


def payloads(records: list[Record]) -> list[Any]:
    return [json.loads(record.payload) for record in records]


async def test_committed_messages_are_sent_in_order_and_marked_published(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    """A pass sends each key's committed messages in commit order, marked published; rolled-back ones never go."""
    publish(engine, ("orders", 1, "a"), ("orders", 2, "b"))
    publish(engine, ("orders", "lost", "a"), commit=False)
    publish(engine, ("orders", 3, "a"))
    broker = InMemoryBroker()
    relay = Relay(async_engine, OUTBOX, broker)
    assert 3 == await relay.relay_once()
    by_key = {key: payloads([record for record in broker.received if record.key == key]) for key in "ab"}
    assert {"a": [1, 3], "b": [2]} == by_key  # the order of each key; keys go side by side
    assert 0 == await relay.relay_once()
    stored = rows(engine)
    assert [1, 2, 3] == [json.loads(row["payload"]) for row in stored]
    assert all(row["published_at"] is not None for row in stored)
    assert {row["message_id"] for row in stored} == {record.id for record in broker.received}


async def test_a_refused_message_holds_back_its_key_then_is_parked_and_replayed(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    """A refusal delays its key only; after max_attempts the message is dead, and replay() sends it again."""
    publish(engine, ("orders", "bad", "a"), ("orders", "a2", "a"), ("orders", "b1", "b"))
    refusing = True
    broker = InMemoryBroker(refuse=lambda record: ValueError("no") if refusing and b"bad" in record.payload else None)
    relay = Relay(async_engine, OUTBOX, broker, max_attempts=2, backoff=lambda attempts: 0.0)
    assert 1 == await relay.relay_once()
    assert ["b1"] == payloads(broker.received)  # a2 waits behind the refused message of its key
    first = rows(engine)[0]
    assert (1, "ValueError: no", None) == (first["attempts"], first["last_error"], first["published_at"])
    assert 0 == await relay.relay_once()  # refused again: dead now
    assert ["bad"] == payloads(await relay.dead_letters())
    assert 1 == await relay.relay_once()  # the key goes on without it
    assert ["b1", "a2"] == payloads(broker.received)
    refusing = False
    assert 1 == await relay.replay()
    assert 1 == await relay.relay_once()
    assert ["b1", "a2", "bad"] == payloads(broker.received)
    assert [] == await relay.dead_letters()


async def test_a_key_waiting_out_its_backoff_sends_nothing_while_other_keys_and_keyless_messages_go_on(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    """A refused first message in backoff holds back the later ones of its key; other keys and keyless ones go on."""
    publish(
        engine,
        ("orders", "bad", "a"),
        ("orders", "free1", None),
        ("orders", "a2", "a"),
        ("orders", "b1", "b"),
        ("orders", "free2", None),
        ("orders", "b2", "b"),
    )
    broker = InMemoryBroker(refuse=lambda record: ValueError("no") if b"bad" in record.payload else None)
    relay = Relay(async_engine, OUTBOX, broker, max_attempts=5, backoff=lambda attempts: 3600.0)
    assert 4 == await relay.relay_once()
    sent = payloads(broker.received)  # the keys go side by side: only each key's own order is fixed
    assert sorted(sent) == ["b1", "b2", "free1", "free2"]
    assert sent.index("b1") < sent.index("b2")
    assert 0 == await relay.relay_once()  # "bad" waits an hour, and "a2" behind it
    waiting = {json.loads(row["payload"]): row["attempts"] for row in rows(engine) if not row["published_at"]}
    assert {"bad": 1, "a2": 0} == waiting  # not even tried again during its backoff
    assert ["bad", "a2"] == [json.loads(row["payload"]) for row in rows(engine) if not row["published_at"]]


async def test_an_unreachable_broker_counts_no_attempt(engine: Engine, async_engine: AsyncEngine) -> None:
    """While the broker is down a pass raises and changes nothing; once it is back, everything goes."""
    publish(engine, ("orders", 1, "a"))
    broker = InMemoryBroker(down=True)
    relay = Relay(async_engine, OUTBOX, broker)
    with pytest.raises(ConnectionError):
        await relay.relay_once()
    assert [(0, None)] == [(row["attempts"], row["published_at"]) for row in rows(engine)]
    broker.down = False
    assert 1 == await relay.relay_once()


async def test_published_messages_past_retention_are_purged(engine: Engine, async_engine: AsyncEngine) -> None:
    """purge() deletes published messages older than the retention, and keeps the others."""
    publish(engine, ("orders", 1, None), ("orders", 2, None))
    relay = Relay(async_engine, OUTBOX, InMemoryBroker())
    assert 2 == await relay.relay_once()
    publish(engine, ("orders", 3, None))
    table = OUTBOX.table
    first = rows(engine)[0]
    with engine.begin() as connection:  # published a year ago
        old = first["published_at"].replace(year=first["published_at"].year - 1)
        connection.execute(update(table).where(table.c.position == first["position"]).values(published_at=old))
    assert 1 == await relay.purge()
    assert [2, 3] == [json.loads(row["payload"]) for row in rows(engine)]


async def test_relays_racing_on_one_outbox_send_each_message_once_in_order_per_key(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    """Four relays (one on SQLite) while commits go on: every message sent exactly once, each key in order."""
    keys = [f"k{number}" for number in range(20)]
    publish(engine, *[("orders", number, keys[number % 20]) for number in range(400)])
    broker = InMemoryBroker()
    relays = [Relay(async_engine, OUTBOX, broker, batch_size=50, poll_interval=0.01) for _ in range(4)]
    if not relays[0].concurrent:
        relays = relays[:1]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]

    def more() -> None:
        for start in range(400, 800, 20):
            publish(engine, *[("orders", number, keys[number % 20]) for number in range(start, start + 20)])

    writer = threading.Thread(target=more)
    writer.start()
    await asyncio.to_thread(writer.join)
    for _ in range(500):
        if len(broker.received) >= 800:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*tasks)
    sent = payloads(broker.received)
    assert sorted(sent) == list(range(800))  # each once
    for key in range(20):
        mine = [number for number in sent if number % 20 == key]
        assert mine == sorted(mine), f"key k{key} out of order"
    assert 800 == sum(relay.published for relay in relays)


async def test_redis_streams_receive_each_message_with_its_id_key_and_headers(
    engine: Engine, async_engine: AsyncEngine, redis_url: str
) -> None:
    """The relay adds one stream entry per message, in order, carrying id, key, payload and headers."""
    import redis

    from uow.brokers import RedisStreams

    prefix = f"uow-test-{secrets.token_hex(4)}:"
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        unit.publish("orders", {"n": 1}, key="a", headers={"by": "test"})
        unit.publish("orders", {"n": 2})
        unit.publish("audit", "x", key="a")
        unit.commit()
    broker = RedisStreams(redis_url, prefix=prefix)
    try:
        assert 3 == await Relay(async_engine, OUTBOX, broker).relay_once()
    finally:
        await broker.close()
    reader = redis.Redis.from_url(redis_url)
    try:
        entries = [fields for _, fields in reader.xrange(f"{prefix}orders")]
        audit = [fields for _, fields in reader.xrange(f"{prefix}audit")]
    finally:
        reader.delete(f"{prefix}orders", f"{prefix}audit")
        reader.close()
    stored = {row["payload"]: row["message_id"] for row in rows(engine)}
    assert [
        {b"id": stored[b'{"n":1}'].encode(), b"key": b"a", b"payload": b'{"n":1}', b"headers": b'{"by": "test"}'},
        {b"id": stored[b'{"n":2}'].encode(), b"key": b"", b"payload": b'{"n":2}', b"headers": b"{}"},
    ] == entries
    assert [b'"x"'] == [fields[b"payload"] for fields in audit]


async def test_rabbitmq_receives_each_message_confirmed_and_refuses_an_unroutable_one(
    engine: Engine, async_engine: AsyncEngine, rabbitmq_url: str
) -> None:
    """Messages reach the queue named by their topic with id, key and headers; one no queue takes is refused."""
    import aio_pika

    from uow.brokers import RabbitMQ

    queue_name = f"uow-test-{secrets.token_hex(4)}"
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        unit = SqlAlchemyShopUnitOfWork(engine)
        with unit:
            unit.publish(queue_name, {"n": 1}, key="a", headers={"by": "test"})
            unit.publish(f"{queue_name}-nowhere", {"n": 2}, key="b")
            unit.publish(queue_name, {"n": 3}, key="a")
            unit.commit()
        broker = RabbitMQ(rabbitmq_url)
        try:
            assert 2 == await Relay(async_engine, OUTBOX, broker).relay_once()
        finally:
            await broker.close()
        received = []
        for _ in range(2):
            message = await queue.get(timeout=5)
            await message.ack()
            received.append((json.loads(message.body), message.headers.get("uow-key"), message.message_id))
        stored = {json.loads(row["payload"])["n"]: row for row in rows(engine)}
        assert [({"n": 1}, "a", stored[1]["message_id"]), ({"n": 3}, "a", stored[3]["message_id"])] == received
        assert (1, None) == (stored[2]["attempts"], stored[2]["published_at"])
        assert "NO_ROUTE" in stored[2]["last_error"]
    finally:
        await connection.close()


async def test_nats_jetstream_acknowledges_each_message_and_refuses_one_no_stream_captures(
    engine: Engine, async_engine: AsyncEngine, nats_url: str
) -> None:
    """Messages land in the stream with Nats-Msg-Id and uow-key headers; a subject no stream captures is refused."""
    import nats

    from uow.brokers import NatsJetStream

    prefix = f"uowtest{secrets.token_hex(4)}."
    stream = prefix.rstrip(".").upper()
    client = await nats.connect(nats_url)
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(name=stream, subjects=[f"{prefix}orders.>"])
        unit = SqlAlchemyShopUnitOfWork(engine)
        with unit:
            unit.publish("orders.placed", {"n": 1}, key="a", headers={"by": "test"})
            unit.publish("refunds", {"n": 2}, key="b")
            unit.publish("orders.placed", {"n": 3}, key="a")
            unit.commit()
        broker = NatsJetStream(nats_url, prefix=prefix)
        try:
            assert 2 == await Relay(async_engine, OUTBOX, broker).relay_once()
        finally:
            await broker.close()
        stored = {json.loads(row["payload"])["n"]: row for row in rows(engine)}
        found = []
        for sequence in (1, 2):
            message = await jetstream.get_msg(stream, sequence)
            headers = message.headers or {}
            found.append((json.loads(message.data), headers["uow-key"], headers.get("by"), headers["Nats-Msg-Id"]))
        assert [
            ({"n": 1}, "a", "test", stored[1]["message_id"]),
            ({"n": 3}, "a", None, stored[3]["message_id"]),
        ] == found
        assert (1, None) == (stored[2]["attempts"], stored[2]["published_at"])
    finally:
        await client.jetstream().delete_stream(stream)
        await client.close()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_on_postgresql_a_commit_wakes_a_listening_relay_at_once(
    database: Database, engine: Engine, driver: str
) -> None:
    """A relay that polls every 60 s sends a message within a second of its commit: NOTIFY woke it."""
    url = database.url.set(drivername=f"postgresql+{driver}")
    listening_engine = create_async_engine(url, pool_size=3, max_overflow=0)
    broker = InMemoryBroker()
    relay = Relay(listening_engine, OUTBOX, broker, poll_interval=60)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        for _ in range(100):  # the first pass has run, and the relay waits
            if relay.listening:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert relay.listening
        await asyncio.to_thread(publish, engine, ("orders", 1, "a"))
        for _ in range(100):
            if broker.received:
                break
            await asyncio.sleep(0.01)
        assert [1] == payloads(broker.received)
    finally:
        stop.set()
        await task
        await listening_engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
def test_consumers_racing_on_one_message_handle_it_once(engine: Engine) -> None:
    """Eight threads handling the same 20 messages at once: each message's work is committed exactly once."""
    from tests.support.models import Item

    barrier = threading.Barrier(8)
    handled: list[str] = []

    def consume() -> None:
        unit = SqlAlchemyShopUnitOfWork(engine)
        barrier.wait()
        for number in range(20):
            with unit:
                if not unit.receive(f"m{number}"):
                    continue
                unit.items.add(Item(f"m{number}"))
                unit.commit()
                handled.append(f"m{number}")

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with engine.connect() as connection:
        names = sorted(connection.execute(select(Item.__table__.c.name)).scalars())  # type: ignore[attr-defined]
    assert sorted(f"m{number}" for number in range(20)) == names == sorted(handled)


async def test_a_relay_started_while_the_database_is_down_polls_and_keeps_trying() -> None:
    """run() on a PostgreSQL that refuses connections logs, does not LISTEN, and returns when stopped."""
    unreachable = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    relay = Relay(unreachable, OUTBOX, InMemoryBroker(), poll_interval=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 5)
    await unreachable.dispose()
    assert (False, 0) == (relay.listening, relay.published)


async def test_redis_refusing_one_entry_still_adds_the_rest_and_the_relay_says_so(
    engine: Engine, async_engine: AsyncEngine, redis_url: str
) -> None:
    """An entry on a key that holds a string is refused and retried; the entries after it were added and are sent."""
    import redis

    from uow.brokers import RedisStreams

    prefix = f"uow-test-{secrets.token_hex(4)}:"
    reader = redis.Redis.from_url(redis_url)
    reader.set(f"{prefix}broken", "not a stream")
    try:
        publish(engine, ("broken", 1, "a"), ("orders", 2, "a"), ("orders", 3, "b"))
        broker = RedisStreams(redis_url, prefix=prefix)
        try:
            assert 2 == await Relay(async_engine, OUTBOX, broker).relay_once()
        finally:
            await broker.close()
        added = [json.loads(fields[b"payload"]) for _, fields in reader.xrange(f"{prefix}orders")]
    finally:
        reader.delete(f"{prefix}broken", f"{prefix}orders")
        reader.close()
    assert [2, 3] == added
    state = {json.loads(row["payload"]): (row["attempts"], row["published_at"] is not None) for row in rows(engine)}
    assert {1: (1, False), 2: (0, True), 3: (0, True)} == state
