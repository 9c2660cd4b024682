"""uow on ASGI servers: uvicorn, hypercorn and granian run ``tests.integration.asgi_apps:app``.

Each server runs as a subprocess on 127.0.0.1 and a free port, in front of
the run's PostgreSQL database (uvicorn also in front of a SQLite file). The
app mounts Starlette with ``UnitOfWorkMiddleware``, FastAPI with
``uow.fastapi.depends()``, and FastAPI with the middleware (see
:mod:`tests.integration.asgi_apps`). None of these servers speaks ASGI 2.4,
so Starlette sends streaming and file responses from a task of their own.

Concurrent httpx clients send commits, failed commits, endpoints that raise
or answer 409, streams, files, background tasks, and clients that leave
early. What the tests check in the database, they read with raw SQL on a
connection of their own.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.integration import asgi_apps
from tests.support.databases import Provisioner
from tests.support.servers import (
    GONE,
    Answer,
    AsgiServer,
    app_connections,
    asgi_server,
    mixed_requests,
    run_clients,
    server_env,
    stored_names,
    successes,
)

#: The servers and databases the tests run on.
SETUPS = [("uvicorn", "postgresql"), ("hypercorn", "postgresql"), ("granian", "postgresql"), ("uvicorn", "sqlite")]


def command(name: str, port: int) -> list[str]:
    app = "tests.integration.asgi_apps:app"
    if name == "uvicorn":
        return [sys.executable, "-m", "uvicorn", "--host=127.0.0.1", f"--port={port}", "--no-access-log", app]
    if name == "hypercorn":
        return [sys.executable, "-m", "hypercorn", f"--bind=127.0.0.1:{port}", app]
    return [sys.executable, "-m", "granian", "--interface=asgi", "--host=127.0.0.1", f"--port={port}", app]


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{name}-{backend}" for name, backend in SETUPS])
def server(
    request: pytest.FixtureRequest, provisioner: Provisioner, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsgiServer]:
    """A server running the app over the run's database, with the app's table and its one "taken" ref."""
    name, backend = request.param
    database = provisioner.database(backend)
    engine = provisioner.track(database.engine(pool_size=1, max_overflow=0))
    env = server_env(UOW_TEST_ASGI_DATABASE_URL=database.async_url.render_as_string(hide_password=False))
    try:
        with asgi_server(
            name,
            backend,
            lambda port: command(name, port),
            env=env,
            log=tmp_path_factory.mktemp(name) / "server.log",
            engine=engine,
            metadata=asgi_apps.metadata,
            entries=asgi_apps.entries,
        ) as server:
            yield server
    finally:
        engine.dispose()


def stored(server: AsgiServer, prefix: str) -> set[str]:
    """The names of the committed entries under *prefix*, read with raw SQL on the test's own connection."""
    return stored_names(server.engine, "uow_asgi_entries", prefix)


def connections_of_the_app(server: AsgiServer) -> dict[str, int]:
    """The app's connections to the run's database, by state, as PostgreSQL sees them ({} on SQLite)."""
    if server.backend != "postgresql":
        return {}
    return app_connections(server.engine, asgi_apps.APPLICATION_NAME)


# -- the clients ---------------------------------------------------------------------------------------------

#: What each kind of request expects, by whether the mount maps a failed commit to 409.
EXPECTED: dict[str, tuple[int | str, int | str]] = {
    # kind: (status where mapped, status where not)
    "commit": (201, 201),
    "duplicate": (409, 500),  # the ref is taken: the COMMIT fails
    "conflict": (409, 409),  # the endpoint answers 409 without raising: rolled back
    "raise": (500, 500),
    "later": (201, 201),  # and a background task commits "<name>-later"
    "stream": (200, 200),
    "file": (200, 200),
    "gone": (GONE, GONE),  # the client leaves before the answer
    "stream-gone": (200, 200),  # the client leaves after the first chunk
}


async def send(client: httpx.AsyncClient, kind: str, mount: str, name: str) -> Answer:
    """One request of *kind*, as a client of that kind behaves; returns what the client got."""
    params = {"name": name}
    if kind in ("commit", "duplicate", "conflict", "raise", "later"):
        extra = {
            "duplicate": {"ref": "taken"},
            "conflict": {"conflict": "1"},
            "raise": {"fail": "1"},
            "later": {"later": "1"},
        }
        headers = {"Connection": "close"} if kind == "raise" else {}  # the server closes it after a crash
        response = await client.post(f"{mount}/entries", params=params | extra.get(kind, {}), headers=headers)
        return Answer(kind, mount, name, response.status_code, response.headers.get("x-client-port", ""))
    if kind in ("stream", "file"):
        method, path = ("POST", "/stream") if kind == "stream" else ("GET", "/file")
        response = await client.request(method, f"{mount}{path}", params=params)
        complete = response.text == "one two three" if kind == "stream" else '"""The ASGI app' in response.text
        assert complete, f"{kind} {name}: {response.status_code} {response.text[:200]!r}"
        return Answer(kind, mount, name, response.status_code, response.headers.get("x-client-port", ""))
    if kind == "stream-gone":
        async with client.stream("POST", f"{mount}/stream", params=params) as response:
            async for _ in response.aiter_raw():
                break  # the first chunk, then the client goes
            return Answer(kind, mount, name, response.status_code, response.headers.get("x-client-port", ""))
    assert "gone" == kind
    try:
        await client.post(f"{mount}/slow", params=params, timeout=0.05)
    except httpx.TimeoutException:
        return Answer(kind, mount, name, GONE, "")
    pytest.fail(f"the client of {name} was answered before it left")


# -- the tests -------------------------------------------------------------------------------------------------


async def test_concurrent_clients_get_the_status_of_their_commit_and_no_connection_stays_checked_out(
    server: AsgiServer,
) -> None:
    """Mixed requests from concurrent clients: a row for each 2xx the app started, none for a failure, none out."""
    prefix = "load-"
    kinds = list(EXPECTED)
    mounts = list(asgi_apps.MOUNTS)
    # SQLite takes one writer at a time: fewer clients, fewer requests.
    count, clients = (len(kinds) * len(mounts) * 8, 30) if server.backend == "postgresql" else (90, 10)
    requests = mixed_requests(kinds, mounts, count, prefix)

    answers = await run_clients(server.url, requests, clients, send)
    stats = server.settled(prefix)
    rows = stored(server, prefix)
    connections = connections_of_the_app(server)
    statuses = collections.Counter(answer.status for answer in answers)
    later = {f"{a.name}-later" for a in answers if a.kind == "later" and a.status == 201}
    succeeded = successes(stats)
    left = [a for a in answers if a.status == GONE]
    served_after_leaving = collections.Counter(a.mount for a in left if a.name in succeeded)
    print(
        f"\n{server.name} on {server.backend}: {len(answers)} requests from {clients} clients, "
        f"statuses {dict(sorted(statuses.items(), key=str))}, "
        f"rows {len(rows)} (2xx started by the app {len(succeeded)}, background {len(later)}), "
        f"checked out {stats['checked_out']}, app connections {connections}; "
        f"of {len(left)} clients that left, answered 2xx after they left: {dict(served_after_leaving)}"
    )

    assert [] == [a for a in answers if EXPECTED[a.kind][0 if asgi_apps.MOUNTS[a.mount] else 1] != a.status]
    assert succeeded | later == rows
    assert not {a.name for a in answers if isinstance(a.status, int) and a.status >= 400} & rows
    assert (0, 0) == (stats["checked_out"], stats["in_flight"])
    assert set(connections) <= {"idle"}


async def test_a_failed_commit_costs_the_client_no_connection(server: AsgiServer) -> None:
    """A COMMIT that fails is answered 500, or 409 where mapped, on a connection that stays open for the next."""
    prefix = "keep-"
    async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=1)) as http:
        answers = []
        for number, mount in enumerate(asgi_apps.MOUNTS):
            for kind in ("duplicate", "commit"):
                answers.append(await send(http, kind, mount, f"{prefix}{kind}-{number}"))

    assert [
        EXPECTED[kind][0 if mapped else 1] for mapped in asgi_apps.MOUNTS.values() for kind in ("duplicate", "commit")
    ] == [answer.status for answer in answers]
    assert 1 == len({answer.port for answer in answers})
    assert {a.name for a in answers if a.kind == "commit"} == stored(server, prefix)
    assert 0 == server.settled(prefix)["checked_out"]


async def test_a_streaming_and_a_file_response_commit_before_they_start(server: AsgiServer) -> None:
    """A valid StreamingResponse, and a FileResponse, sent from Starlette's own task: committed, 200, body whole."""
    prefix = "stream-"
    async with httpx.AsyncClient(base_url=server.url) as http:
        answers = [
            await send(http, kind, mount, f"{prefix}{kind}-{number}")
            for number, mount in enumerate(asgi_apps.MOUNTS)
            for kind in ("stream", "file")
        ]

    assert {200} == {answer.status for answer in answers}
    assert {answer.name for answer in answers} == stored(server, prefix)
    assert 0 == server.settled(prefix)["checked_out"]
