"""Real servers for the integration tests: start one, drive it with concurrent clients, read what it stored.

A server runs the test app as a subprocess on 127.0.0.1 and a free port,
with the checkout importable. The app side's :class:`Recorder` records the
status of every response the app started, which ``GET /stats`` answers
with. What the tests check in the database, they read with raw SQL on a
connection of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import httpx
import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, UniqueConstraint, text

ROOT = Path(__file__).resolve().parents[2]
#: What a client that left before the answer records instead of a status.
GONE = "gone"


def server_env(**variables: str) -> dict[str, str]:
    """The environment of a server process: this one's, with the checkout importable and *variables* set."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **variables}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_healthy(name: str, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until ``GET /health`` answers 200; fail with the server's log if it exits or stays silent for 20 s."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if 200 == httpx.get(f"{url}/health", timeout=1).status_code:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{name} did not answer:\n{log.read_text()}")


def stored_names(engine: Engine, table: str, prefix: str) -> set[str]:
    """The names of the committed rows of *table* under *prefix*, read with raw SQL on the test's own connection."""
    query = text(f"SELECT name FROM {table} WHERE name LIKE :prefix")
    with engine.connect() as connection:
        return {str(name) for (name,) in connection.execute(query, {"prefix": f"{prefix}%"})}


def app_connections(engine: Engine, application_name: str) -> dict[str, int]:
    """The app's connections to the run's PostgreSQL database, by state, as PostgreSQL sees them."""
    query = text(
        "SELECT coalesce(state, 'none'), count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = :name GROUP BY 1"
    )
    with engine.connect() as connection:
        return {str(state): int(n) for state, n in connection.execute(query, {"name": application_name})}


# -- an ASGI server over a table of entries with one "taken" ref ------------------------------------------------


class AsgiServer(NamedTuple):
    """An ASGI server running a test app whose outermost layer is a :class:`Recorder`, and what it runs on."""

    name: str
    backend: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    engine: Engine

    def stats(self, prefix: str) -> dict[str, Any]:
        """The app's view: the responses it started for names under *prefix*, requests in flight, the pool."""
        stats: dict[str, Any] = httpx.get(f"{self.url}/stats", params={"prefix": prefix}, timeout=5).json()
        return stats

    def settled(self, prefix: str) -> dict[str, Any]:
        """The app's view once no request is running any more (a client that left may still be served)."""
        deadline = time.monotonic() + 10
        while (stats := self.stats(prefix))["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return stats


@contextlib.contextmanager
def asgi_server(
    name: str,
    backend: str,
    command: Callable[[int], list[str]],
    *,
    env: dict[str, str],
    log: Path,
    engine: Engine,
    metadata: MetaData,
    entries: Table,
) -> Iterator[AsgiServer]:
    """Run the server that *command* starts on a port, over *entries* created afresh with one "taken" ref.

    The server is healthy when this yields; it is stopped with SIGTERM (killed
    if it does not exit within 15 s) and the tables are dropped at the end.
    """
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(entries.insert(), [{"name": "seed", "ref": "taken"}])
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(command(port), env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    server = AsgiServer(name, backend, process, f"http://127.0.0.1:{port}", log, engine)
    try:
        wait_until_healthy(name, server.url, process, log)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        metadata.drop_all(engine)


def successes(stats: dict[str, Any]) -> set[str]:
    """The names whose response the app started with a 2xx status."""
    return {name for _, name, status in stats["responses"] if 200 <= status < 300}


class Answer(NamedTuple):
    """What a client got for one request."""

    kind: str
    mount: str
    name: str
    status: int | str
    port: str


def mixed_requests(kinds: list[str], mounts: list[str], count: int, prefix: str) -> list[tuple[str, str, str]]:
    """*count* requests (kind, mount, name): every kind on every mount in turn, names numbered under *prefix*."""
    return [(kinds[(n // len(mounts)) % len(kinds)], mounts[n % len(mounts)], f"{prefix}{n:03}") for n in range(count)]


async def run_clients(
    url: str,
    requests: list[tuple[str, str, str]],
    clients: int,
    send: Callable[[httpx.AsyncClient, str, str, str], Awaitable[Answer]],
) -> list[Answer]:
    """Send *requests* (kind, mount, name) with *send* from *clients* httpx clients at once, each on a connection."""
    queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    answers: list[Answer] = []

    async def client() -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=20) as http:
            while not queue.empty():
                answers.append(await send(http, *queue.get_nowait()))

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


# -- the app's side ----------------------------------------------------------------------------------------------


def entries_table(name: str, metadata: MetaData) -> Table:
    """A test app's table of entries: a *name*, and a ``ref`` whose uniqueness PostgreSQL checks at COMMIT.

    The unique constraint is ``DEFERRABLE INITIALLY DEFERRED``: a duplicate
    ``ref`` is accepted by the INSERT and refused by the COMMIT itself.
    """
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(80), nullable=False),
        Column("ref", String(80), nullable=False),
        UniqueConstraint("ref", name=f"{name}_ref", deferrable=True, initially="DEFERRED"),
    )


class Recorder:
    """The app's outermost ASGI layer: records each response's status and adds the client's port to it.

    The port goes in ``x-client-port``: which connection the request came on.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        #: (path, name, status) of every response started, in order.
        self.responses: list[tuple[str, str, int]] = []
        self.in_flight = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/stats":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        name = parse_qs(scope["query_string"].decode()).get("name", [""])[0]
        port = str((scope.get("client") or ("", 0))[1]).encode()

        async def recording(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.responses.append((path, name, int(message["status"])))
                message = {**message, "headers": [*message.get("headers", []), (b"x-client-port", port)]}
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, recording)
        finally:
            self.in_flight -= 1

    def stats(self, prefix: str, checked_out: int) -> dict[str, Any]:
        """What ``GET /stats`` answers: the responses started for names under *prefix*, in flight, the pool."""
        return {
            "pid": os.getpid(),
            "in_flight": self.in_flight,
            "checked_out": checked_out,
            "responses": [list(row) for row in self.responses if row[1].startswith(prefix)],
        }
