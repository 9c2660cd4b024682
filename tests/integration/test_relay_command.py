"""``python -m uow.relay`` as a process: it relays to Redis until SIGTERM, then finishes its pass and exits 0."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from sqlalchemy import Engine

from tests.integration.test_relay import publish, rows
from tests.support.databases import Database

ROOT = Path(__file__).resolve().parents[2]


#: The environment of a relay process: it imports the test models from the repository.
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT)}


def relay_command(database: Database, broker: str, *options: str) -> list[str]:
    """``python -m uow.relay`` on the run's database and the test models' outbox, polling every 50 ms."""
    database_url = database.async_url.render_as_string(hide_password=False)
    outbox = "tests.support.models:OUTBOX"
    return [sys.executable, "-m", "uow.relay", "--database", database_url, "--outbox", outbox, "--broker", broker,
            "--poll-interval", "0.05", *options]  # fmt: skip


def test_the_relay_command_sends_to_redis_and_stops_cleanly_on_sigterm(
    database: Database, engine: Engine, redis_url: str
) -> None:
    """The command sends every committed message to its stream, and SIGTERM ends it with status 0."""
    publish(engine, ("orders", 1, "a"), ("orders", 2, "b"))
    publish(engine, ("orders", "lost", "a"), commit=False)
    prefix = f"uow-test-{secrets.token_hex(4)}:"
    command = relay_command(database, f"{redis_url}/0?prefix={prefix}")
    process = subprocess.Popen(command, cwd=ROOT, env=ENVIRONMENT, stderr=subprocess.PIPE, text=True)
    reader = redis.Redis.from_url(redis_url)
    try:
        publish(engine, ("orders", 3, "a"))  # committed while the relay runs
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(row["published_at"] for row in rows(engine)):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=20)
        assert 0 == process.returncode, errors
        assert "stopped after publishing 3 messages" in errors
        entries = [fields[b"payload"] for _, fields in reader.xrange(f"{prefix}orders")]
        assert sorted([b"1", b"2", b"3"]) == sorted(entries)
        assert entries.index(b"1") < entries.index(b"3")  # key a in order
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.delete(f"{prefix}orders")
        reader.close()


def test_the_relay_command_refuses_an_unknown_broker_or_outbox(database: Database, engine: Engine) -> None:
    """A broker URL of no known scheme, or an outbox path naming something else, exits with a clear error."""
    base = [sys.executable, "-m", "uow.relay", "--database", database.async_url.render_as_string(False)]
    for extra, expected in (
        (["--outbox", "tests.support.models:OUTBOX", "--broker", "smtp://x"], "no broker for 'smtp://x'"),
        (["--outbox", "tests.support.models:Item", "--broker", "memory://"], "neither a uow.Outbox"),
    ):
        finished = subprocess.run(
            base + extra, cwd=ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=60, check=False
        )
        assert 0 != finished.returncode
        assert expected in finished.stderr
