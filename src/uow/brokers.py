"""Brokers that a :class:`~uow.relay.Relay` sends the outbox to, each behind an extra.

Each one is built from a URL, sends a batch with the broker's own
acknowledgement, and keeps the order of each key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from .errors import ConfigurationError
from .relay import Record, send_by_key

__all__ = ["Kafka", "NatsJetStream", "RabbitMQ", "RedisStreams"]


def _missing(extra: str, module: str) -> ConfigurationError:
    return ConfigurationError(f"this broker needs {module}: pip install 'uow[{extra}]'")


class RedisStreams:
    """Redis Streams: each message is an entry (``XADD``) on the stream named by its topic, after *prefix*.

    An entry's fields are ``id`` (the message's id, for consumers to drop
    copies), ``key`` (empty for none), ``payload`` and ``headers`` (a JSON
    object). A batch goes in one pipeline, which Redis runs in order; an
    entry is there once Redis answered, and with *maxlen* a stream keeps
    about that many entries. Redis acknowledges a write when it holds it in
    memory: with persistence off, a restart of Redis loses what consumers
    had not read. Redis runs the whole pipeline even when it refuses an
    entry (a key holding another type than a stream): the later messages of
    that key then arrive before the refused one, which the relay sends again.
    """

    #: The ``messaging.system`` of the relay's OpenTelemetry spans.
    system = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379", *, prefix: str = "", maxlen: int | None = None) -> None:
        try:
            import redis.asyncio
        except ImportError:
            raise _missing("redis", "redis") from None
        self.client: Any = redis.asyncio.from_url(url)
        self.prefix = prefix
        self.maxlen = maxlen

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Add the records to their streams in one pipeline; raises if Redis cannot be reached."""
        async with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                fields = {
                    "id": record.id,
                    "key": record.key or "",
                    "payload": record.payload,
                    "headers": json.dumps(record.headers),
                }
                pipe.xadd(self.prefix + record.topic, fields, maxlen=self.maxlen, approximate=self.maxlen is not None)
            results = await pipe.execute(raise_on_error=False)
        # Redis runs every command of a pipeline: an entry after a refused one of its key is in its stream
        # all the same, and is reported sent, not sent again.
        return [result if isinstance(result, BaseException) else None for result in results]

    async def close(self) -> None:
        await self.client.aclose()


async def _sent_or_closed(
    broker: Any, records: Sequence[Record], send_one: Any, unreachable: tuple[type[BaseException], ...]
) -> list[BaseException | None]:
    """:func:`~uow.relay.send_by_key`, dropping the broker's connection if it turns out unreachable."""
    try:
        return await send_by_key(records, send_one, unreachable)
    except ConnectionError:
        await broker.close()
        raise


class RabbitMQ:
    """RabbitMQ: each message is published to *exchange* with its topic as routing key, with publisher confirms.

    The default exchange (``""``) routes a message to the queue named by its
    topic. Messages are persistent and mandatory: one that no queue takes
    comes back as a refusal, counted against it, instead of vanishing. The
    message id is the AMQP ``message_id``; the key is the header
    ``uow-key``, beside the message's own headers.
    """

    #: The ``messaging.system`` of the relay's OpenTelemetry spans.
    system = "rabbitmq"

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/", *, exchange: str = "") -> None:
        try:
            import aio_pika
        except ImportError:
            raise _missing("rabbitmq", "aio-pika") from None
        self._aio_pika: Any = aio_pika
        self.url = url
        self.exchange_name = exchange
        self._connection: Any = None
        self._exchange: Any = None

    async def _ready(self) -> Any:
        connection = self._connection
        if connection is None or connection.is_closed:
            connection = self._connection = await self._aio_pika.connect(self.url)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            if self.exchange_name:
                self._exchange = await channel.get_exchange(self.exchange_name)
            else:
                self._exchange = channel.default_exchange
        return self._exchange

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Publish each key's records in turn, awaiting each confirm; raises if RabbitMQ cannot be reached."""
        import aiormq.exceptions

        aio_pika = self._aio_pika
        unreachable = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError)
        try:
            exchange = await self._ready()
        except unreachable as error:
            self._connection = None
            raise ConnectionError(f"RabbitMQ cannot be reached: {error}") from error

        async def send_one(record: Record) -> None:
            headers: dict[str, Any] = dict(record.headers)
            if record.key is not None:
                headers["uow-key"] = record.key
            message = aio_pika.Message(
                record.payload,
                message_id=record.id,
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key=record.topic, mandatory=True)

        return await _sent_or_closed(self, records, send_one, unreachable)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            await connection.close()


class NatsJetStream:
    """NATS JetStream: each message is published on the subject *prefix* + topic, and acknowledged by its stream.

    A stream must capture the subjects (``nats stream add``, or
    ``jetstream.add_stream``); a message that none captures is refused.
    The message id goes in the ``Nats-Msg-Id`` header, which JetStream uses
    to drop a copy sent again within its duplicate window; the key in
    ``uow-key``, beside the message's own headers.
    """

    #: The ``messaging.system`` of the relay's OpenTelemetry spans.
    system = "nats"

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, prefix: str = "", timeout: float = 5.0) -> None:
        try:
            import nats
        except ImportError:
            raise _missing("nats", "nats-py") from None
        self._nats: Any = nats
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self._client: Any = None

    async def _ready(self) -> Any:
        client = self._client
        if client is None or not client.is_connected:
            client = self._client = await self._nats.connect(
                self.url, allow_reconnect=False, connect_timeout=self.timeout
            )
        return client.jetstream(timeout=self.timeout)

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Publish each key's records in turn, awaiting each acknowledgement; raises if NATS cannot be reached."""
        import nats.errors

        unreachable = (nats.errors.ConnectionClosedError, nats.errors.NoServersError, nats.errors.TimeoutError)
        try:
            jetstream = await self._ready()
        except unreachable as error:
            self._client = None
            raise ConnectionError(f"NATS cannot be reached: {error}") from error

        async def send_one(record: Record) -> None:
            headers = {**record.headers, "Nats-Msg-Id": record.id}
            if record.key is not None:
                headers["uow-key"] = record.key
            await jetstream.publish(self.prefix + record.topic, record.payload, headers=headers)

        return await _sent_or_closed(self, records, send_one, unreachable)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            await client.close()


class Kafka:
    """Kafka: each message goes to the topic *prefix* + topic, keyed by its key, acknowledged by all in-sync replicas.

    The producer waits for ``acks="all"``, so an acknowledged message
    survives the loss of its partition's leader, and is idempotent, so that
    its own retries within one connection do not write a message twice. A
    message that the relay sends again (after a lost acknowledgement, or a
    relay that stopped before marking it sent) is written again: consumers
    drop copies by the header ``uow-message-id``, or handle messages through
    the inbox. The key (UTF-8) is Kafka's key: Kafka keeps the order of a
    key's messages in its partition. The message's own headers go beside
    the id; a message without a key goes to a partition of Kafka's choosing.
    *config* goes to aiokafka's ``AIOKafkaProducer`` as it is
    (``security_protocol``, ``sasl_mechanism`` and the like).

    Kafka refuses a message that is too large, or a topic that is invalid or
    not allowed: those count an attempt. Any other error (Kafka or the
    network down, a topic whose partitions cannot be found, a producer that
    failed) counts none: the producer is closed, the relay waits and tries
    again with a new one. Starting the producer is given *timeout* seconds.
    """

    #: The ``messaging.system`` of the relay's OpenTelemetry spans.
    system = "kafka"

    def __init__(
        self, bootstrap_servers: str = "127.0.0.1:9092", *, prefix: str = "", timeout: float = 10.0, **config: Any
    ) -> None:
        try:
            import aiokafka  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise _missing("kafka", "aiokafka") from None
        self._aiokafka: Any = aiokafka
        self.bootstrap_servers = bootstrap_servers
        self.prefix = prefix
        self.timeout = timeout
        self.config = {"acks": "all", "enable_idempotence": True, **config}
        self._producer: Any = None

    async def _ready(self) -> Any:
        producer = self._producer
        if producer is None:
            producer = self._aiokafka.AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, **self.config)
            try:
                await asyncio.wait_for(producer.start(), self.timeout)
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return producer

    async def send(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Send each key's records in turn, awaiting each acknowledgement; raises if Kafka cannot be reached."""
        import aiokafka.errors  # type: ignore[import-untyped,unused-ignore]

        errors = aiokafka.errors
        refusals = (
            errors.MessageSizeTooLargeError,
            errors.RecordTooLargeError,
            errors.RecordListTooLargeError,
            errors.InvalidTopicError,
            errors.TopicAuthorizationFailedError,
            errors.PolicyViolationError,
        )
        try:
            producer = await self._ready()
        except (errors.KafkaError, OSError, asyncio.TimeoutError) as error:
            raise ConnectionError(f"Kafka cannot be reached: {type(error).__name__}: {error}") from error

        async def send_one(record: Record) -> None:
            headers = [(name, value.encode()) for name, value in record.headers.items()]
            headers.append(("uow-message-id", record.id.encode()))
            key = record.key.encode() if record.key is not None else None
            try:
                await producer.send_and_wait(self.prefix + record.topic, record.payload, key=key, headers=headers)
            except refusals:
                raise
            except errors.KafkaError as error:  # not about this message: the relay waits, then a new producer
                raise ConnectionError(f"Kafka cannot take messages now: {type(error).__name__}: {error}") from error

        return await _sent_or_closed(self, records, send_one, ())

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
