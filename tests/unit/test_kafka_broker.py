"""The Kafka broker of the relay.

No Kafka server runs where these tests run, so the producer that
``uow.brokers.Kafka`` drives is aiokafka's own where the test needs no
server (an address nobody listens on), and a recording stand-in where it
needs one: the stand-in answers as ``AIOKafkaProducer`` does, and the tests
check what the broker asks of it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiokafka.errors
import pytest
from pytest_mock import MockerFixture

from uow.brokers import Kafka
from uow.relay import Record, broker_for


class RecordingProducer:
    """Stands in for ``aiokafka.AIOKafkaProducer``: keeps what was sent, refuses payloads it is told to."""

    made: list[RecordingProducer] = []  # noqa: RUF012 - the instances the broker built, for the test to read

    def __init__(self, *, bootstrap_servers: str, **config: Any) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.config = config
        self.sent: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
        self.refuse: dict[bytes, BaseException] = {}
        self.started = self.stopped = False
        RecordingProducer.made.append(self)

    #: Whether start() waits forever, as aiokafka's does when the brokers go away after the bootstrap.
    hangs = False

    async def start(self) -> None:
        if RecordingProducer.hangs:
            await asyncio.Event().wait()
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send_and_wait(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        await asyncio.sleep(0)
        error = self.refuse.get(value)
        if error is not None:
            raise error
        self.sent.append((topic, value, key, headers))


def _record(position: int, key: str | None, payload: bytes, headers: dict[str, str] | None = None) -> Record:
    return Record(position, f"{position:032d}", "orders", key, payload, headers or {}, 0)


@pytest.fixture
def producer(mocker: MockerFixture) -> Any:
    RecordingProducer.made.clear()
    RecordingProducer.hangs = False
    mocker.patch("aiokafka.AIOKafkaProducer", RecordingProducer)
    return RecordingProducer


def test_kafka_sends_each_message_with_its_key_id_and_headers_to_the_prefixed_topic(producer: Any) -> None:
    """Kafka gets the topic after the prefix, the key as Kafka's key, and the message id beside the headers."""
    broker = Kafka("kafka-1:9092,kafka-2:9092", prefix="shop.")
    records = [_record(1, "order-7", b"one", {"traceparent": "00-ab-cd-01"}), _record(2, None, b"two")]

    outcomes = asyncio.run(broker.send(records))

    assert outcomes == [None, None]
    (made,) = producer.made
    assert made.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert made.config == {"acks": "all", "enable_idempotence": True}
    assert made.sent == [
        ("shop.orders", b"one", b"order-7", [("traceparent", b"00-ab-cd-01"), ("uow-message-id", b"0" * 31 + b"1")]),
        ("shop.orders", b"two", None, [("uow-message-id", b"0" * 31 + b"2")]),
    ]
    asyncio.run(broker.close())
    assert made.stopped


def test_a_refused_kafka_message_stops_its_key_and_the_other_keys_go_on(producer: Any) -> None:
    """A message Kafka refuses is reported with its error; its key's later messages wait, other keys are sent."""
    broker = Kafka()

    async def send() -> list[BaseException | None]:
        await broker._ready()
        producer.made[0].refuse[b"a1"] = aiokafka.errors.MessageSizeTooLargeError()
        return await broker.send(
            [_record(1, "a", b"a1"), _record(2, "b", b"b1"), _record(3, "a", b"a2"), _record(4, "b", b"b2")]
        )

    outcomes = asyncio.run(send())

    assert isinstance(outcomes[0], aiokafka.errors.MessageSizeTooLargeError)
    assert outcomes[1] is None
    assert outcomes[3] is None
    assert outcomes[2] is not None  # not sent: it waits behind the refused one of its key
    assert [value for _, value, _, _ in producer.made[0].sent] == [b"b1", b"b2"]


def test_kafka_timing_out_mid_batch_raises_connection_error_and_drops_the_producer(producer: Any) -> None:
    """A send that times out means Kafka cannot be reached: ConnectionError, so the relay waits, and a new producer."""
    broker = Kafka()

    async def send() -> None:
        await broker._ready()
        producer.made[0].refuse[b"x"] = aiokafka.errors.KafkaTimeoutError()
        await broker.send([_record(1, "a", b"x")])

    with pytest.raises(ConnectionError, match="KafkaTimeoutError"):
        asyncio.run(send())
    assert producer.made[0].stopped
    assert broker._producer is None


@pytest.mark.parametrize(
    "error",
    [
        aiokafka.errors.UnknownTopicOrPartitionError(),
        aiokafka.errors.OutOfOrderSequenceNumber(),
        aiokafka.errors.KafkaError(),
    ],
    ids=["partitions not found", "producer failed", "any other"],
)
def test_a_kafka_error_that_is_not_about_the_message_counts_no_attempt_and_the_next_send_has_a_new_producer(
    producer: Any, error: BaseException
) -> None:
    """Only a refusal of the message counts an attempt: other Kafka errors are ConnectionError, then a new producer."""
    broker = Kafka()

    async def send() -> list[BaseException | None]:
        await broker._ready()
        producer.made[0].refuse[b"x"] = error
        with pytest.raises(ConnectionError, match=type(error).__name__):
            await broker.send([_record(1, "a", b"x")])
        return await broker.send([_record(1, "a", b"x")])

    assert asyncio.run(send()) == [None]
    first, second = producer.made
    assert first.stopped
    assert second.sent == [("orders", b"x", b"a", [("uow-message-id", b"0" * 31 + b"1")])]


def test_a_kafka_producer_that_cannot_start_in_time_is_connection_error(producer: Any) -> None:
    """A producer whose start() hangs gives up after the timeout: ConnectionError, so the relay's transaction ends."""
    producer.hangs = True
    broker = Kafka(timeout=0.05)

    with pytest.raises(ConnectionError, match="TimeoutError"):
        asyncio.run(broker.send([_record(1, "a", b"x")]))
    assert producer.made[0].stopped
    assert broker._producer is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_kafka_that_nobody_serves_raises_connection_error() -> None:
    """With aiokafka's own producer, an address where no Kafka listens is ConnectionError, which the relay waits out."""
    broker = Kafka(f"127.0.0.1:{_closed_port()}", request_timeout_ms=2000)

    with pytest.raises(ConnectionError, match="Kafka cannot be reached"):
        asyncio.run(broker.send([_record(1, "a", b"x")]))
    assert broker._producer is None
    asyncio.run(broker.close())


def test_a_kafka_url_names_the_servers_and_the_prefix() -> None:
    """broker_for('kafka://host:port,host:port?prefix=...') builds the Kafka broker with those servers and prefix."""
    broker = broker_for("kafka://k1:9092,k2:9093?prefix=shop.")

    assert isinstance(broker, Kafka)
    assert broker.bootstrap_servers == "k1:9092,k2:9093"
    assert broker.prefix == "shop."
