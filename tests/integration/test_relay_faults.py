"""The relay killed mid-batch: on PostgreSQL and Redis, every committed message still arrives, in order per key.

A relay process is SIGKILLed 50 times, each once it has sent a random number
of the messages committed before it started (between 1 and 150): in the middle
of its work, often between the broker's confirmation and its own commit. Then
one relay finishes the work. What Redis holds is then
read back, and a consumer with an inbox handles it: every committed message
was delivered at least once, each key's messages first arrived in commit
order, and the consumer's effect happened once per message.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.integration.test_relay import publish, rows
from tests.integration.test_relay_command import ENVIRONMENT, ROOT, relay_command
from tests.support.databases import Database
from tests.support.models import OUTBOX, Item
from tests.support.uows import SqlAlchemyShopUnitOfWork
from uow.brokers import RedisStreams
from uow.relay import Relay

KEYS = 10


def commit_messages(engine: Engine, start: int, count: int) -> None:
    """Commit messages numbered *start* to *start* + *count*, 50 to a transaction, keyed by number modulo KEYS."""
    for first in range(start, start + count, 50):
        publish(engine, *[("orders", number, f"k{number % KEYS}") for number in range(first, first + 50)])


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_relay_killed_fifty_times_loses_nothing_and_keeps_each_keys_order(
    database: Database, engine: Engine, redis_url: str
) -> None:
    """50 SIGKILLs at random moments: every message delivered, first deliveries in order per key, handled once."""
    prefix = f"uow-test-{secrets.token_hex(4)}:"
    command = relay_command(database, f"{redis_url}/0?prefix={prefix}", "--batch-size", "40")
    chance = random.Random(1234)
    committed = 0
    kills = 0
    reader = redis.Redis.from_url(redis_url)
    try:
        for _ in range(50):
            commit_messages(engine, committed, 200)
            committed += 200
            process = subprocess.Popen(
                command, cwd=ROOT, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            # Kill it once it has sent a random number of this round's messages: in the middle of its work.
            target = reader.xlen(f"{prefix}orders") + chance.randint(1, 150)
            deadline = asyncio.get_running_loop().time() + 20
            while reader.xlen(f"{prefix}orders") < target and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.001)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait()
        assert kills == 50
        interrupted = sum(1 for row in rows(engine) if row["published_at"] is None)
        assert 0 < interrupted < committed  # the killed relays had sent some, and were stopped before the rest
        async_engine = create_async_engine(database.async_url)
        broker = RedisStreams(redis_url, prefix=prefix)
        try:
            relay = Relay(async_engine, OUTBOX, broker)
            while await relay.relay_once():
                pass
        finally:
            await broker.close()
            await async_engine.dispose()
        entries = [fields for _, fields in reader.xrange(f"{prefix}orders")]
    finally:
        reader.delete(f"{prefix}orders")
        reader.close()

    stored = rows(engine)
    assert committed == len(stored)
    assert all(row["published_at"] is not None for row in stored)
    delivered = [(fields[b"id"].decode(), json.loads(fields[b"payload"])) for fields in entries]
    assert {row["message_id"] for row in stored} == {message_id for message_id, _ in delivered}
    first_seen: dict[str, int] = {}
    for message_id, number in delivered:
        first_seen.setdefault(message_id, number)
    order = list(first_seen.values())
    for key in range(KEYS):
        mine = [number for number in order if number % KEYS == key]
        assert mine == sorted(mine), f"key k{key} first arrived out of order"

    consumer = SqlAlchemyShopUnitOfWork(engine)
    for message_id, number in delivered:  # copies included: the inbox drops them
        with consumer:
            if consumer.receive(message_id, consumer="fault-test"):
                consumer.items.add(Item(f"n{number}"))
                consumer.commit()
    with engine.connect() as connection:
        names = list(connection.execute(select(Item.__table__.c.name)).scalars())  # type: ignore[attr-defined]
    assert sorted(f"n{number}" for number in range(committed)) == sorted(names)
    print(f"{kills} kills, {committed} messages, {len(delivered) - committed} delivered twice", file=sys.stderr)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_relays_whose_connections_are_terminated_resume_and_lose_nothing(
    database: Database, engine: Engine, redis_url: str
) -> None:
    """Four relays to Redis while pg_terminate_backend() kills their connections: all sent, each key in order."""
    prefix = f"uow-test-{secrets.token_hex(4)}:"
    commit_messages(engine, 0, 1000)
    name = f"uow-relay-{secrets.token_hex(4)}"  # the relays' connections, and only those, are terminated
    async_engine = create_async_engine(
        database.async_url,
        pool_size=8,
        max_overflow=0,
        pool_pre_ping=True,
        connect_args={"server_settings": {"application_name": name}},
    )
    brokers = [RedisStreams(redis_url, prefix=prefix) for _ in range(4)]
    relays = [Relay(async_engine, OUTBOX, broker, batch_size=20, poll_interval=0.02) for broker in brokers]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
    reader = redis.Redis.from_url(redis_url)
    terminated = 0
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + 3  # connections are terminated for 3 s; then the relays must recover and finish
        while loop.time() < until and not all(row["published_at"] for row in rows(engine)):
            with engine.connect() as connection:
                terminated += sum(
                    connection.execute(
                        text(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = :name"
                        ),
                        {"name": name},
                    ).scalars()
                )
            await asyncio.sleep(0.05)
        deadline = loop.time() + 90  # a relay waits at most 30 s between failed passes
        while loop.time() < deadline and not all(row["published_at"] for row in rows(engine)):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        entries = [fields for _, fields in reader.xrange(f"{prefix}orders")]
    finally:
        stop.set()
        for broker in brokers:
            await broker.close()
        await async_engine.dispose()
        reader.delete(f"{prefix}orders")
        reader.close()
    assert terminated > 0
    stored = rows(engine)
    assert all(row["published_at"] is not None for row in stored)
    first_seen: dict[str, int] = {}
    for fields in entries:
        first_seen.setdefault(fields[b"id"].decode(), json.loads(fields[b"payload"]))
    assert {row["message_id"] for row in stored} == set(first_seen)
    for key in range(KEYS):
        mine = [number for number in first_seen.values() if number % KEYS == key]
        assert mine == sorted(mine), f"key k{key} first arrived out of order"


def _nats_server() -> tuple[int, list[str]]:
    """The running NATS server's process id and command line, to stop it and start it again as it was."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments and arguments[0].endswith(b"nats-server"):
            return int(entry.name), [argument.decode() for argument in arguments if argument]
    pytest.fail("no nats-server process to restart on this machine")


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_broker_restarted_during_a_run_gets_every_message_once_in_order(
    database: Database, engine: Engine, nats_url: str
) -> None:
    """NATS stopped and started again while two relays send: every message in the stream once, each key in order."""
    import nats

    from uow.brokers import NatsJetStream

    prefix = f"uowtest{secrets.token_hex(4)}."
    stream = prefix.rstrip(".").upper()
    client = await nats.connect(nats_url)
    await client.jetstream().add_stream(name=stream, subjects=[f"{prefix}>"])  # stored on disk: kept over a restart
    await client.close()
    commit_messages(engine, 0, 1000)
    async_engine = create_async_engine(database.async_url, pool_size=4, max_overflow=0)
    brokers = [NatsJetStream(nats_url, prefix=prefix, timeout=2.0) for _ in range(2)]
    relays = [Relay(async_engine, OUTBOX, broker, batch_size=20, poll_interval=0.02) for broker in brokers]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        while sum(relay.published for relay in relays) < 200:  # the run is under way
            await asyncio.sleep(0.01)
        pid, command = _nats_server()
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            await asyncio.sleep(0.05)
        commit_messages(engine, 1000, 500)  # committed while the broker is down: the relays fail their passes
        await asyncio.sleep(0.5)
        assert sum(1 for row in rows(engine) if row["published_at"] is None) >= 500  # nothing got through
        # The server's own command line, as it ran, in a session of its own that outlives this test.
        restart = ["setsid", "-f", *command]
        subprocess.run(restart, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(400):
            if all(row["published_at"] for row in rows(engine)):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for broker in brokers:
            await broker.close()
        await async_engine.dispose()
    client = await nats.connect(nats_url)
    try:
        jetstream = client.jetstream()
        info = await jetstream.stream_info(stream)
        numbers = [
            json.loads((await jetstream.get_msg(stream, sequence)).data)
            for sequence in range(1, info.state.last_seq + 1)
        ]
        await jetstream.delete_stream(stream)
    finally:
        await client.close()
    assert all(row["published_at"] is not None for row in rows(engine))
    assert list(range(1500)) == sorted(numbers)  # each once: JetStream dropped the copies by Nats-Msg-Id
    for key in range(KEYS):
        mine = [number for number in numbers if number % KEYS == key]
        assert mine == sorted(mine), f"key k{key} out of order"
