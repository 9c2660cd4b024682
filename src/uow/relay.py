"""The relay: it reads the committed outbox and sends each message to a broker, at least once, in order per key.

Several relays may run against one outbox on PostgreSQL and MariaDB: each
claims its batch with ``SELECT ... FOR UPDATE SKIP LOCKED``, and takes only
keys whose earlier messages are all sent, so that two relays never send
messages of one key at the same time. SQLite has no row locks: run one relay
there.

One pass (:meth:`Relay.relay_once`) is one transaction: claim a batch,
send it, mark what the broker confirmed as published, commit. A relay that
dies before its commit leaves the batch unpublished, and the next pass
sends it again: consumers drop the copies by the message's id (see the
inbox). A broker that refuses a message (not one that is down) counts an
attempt against it; after ``max_attempts`` the message is parked as dead,
where :meth:`Relay.dead_letters` shows it and :meth:`Relay.replay` sends
it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
from sqlalchemy import ColumnElement, and_, delete, func, or_, select, union_all, update

from . import _observe
from ._outbox import Outbox
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Broker", "InMemoryBroker", "Record", "Relay"]

log = logging.getLogger("uow.relay")


@attrs.frozen
class Record:
    """A committed outbox message, as the relay hands it to a broker."""

    position: int
    id: str
    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str]
    attempts: int
    #: When the transaction that published it committed; None for a record not read from an outbox.
    created_at: datetime.datetime | None = None

    @property
    def chain(self) -> object:
        """What orders it: its key, or, for a message without a key, the message alone."""
        return self.key if self.key is not None else ("no key", self.position)


def _record(row: Any) -> Record:
    """The record of an outbox row."""
    return Record(
        row["position"],
        row["message_id"],
        row["topic"],
        row["key"],
        bytes(row["payload"]),
        dict(row["headers"]),
        row["attempts"],
        row["created_at"],
    )


class Broker(Protocol):
    """Where a relay sends messages.

    :meth:`send` returns, for each record in order, None once the broker
    confirmed it, or the error with which it refused it. It must not send a
    record after one of the same key that failed, so that a key's order
    holds. It raises when the broker cannot be reached at all: the relay
    then waits and tries the batch again, counting no attempt.
    """

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]: ...

    async def close(self) -> None: ...


async def send_by_key(
    records: Sequence[Record],
    send_one: Callable[[Record], Any],
    unreachable: tuple[type[BaseException], ...] = (),
) -> list[BaseException | None]:
    """Send each key's records one after another, and the keys at the same time; stop a key at its first failure.

    *send_one* returns once the broker confirmed the record. An error that
    says the broker cannot be reached (``ConnectionError``, ``OSError``, a
    timeout, or one of *unreachable*) is raised as ``ConnectionError``;
    others are returned as the records' refusals.
    """
    unreachable = (ConnectionError, OSError, asyncio.TimeoutError, *unreachable)
    outcomes: list[BaseException | None] = [None] * len(records)
    chains: dict[object, list[int]] = {}
    for index, record in enumerate(records):
        chains.setdefault(record.chain, []).append(index)

    async def chain(indexes: list[int]) -> None:
        for position, index in enumerate(indexes):
            try:
                await send_one(records[index])
            except unreachable as error:
                if isinstance(error, ConnectionError):
                    raise
                raise ConnectionError(f"the broker cannot be reached: {type(error).__name__}: {error}") from error
            except Exception as error:
                outcomes[index] = error
                for later in indexes[position + 1 :]:
                    outcomes[later] = error  # not sent: it must follow the one that failed
                return

    await asyncio.gather(*(chain(indexes) for indexes in chains.values()))
    return outcomes


@attrs.define
class InMemoryBroker:
    """A broker in memory, for tests of relays and consumers: it keeps what it was sent, by topic, in order.

    *refuse* decides, per record, whether the broker refuses it (return an
    error) or takes it (return None); *down* makes every send raise
    ``ConnectionError``, as an unreachable broker does.
    """

    refuse: Callable[[Record], BaseException | None] = lambda record: None
    down: bool = False
    received: list[Record] = attrs.field(factory=list)
    #: The ``messaging.system`` of the relay's OpenTelemetry spans.
    system: ClassVar[str] = "memory"

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        if self.down:
            msg = "the in-memory broker is down"
            raise ConnectionError(msg)

        async def send_one(record: Record) -> None:
            error = self.refuse(record)
            if error is not None:
                raise error
            self.received.append(record)

        return await send_by_key(records, send_one)

    async def close(self) -> None:
        """Nothing to close."""

    def topic(self, name: str) -> list[Record]:
        """What the broker received on topic *name*, in order."""
        return [record for record in self.received if record.topic == name]


async def _first(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Wait until *stop* or *wake* is set, or *timeout* seconds pass."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def exponential_backoff(attempts: int) -> float:
    """Seconds before the next attempt at a message refused *attempts* times: 0.5 s doubling, at most 5 minutes."""
    return float(min(0.5 * 2 ** (attempts - 1), 300.0))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _lag(created_at: datetime.datetime | None, now: datetime.datetime) -> float | None:
    """Seconds from a message's commit to *now*; a naive time (SQLite keeps no zone) is UTC, as it was written."""
    if created_at is None:
        return None
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (now - created_at).total_seconds())


class Relay:
    """Sends the committed messages of *outbox* from the database of *engine* to *broker*.

    *engine* is an ``AsyncEngine`` on the database the units of work
    commit to. Each pass claims at most *batch_size* messages. A message
    refused *max_attempts* times is parked as dead; *backoff* gives the
    seconds to wait before the next attempt after a number of refusals.
    Published rows older than *retention* are deleted by :meth:`purge`,
    which :meth:`run` calls now and then (None keeps them).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        outbox: Outbox,
        broker: Broker,
        *,
        batch_size: int = 500,
        max_attempts: int = 10,
        backoff: Callable[[int], float] = exponential_backoff,
        poll_interval: float = 1.0,
        retention: datetime.timedelta | None = datetime.timedelta(days=7),
    ) -> None:
        if not isinstance(outbox, Outbox):
            msg = f"Relay() takes the uow.Outbox of the unit of work class, not {outbox!r}"
            raise ConfigurationError(msg)
        for name, value in (("batch_size", batch_size), ("max_attempts", max_attempts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} takes a whole number of at least 1, not {value!r}"
                raise ConfigurationError(msg)
        self.engine = engine
        self.outbox = outbox
        self.broker = broker
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.poll_interval = poll_interval
        self.retention = retention
        #: Whether :meth:`run` listens for PostgreSQL's notifications of commits to the outbox.
        self.listening = False
        #: Messages published, and refused, by this relay since it started.
        self.published = 0
        self.refused = 0
        dialect = engine.dialect.name
        #: Whether two relays may run at once: the database has row locks that a claim can skip.
        self.concurrent = dialect in ("postgresql", "mysql", "mariadb")
        if dialect in ("mysql", "mariadb"):  # a claim reads the latest committed rows, not a snapshot
            self.engine = engine.execution_options(isolation_level="READ COMMITTED")

    # -- one pass ---------------------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Claim a batch, send it, and mark what the broker confirmed; how many messages were published."""
        async with self.engine.begin() as connection:
            records = await self._claim(connection)
            if not records:
                return 0
            if _observe.telemetry is None:
                outcomes = await self.broker.send(records)
            else:
                outcomes = await self._send_traced(records)
            return await self._settle(connection, records, outcomes)

    async def _send_traced(self, records: list[Record]) -> list[BaseException | None]:
        """Send *records*, each in a producer span that continues the trace of the transaction that published it."""
        system = getattr(self.broker, "system", type(self.broker).__name__.lower())
        spans: list[Any] = []
        sending: list[Record] = []
        for record in records:
            span, headers = _observe.sending(system, record.topic, record.id, record.headers)
            spans.append(span)
            sending.append(attrs.evolve(record, headers=headers))
        outcomes: list[BaseException | None] = []
        try:
            outcomes = await self.broker.send(sending)
        except BaseException as error:
            outcomes = [error] * len(records)  # nothing was confirmed: the whole batch failed with it
            raise
        finally:
            for index, span in enumerate(spans):  # every span ends, whatever the broker answered
                _observe.sent(span, outcomes[index] if index < len(outcomes) else None)
        return outcomes

    async def _claim(self, connection: AsyncConnection) -> list[Record]:
        table = self.outbox.table
        now = _now()
        pending = and_(table.c.published_at.is_(None), table.c.dead_at.is_(None))
        # Two steps: a plain read finds the heads (the first unsent message of each key, and each unsent
        # message without a key), then a locking read takes those that no other relay holds. Locked in one
        # statement, MariaDB would skip rows that other relays hold while finding the first of a key, and
        # take a message whose key another relay is sending. The heads come from one pass over the unsent
        # messages, grouped by key: testing each message for an earlier one of its key costs a lookup per
        # unsent message, and most of a pass's time.
        firsts = union_all(
            select(func.min(table.c.position).label("position"))
            .where(pending, table.c.key.is_not(None))
            .group_by(table.c.key),
            select(table.c.position.label("position")).where(pending, table.c.key.is_(None)),
        ).subquery("firsts")
        heads = (
            select(table.c.position)
            .join_from(table, firsts, table.c.position == firsts.c.position)
            .where(or_(table.c.not_before.is_(None), table.c.not_before <= now))  # a key waiting out a backoff
            .order_by(table.c.position)
            .limit(self.batch_size)
        )
        candidates = list((await connection.execute(heads)).scalars())
        if not candidates:
            return []
        take = (
            select(table.c.position, table.c.key)
            .where(table.c.position.in_(candidates), pending)
            .order_by(table.c.position)
            .with_for_update(skip_locked=True)
        )
        claimed = (await connection.execute(take)).all()
        if not claimed:
            return []
        keys = {key for _, key in claimed if key is not None}
        positions = [position for position, _ in claimed]
        # The heads, and the messages that follow them under their keys: no other relay takes those while
        # the heads are locked, since each has an earlier message of its key still unpublished.
        chosen: ColumnElement[bool] = table.c.position.in_(positions)
        if keys:
            chosen = or_(chosen, and_(pending, table.c.key.in_(keys)))
        rows = (
            await connection.execute(
                select(table).where(chosen).order_by(table.c.position).limit(self.batch_size + len(positions))
            )
        ).mappings()
        return [_record(row) for row in rows]

    async def _settle(
        self, connection: AsyncConnection, records: list[Record], outcomes: Sequence[BaseException | None]
    ) -> int:
        table = self.outbox.table
        now = _now()
        sent = [record.position for record, outcome in zip(records, outcomes, strict=True) if outcome is None]
        if sent:
            await connection.execute(update(table).where(table.c.position.in_(sent)).values(published_at=now))
        failed_keys: set[object] = set()
        refusals: list[tuple[Record, str]] = []  # each refused message that counts an attempt, and its fate
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                continue
            chain = record.chain
            if chain in failed_keys:
                continue  # not sent: it waits behind the one that failed
            failed_keys.add(chain)
            attempts = record.attempts + 1
            values: dict[str, Any] = {"attempts": attempts, "last_error": f"{type(outcome).__name__}: {outcome}"}
            refusals.append((record, "dead" if attempts >= self.max_attempts else "refused"))
            if attempts >= self.max_attempts:
                values["dead_at"] = now
                log.error(
                    "uow relay: message %s to %r is dead after %d attempts: %s",
                    record.id,
                    record.topic,
                    attempts,
                    outcome,
                )
            else:
                values["not_before"] = now + datetime.timedelta(seconds=self.backoff(attempts))
                log.warning(
                    "uow relay: message %s to %r refused (attempt %d): %s", record.id, record.topic, attempts, outcome
                )
            await connection.execute(update(table).where(table.c.position == record.position).values(**values))
            self.refused += 1
        self.published += len(sent)
        if _observe.telemetry is not None:
            system = getattr(self.broker, "system", type(self.broker).__name__.lower())
            for record, outcome in zip(records, outcomes, strict=True):
                if outcome is None:
                    _observe.relayed(system, record.topic, "published", _lag(record.created_at, now))
            for record, result in refusals:
                _observe.relayed(system, record.topic, result, None)
        return len(sent)

    # -- running ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Relay until *stop* is set: pass after pass while there is work, then a pass when PostgreSQL notifies
        a commit to the outbox, or every ``poll_interval`` seconds; longer waits while a pass fails."""
        stop = stop or asyncio.Event()
        wake = asyncio.Event()
        listener = await self._listen(wake)
        self.listening = listener is not None
        pause = 0.0
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                wake.clear()  # a commit from now on wakes the next wait
                try:
                    published = await self.relay_once()
                    pause = 0.0
                except Exception:
                    pause = min(max(pause * 2, 0.5), 30.0)
                    log.exception("uow relay: a pass failed; trying again in %.1f s", pause)
                    published = 0
                if self.retention is not None and loop.time() - last_purge > 60:
                    last_purge = loop.time()
                    with contextlib.suppress(Exception):
                        await self.purge()
                if published and not pause:
                    continue
                await _first(stop, None if pause else wake, pause or self.poll_interval)
        finally:
            if listener is not None:
                await listener()

    async def _listen(self, wake: asyncio.Event) -> Callable[[], Any] | None:
        """On PostgreSQL, LISTEN on the outbox's channel with a connection of its own, setting *wake* on each
        notification; returns what stops it. None elsewhere, or if listening fails: the relay then polls."""
        if self.engine.dialect.name != "postgresql":
            return None
        channel = self.outbox.table.name
        try:
            connection = await self.engine.connect()
        except Exception:  # the database is down: poll, and let the passes wait for it
            log.warning("uow relay: cannot connect to LISTEN on %r; polling instead", channel, exc_info=True)
            return None
        try:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            if hasattr(driver, "add_listener"):  # asyncpg

                def notified(*_: object) -> None:
                    wake.set()

                await driver.add_listener(channel, notified)
                task = None
            else:  # psycopg: notifications arrive outside transactions only
                await driver.set_autocommit(True)
                await driver.execute(f'LISTEN "{channel}"')

                async def receive() -> None:
                    async for _ in driver.notifies():
                        wake.set()

                task = asyncio.create_task(receive())
        except Exception:
            log.warning(
                "uow relay: cannot LISTEN on %r; polling every %s s", channel, self.poll_interval, exc_info=True
            )
            await connection.invalidate()
            await connection.close()
            return None

        async def stop_listening() -> None:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await connection.invalidate()  # its settings changed for listening: never reused
            await connection.close()

        return stop_listening

    async def purge(self) -> int:
        """Delete the messages published longer ago than the retention; how many."""
        if self.retention is None:
            return 0
        table = self.outbox.table
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(table).where(table.c.published_at < _now() - self.retention))
        return int(result.rowcount or 0)

    # -- dead letters -----------------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[Record]:
        """The messages parked as dead, oldest first, with their attempts; ``last_error`` says why, in the table."""
        table = self.outbox.table
        async with self.engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(table).where(table.c.dead_at.is_not(None)).order_by(table.c.position).limit(limit)
                )
            ).mappings()
            return [_record(row) for row in rows]

    async def replay(self, ids: Iterable[str] | None = None) -> int:
        """Send dead messages again (those of *ids*, or all): their attempts start over. How many."""
        table = self.outbox.table
        condition: ColumnElement[bool] = table.c.dead_at.is_not(None)
        if ids is not None:
            condition = and_(condition, table.c.message_id.in_(list(ids)))
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(table).where(condition).values(dead_at=None, attempts=0, not_before=None, last_error=None)
            )
        return int(result.rowcount or 0)


# -- the command ------------------------------------------------------------------------------------


def _load(path: str) -> Outbox:
    """The outbox that ``module:attribute`` names: an Outbox, or a unit of work class that declares one."""
    import importlib

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        msg = f"--outbox takes module:attribute, such as myapp.uow:ShopUnitOfWork, not {path!r}"
        raise ConfigurationError(msg)
    found: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        found = getattr(found, name)
    outbox = getattr(found, "outbox", found)
    if not isinstance(outbox, Outbox):
        msg = f"{path} is neither a uow.Outbox nor a unit of work class that declares one"
        raise ConfigurationError(msg)
    return outbox


def broker_for(url: str) -> Broker:
    """The broker a URL names: ``redis://`` (Redis Streams), ``amqp://`` (RabbitMQ), ``nats://`` (NATS
    JetStream), ``kafka://host:port,host:port`` (Kafka), or ``memory://`` (in memory, for tests).

    The query parameters ``prefix`` and ``maxlen`` of a Redis URL go to
    :class:`~uow.brokers.RedisStreams`, the others to the Redis client;
    ``exchange`` of an AMQP URL to :class:`~uow.brokers.RabbitMQ`, and
    ``prefix`` of a NATS or Kafka URL to :class:`~uow.brokers.NatsJetStream` or :class:`~uow.brokers.Kafka`.
    """
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        from .brokers import RedisStreams

        query = dict(urllib.parse.parse_qsl(parts.query))
        prefix = query.pop("prefix", "")
        maxlen = query.pop("maxlen", None)
        client_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        return RedisStreams(client_url, prefix=prefix, maxlen=None if maxlen is None else int(maxlen))
    if parts.scheme in ("amqp", "amqps"):
        from .brokers import RabbitMQ

        query = dict(urllib.parse.parse_qsl(parts.query))
        exchange = query.pop("exchange", "")
        client_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        return RabbitMQ(client_url, exchange=exchange)
    if parts.scheme in ("nats", "tls"):
        from .brokers import NatsJetStream

        query = dict(urllib.parse.parse_qsl(parts.query))
        return NatsJetStream(urllib.parse.urlunsplit(parts._replace(query="")), prefix=query.get("prefix", ""))
    if parts.scheme == "kafka":
        from .brokers import Kafka

        query = dict(urllib.parse.parse_qsl(parts.query))
        return Kafka(parts.netloc, prefix=query.get("prefix", ""))
    if parts.scheme == "memory":
        return InMemoryBroker()
    msg = f"no broker for {url!r}: give a redis://, amqp://, nats:// or kafka:// URL"
    raise ConfigurationError(msg)


async def _serve(args: Any) -> int:
    import signal

    from sqlalchemy.ext.asyncio import create_async_engine

    outbox = _load(args.outbox)
    engine = create_async_engine(args.database)
    broker = broker_for(args.broker)
    relay = Relay(
        engine,
        outbox,
        broker,
        batch_size=args.batch_size,
        max_attempts=args.max_attempts,
        poll_interval=args.poll_interval,
    )
    try:
        if args.action == "dead":
            for record in await relay.dead_letters(limit=1000):
                print(f"{record.id}\t{record.topic}\t{record.key or ''}\t{record.attempts} attempts")
            return 0
        if args.action == "replay":
            print(f"{await relay.replay(args.ids or None)} messages to send again")
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("uow relay: sending %s to %s", outbox.table.name, args.broker)
        await relay.run(stop)
        log.info("uow relay: stopped after publishing %d messages", relay.published)
        return 0
    finally:
        await broker.close()
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m uow.relay``: relay an outbox until SIGTERM, or list or replay its dead messages."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m uow.relay", description=main.__doc__)
    parser.add_argument("--database", required=True, help="async SQLAlchemy URL of the outbox's database")
    parser.add_argument("--outbox", required=True, help="module:attribute of the Outbox, or of its unit of work")
    parser.add_argument("--broker", required=True, help="broker URL: redis://, amqp:// or nats://")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--max-attempts", type=int, default=10)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("action", nargs="?", default="run", choices=["run", "dead", "replay"])
    parser.add_argument("ids", nargs="*", help="replay: the ids of the dead messages to send again (all if none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
