"""Unit tests never open a database connection; this guard proves it."""

from __future__ import annotations

import pytest
from sqlalchemy.pool import Pool

from tests.support.otel import otel  # noqa: F401  # the fixture, for the tests of this directory


@pytest.fixture(autouse=True)
def _no_database_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to check a connection out of a pool fails the unit test."""

    def refuse(self: Pool) -> None:
        raise AssertionError("a unit test tried to open a database connection; move it to tests/integration")

    monkeypatch.setattr(Pool, "connect", refuse)
    return
