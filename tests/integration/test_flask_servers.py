"""The Flask extension under gunicorn on PostgreSQL: concurrent clients, failed commits, streams, disconnects.

gunicorn runs ``tests.integration.flask_apps:create_app()`` with two
preloaded workers of four threads each, on 127.0.0.1 and a port of the
system's choosing. What the tests check in the database, they read with raw
SQL on a connection of their own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.integration import flask_apps
from tests.support.databases import Provisioner
from tests.support.servers import GONE, ROOT, app_connections, server_env, wait_until_healthy


class Server(NamedTuple):
    """A gunicorn serving the test app, and the files it writes."""

    process: subprocess.Popen[bytes]
    url: str
    access_log: Path
    error_log: Path
    events: Path

    def stop(self) -> None:
        """Stop gracefully, as a deployment does: SIGTERM, then the workers finish and exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)


class Answer(NamedTuple):
    """What a client got for one request."""

    kind: str
    name: str
    status: int | str
    body_complete: bool


@pytest.fixture(name="db_engine")
def _db_engine(provisioner: Provisioner) -> Iterator[Engine]:
    """The run's PostgreSQL database with the app's table, empty; a small engine of the test's own on it."""
    engine = provisioner.track(provisioner.database("postgresql").engine(pool_size=2, max_overflow=0))
    flask_apps.metadata.drop_all(engine)
    flask_apps.metadata.create_all(engine)
    yield engine
    flask_apps.metadata.drop_all(engine)


@pytest.fixture(name="start_server")
def _start_server(provisioner: Provisioner, tmp_path: Path) -> Iterator[Callable[[], Server]]:
    """Start gunicorn; stop it at the end of the test if the test did not."""
    started: list[Server] = []

    def start() -> Server:
        events = tmp_path / "events"
        events.mkdir()
        database = provisioner.database("postgresql")
        env = server_env(
            UOW_TEST_FLASK_DATABASE_URL=database.url.render_as_string(hide_password=False),
            UOW_TEST_FLASK_EVENTS=str(events),
        )
        access_log, error_log = tmp_path / "access.log", tmp_path / "error.log"
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind=127.0.0.1:0",
            "--workers=2",
            "--threads=4",
            "--preload",
            "--graceful-timeout=10",
            f"--access-logfile={access_log}",
            "--access-logformat=%(m)s %(U)s %(s)s",
            f"--error-logfile={error_log}",
            f"--chdir={ROOT}",
            "tests.integration.flask_apps:create_app()",
        ]
        process = subprocess.Popen(command, env=env, cwd=ROOT)
        server = Server(process, wait_for_port(process, error_log), access_log, error_log, events)
        started.append(server)
        wait_until_healthy("gunicorn", server.url, process, error_log)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def wait_for_port(process: subprocess.Popen[bytes], error_log: Path) -> str:
    """The URL gunicorn listens at, read from its log, where it names the port the system chose."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log = error_log.read_text() if error_log.exists() else ""
        found = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log)
        if found:
            return found.group(1)
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited with {process.returncode}:\n{log}")
        time.sleep(0.05)
    pytest.fail(f"gunicorn did not start listening:\n{error_log.read_text()}")


def logged(server: Server, prefix: str = "/entries") -> list[tuple[str, int]]:
    """The (path, status) of each request gunicorn logged under *prefix* (which /mapped/entries contains too)."""
    if not server.access_log.exists():
        return []
    lines = [line.split() for line in server.access_log.read_text().splitlines()]
    return [(path, int(status)) for _, path, status in lines if prefix in path or path == "/misuse-stream"]


def wait_until_logged(server: Server, count: int) -> list[tuple[str, int]]:
    """Wait until gunicorn has logged *count* requests: those whose client left may still be running."""
    deadline = time.monotonic() + 20
    while len(found := logged(server)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def stored(engine: Engine) -> dict[str, str]:
    """The committed entries, name to ref, read with raw SQL on the test's own connection."""
    with engine.connect() as connection:
        return {
            str(name): str(ref) for name, ref in connection.execute(text("SELECT name, ref FROM uow_flask_entries"))
        }


def server_connections(engine: Engine) -> dict[str, int]:
    """The app's connections to the run's database, by state, as PostgreSQL sees them."""
    return app_connections(engine, flask_apps.APPLICATION_NAME)


def wait_until_closed(engine: Engine) -> dict[str, int]:
    """The app's connections once PostgreSQL has seen them all go, or after 5 s."""
    deadline = time.monotonic() + 5
    while (connections := server_connections(engine)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return connections


def checked_out_per_worker(server: Server) -> dict[int, int]:
    """Each worker's count of connections checked out of its pool, asked until both workers answered."""
    found: dict[int, int] = {}
    for _ in range(100):
        stats = httpx.get(f"{server.url}/stats", timeout=5).json()  # a new connection each time
        found[stats["pid"]] = stats["checked_out"]
        if 2 == len(found):
            break
    return found


def send(client: httpx.Client, url: str, kind: str, name: str) -> Answer:
    """One request of *kind*, as a client of that kind behaves; returns what the client got."""
    try:
        if kind in ("commit", "stream", "duplicate", "taken", "fail", "refuse", "mapped"):
            path = {
                "commit": f"/entries/{name}",
                "stream": f"/entries/{name}/stream",
                "duplicate": f"/entries/{name}?ref=dup-{int(name[-3:]) // 3}",  # 3 requests per ref
                "taken": f"/entries/{name}?ref=taken",
                "fail": f"/entries/{name}/fail",
                "refuse": f"/entries/{name}/refuse",
                "mapped": f"/mapped/entries/{name}?ref=taken",
            }[kind]
            response = client.post(url + path)
            complete = kind != "stream" or re.fullmatch(rf"{name}\n\d+\n", response.text) is not None
            return Answer(kind, name, response.status_code, complete)
        if kind == "misuse-stream":
            with client.stream("GET", f"{url}/misuse-stream") as response:
                status = response.status_code
                try:
                    response.read()
                except httpx.RemoteProtocolError:
                    return Answer(kind, name, status, False)
                return Answer(kind, name, status, True)
        if kind == "leave-mid-stream":
            with client.stream("POST", f"{url}/entries/{name}/slow-stream") as response:
                next(response.iter_raw())  # the first chunk, then the client goes
                return Answer(kind, name, response.status_code, False)
        assert "leave-early" == kind
        client.post(f"{url}/entries/{name}/slow", timeout=0.1)
    except httpx.TimeoutException:
        return Answer(kind, name, GONE, False)
    pytest.fail(f"the client of {name} ({kind}) was answered before it left")


def test_concurrent_clients_get_the_status_of_their_commit_and_no_connection_stays_checked_out(
    db_engine: Engine, start_server: Callable[[], Server]
) -> None:
    """300 requests from 30 clients at once: a row for each 2xx, none for a failed commit, no connection left out."""
    with db_engine.begin() as connection:
        connection.execute(flask_apps.entries.insert(), [{"name": "seed", "ref": "taken"}])
    server = start_server()
    mix = {
        "commit": 90,
        "stream": 30,
        "duplicate": 60,  # 20 refs, 3 requests each: one commits, the COMMIT of the others fails
        "taken": 30,  # the ref exists: every COMMIT fails
        "mapped": 15,  # the same, where an error handler maps the failure to 409
        "fail": 15,
        "refuse": 15,
        "misuse-stream": 15,
        "leave-mid-stream": 15,
        "leave-early": 15,
    }
    requests = [(kind, f"{kind}-{number:03}") for kind, count in mix.items() for number in range(count)]
    random.Random(12).shuffle(requests)

    limits = httpx.Limits(max_connections=30, max_keepalive_connections=30)
    with httpx.Client(limits=limits, timeout=20) as client, concurrent.futures.ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda request: send(client, server.url, *request), requests))
    access = wait_until_logged(server, len(requests))
    rows = stored(db_engine)
    connections = server_connections(db_engine)
    checked_out = checked_out_per_worker(server)
    statuses = collections.Counter(answer.status for answer in answers)
    by_kind = {kind: collections.Counter(a.status for a in answers if a.kind == kind) for kind in mix}
    print(f"\nrequests {len(requests)}, statuses {dict(statuses)}, rows {len(rows) - 1} (and the seed),")
    print(f"connections by state {connections}, checked out per worker {checked_out}")

    streams = ("stream", "misuse-stream")
    succeeded = {a.name for a in answers if isinstance(a.status, int) and 200 <= a.status < 300}
    left_early = {a.name for a in answers if a.kind == "leave-early"}
    answered_after_they_left = {
        path.split("/")[2] for path, status in access if path.endswith("/slow") and status == 201
    }
    assert len(requests) == len(access)
    assert {
        "commit": {201: 90},
        "stream": {200: 30},
        "duplicate": {201: 20, 500: 40},
        "taken": {500: 30},
        "mapped": {409: 15},
        "fail": {500: 15},
        "refuse": {422: 15},
        "misuse-stream": {200: 15},
        "leave-mid-stream": {200: 15},
        "leave-early": {GONE: 15},
    } == by_kind
    assert ({True}, {False}) == tuple({a.body_complete for a in answers if a.kind == kind} for kind in streams)
    # A client that left does not stop the view: its work is committed when gunicorn says it answered 2xx.
    assert {"seed"} | (succeeded - {a.name for a in answers if a.kind == "misuse-stream"}) | (
        left_early & answered_after_they_left
    ) == set(rows)
    assert 15 == len(left_early & answered_after_they_left)
    assert 20 == len({ref for name, ref in rows.items() if ref.startswith("dup-")})
    assert {"idle"} == set(connections)
    assert {0} == set(checked_out.values())
    assert 2 == len(checked_out)
    assert "ext.uow was used in a response body streamed after the request was torn down" in (
        server.error_log.read_text()
    )


def test_a_failed_commit_costs_the_client_no_connection(db_engine: Engine, start_server: Callable[[], Server]) -> None:
    """A COMMIT that fails is answered 500 (or 409 where mapped) on a connection that stays open for the next one."""
    with db_engine.begin() as connection:
        connection.execute(flask_apps.entries.insert(), [{"name": "seed", "ref": "taken"}])
    server = start_server()

    with httpx.Client(base_url=server.url) as client:
        before = client.get("/port").text
        failed = client.post("/entries/lamp?ref=taken").status_code
        mapped = client.post("/mapped/entries/desk?ref=taken").status_code
        after = client.get("/port").text

    assert (500, 409, before) == (failed, mapped, after)
    assert {"seed": "taken"} == stored(db_engine)


def test_shutdown_closes_every_connection_the_extension_opened(
    db_engine: Engine, start_server: Callable[[], Server]
) -> None:
    """At a graceful stop, each process (the preloading master, each worker) closes every connection it opened."""
    server = start_server()
    with httpx.Client(base_url=server.url) as client:
        statuses = {client.post(f"/entries/item-{number}").status_code for number in range(20)}

    server.stop()
    events = {path.stem: collections.Counter(path.read_text().split()) for path in server.events.glob("*.events")}

    assert ({201}, 0) == (statuses, server.process.returncode)
    assert str(server.process.pid) in events  # the master checked the database at startup
    assert 2 <= len(events)  # and a worker at least served the requests
    assert [] == [pid for pid, counted in events.items() if counted["connect"] != counted["close"]]
    assert {} == wait_until_closed(db_engine)
