"""``python -m allocation`` end to end on a temporary SQLite file."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.pool import QueuePool

from allocation import cli, config


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "allocation.sqlite3"


@pytest.fixture
def reader(sqlite_file: Path) -> Iterator[Engine]:
    """A separate engine on the file that the CLI writes, for checking rows with plain SQL."""
    engine = create_engine(f"sqlite:///{sqlite_file}")
    yield engine
    assert 0 == checked_out(engine)
    engine.dispose()


def checked_out(engine: Engine) -> int:
    """How many connections of *engine* are checked out of its pool."""
    pool = engine.pool
    assert isinstance(pool, QueuePool), pool
    return pool.checkedout()


def rows(engine: Engine, sql: str) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def run_id(output: str) -> str:
    match = re.search(r"^run: ([0-9a-f]{8})$", output, re.MULTILINE)
    assert match is not None, output
    return match.group(1)


def test_main_runs_the_scenario_and_reports_each_step(
    sqlite_file: Path, reader: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() adds batches, allocates, reallocates through the bus and prints each step."""
    assert 0 == cli.main(["--database", f"sqlite:///{sqlite_file}"])

    output = capsys.readouterr().out
    run = run_id(output)
    lines = output.splitlines()
    assert f"database: sqlite:///{sqlite_file}" == lines[0]
    assert f"allocated order-{run}-1 (10 x SMALL-TABLE-{run}) to stock-{run}" in lines
    assert f"allocated order-{run}-2 (8 x SMALL-TABLE-{run}) to stock-{run}" in lines
    assert f"allocated order-{run}-3 (5 x BLUE-LAMP-{run}) to lamps-{run}" in lines
    assert f"out of stock: order-{run}-4 (1 x BLUE-LAMP-{run}) was not allocated" in lines
    assert f"changed batch stock-{run} to 10 units" in lines
    assert f"reallocated order-{run}-2 from stock-{run} to shipment-{run}" in lines
    assert [
        f"  stock-{run}: 0 of 10 available; orders: order-{run}-1",
        f"  shipment-{run}: 92 of 100 available; orders: order-{run}-2",
        f"  lamps-{run}: 0 of 5 available; orders: order-{run}-3",
    ] == lines[-3:]

    assert [(f"BLUE-LAMP-{run}", 1), (f"SMALL-TABLE-{run}", 4)] == rows(
        reader, "SELECT sku, version_number FROM products ORDER BY sku"
    )
    assert [
        (f"lamps-{run}", f"order-{run}-3", 5),
        (f"shipment-{run}", f"order-{run}-2", 8),
        (f"stock-{run}", f"order-{run}-1", 10),
    ] == rows(
        reader,
        "SELECT b.reference, o.orderid, o.qty FROM allocations a "
        "JOIN batches b ON b.id = a.batch_id JOIN order_lines o ON o.id = a.orderline_id "
        "ORDER BY b.reference",
    )
    assert [(f"stock-{run}", 10)] == rows(
        reader, f"SELECT reference, purchased_quantity FROM batches WHERE reference = 'stock-{run}'"
    )


def test_main_can_run_again_on_the_same_database(
    sqlite_file: Path, reader: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run keeps the first run's rows and adds its own."""
    url = f"sqlite:///{sqlite_file}"
    assert 0 == cli.main(["--database", url])
    first = run_id(capsys.readouterr().out)
    assert 0 == cli.main(["--database", url])
    second = run_id(capsys.readouterr().out)

    assert first != second
    assert [(4,)] == rows(reader, "SELECT COUNT(*) FROM products")
    assert [(6,)] == rows(reader, "SELECT COUNT(*) FROM allocations")


def test_main_reads_database_url_from_the_environment(
    sqlite_file: Path, reader: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --database, main() uses $DATABASE_URL."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{sqlite_file}")

    assert 0 == cli.main([])

    assert f"database: sqlite:///{sqlite_file}" == capsys.readouterr().out.splitlines()[0]
    assert [(2,)] == rows(reader, "SELECT COUNT(*) FROM products")


def test_main_defaults_to_a_file_in_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With neither --database nor $DATABASE_URL, main() uses allocation.sqlite3 in the temporary directory."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert 0 == cli.main([])

    assert f"database: sqlite:///{tmp_path / 'allocation.sqlite3'}" == capsys.readouterr().out.splitlines()[0]
    assert (tmp_path / "allocation.sqlite3").is_file()


def test_main_never_prints_the_password(
    sqlite_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database line of the output masks the password of the URL."""
    engines: list[Engine] = []

    def sqlite_engine(url: str | URL) -> Engine:
        engines.append(create_engine(f"sqlite:///{sqlite_file}"))
        return engines[-1]

    monkeypatch.setattr(config, "make_engine", sqlite_engine)

    assert 0 == cli.main(["--database", "postgresql+psycopg://scott:tiger-secret@db.example/allocation"])

    output = capsys.readouterr().out
    assert "tiger-secret" not in output
    assert "database: postgresql+psycopg://scott:***@db.example/allocation" == output.splitlines()[0]
    assert [0] == [checked_out(engine) for engine in engines]
