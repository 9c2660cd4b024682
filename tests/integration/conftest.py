"""Fixtures for tests that run on real databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from tests.support.databases import IN_CI, Database, Provisioner, check_nothing_left
from tests.support.models import TABLES
from tests.support.otel import otel  # noqa: F401  # the fixture, for the tests of this directory

BACKENDS = ("sqlite", "postgresql", "mariadb")


@pytest.fixture(scope="session")
def provisioner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioner]:
    """The run's databases and engines."""
    prov = Provisioner(tmp_path_factory.mktemp("databases"))
    yield prov
    prov.close()


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, provisioner: Provisioner) -> Database:
    """This run's database on each backend in turn."""
    return provisioner.database(request.param)


@pytest.fixture
def engine(database: Database, provisioner: Provisioner) -> Engine:
    """A sync engine on the run's database, with the test tables created and emptied."""
    eng = provisioner.schema_engine(database.backend)
    with eng.begin() as conn:
        for table in TABLES:
            conn.execute(table.delete())
    return eng


@pytest.fixture(autouse=True)
def _no_connection_left_checked_out(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, no unit of work is active and every engine's pool has all its connections back."""
    yield
    check_nothing_left(request)


def rows(eng: Engine, sql: str) -> list[tuple[object, ...]]:
    """Rows read through a separate connection, with plain SQL."""
    with eng.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


@pytest.fixture
def redis_url() -> str:
    """Redis, for the relay's broker: skipped with the reason on a developer machine, a failure in CI."""
    import redis

    url = "redis://127.0.0.1:6379"
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError as error:
        reason = f"Redis is not reachable at {url} ({error}); start it with scripts/services.sh"
        if IN_CI:
            pytest.fail(f"CI needs every broker: {reason}", pytrace=False)
        pytest.skip(reason)
    return url


def _broker_down(name: str, url: str, error: BaseException) -> None:
    reason = f"{name} is not reachable at {url} ({type(error).__name__}: {error}); start it with scripts/services.sh"
    if IN_CI:
        pytest.fail(f"CI needs every broker: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def rabbitmq_url() -> str:
    """RabbitMQ (guest/guest), for the relay's broker: skipped with the reason on a developer machine, failed in CI."""
    import socket

    url = "amqp://guest:guest@127.0.0.1:5672/"
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as error:
        _broker_down("RabbitMQ", url, error)
    return url


@pytest.fixture
def nats_url() -> str:
    """NATS with JetStream, for the relay's broker: skipped with the reason on a developer machine, failed in CI."""
    import socket

    url = "nats://127.0.0.1:4222"
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=2).close()
    except OSError as error:
        _broker_down("NATS", url, error)
    return url
