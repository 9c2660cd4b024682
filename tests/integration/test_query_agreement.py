"""Hypothesis generates rows and queries; the fake and each database must answer them alike.

Rows of ``Note`` get random ranks (with NULLs and ties) and tags (mixed case,
accents, and LIKE's own ``%`` and ``_``). Queries combine comparisons,
``in_``/``not_in`` (with NULL among the values), ``between``, ``is_(None)``,
the LIKE family and ``ilike``, under ``and_``, ``or_`` and ``not_``, with an
ordering, a page, ``count()``, ``exists()`` and ``page()``.

The fake answers as PostgreSQL does, so against PostgreSQL every query is
compared. Against SQLite and MariaDB, the queries leave out what
docs/repositories.md lists as the databases' own differences:

* SQLite: the case-sensitive LIKE family (SQLite's LIKE ignores ASCII case),
  ``ilike`` (its ``lower()`` folds ASCII only), and NULL placement left to the
  database;
* MariaDB: every comparison, match and ordering of text (its default
  collation ignores case and accents), and NULL placement left to the
  database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, and_, not_, or_, text

from tests.support.models import Note
from tests.support.uows import FakeShopUnitOfWork, SqlAlchemyShopUnitOfWork

RANKS = st.one_of(st.none(), st.integers(-2, 2))
TAGS = st.one_of(st.none(), st.text(alphabet="aAbé_%É", max_size=3))
PATTERNS = st.text(alphabet="aAbé_%", max_size=3)

Rows = list[tuple[int | None, str | None]]


def atoms(backend: str) -> st.SearchStrategy[Any]:
    """The single clauses a query may use on *backend*."""
    numeric = [
        st.builds(lambda n: Note.rank == n, st.integers(-2, 2)),
        st.builds(lambda n: Note.rank != n, st.integers(-2, 2)),
        st.builds(lambda n: Note.rank < n, st.integers(-2, 2)),
        st.builds(lambda n: Note.rank >= n, st.integers(-2, 2)),
        st.builds(lambda ns: Note.rank.in_(ns), st.lists(RANKS, max_size=3)),
        st.builds(lambda ns: Note.rank.not_in(ns), st.lists(RANKS, max_size=3)),
        st.builds(lambda a, b: Note.rank.between(a, b), st.integers(-2, 2), st.integers(-2, 2)),
        st.just(Note.rank.is_(None)),
        st.just(Note.tag.is_not(None)),
    ]
    text_clauses = [
        st.builds(lambda s: Note.tag == s, TAGS.filter(lambda s: s is not None)),
        st.builds(lambda s: Note.tag > s, TAGS.filter(lambda s: s is not None)),
        st.builds(lambda s: Note.tag.in_(s), st.lists(TAGS, max_size=3)),
    ]
    matching = [
        st.builds(lambda p: Note.tag.like(p), PATTERNS),
        st.builds(lambda p: Note.tag.not_like(p), PATTERNS),
        st.builds(lambda p: Note.tag.startswith(p), PATTERNS),
        st.builds(lambda p: Note.tag.endswith(p), PATTERNS),
        st.builds(lambda p: Note.tag.contains(p), PATTERNS),
    ]
    folded = [st.builds(lambda p: Note.tag.ilike(p), PATTERNS)]
    chosen = {
        "postgresql": numeric + text_clauses + matching + folded,
        "sqlite": numeric + text_clauses,
        "mariadb": numeric,
    }[backend]
    return st.one_of(chosen)


def clauses(backend: str) -> st.SearchStrategy[Any]:
    """Clauses composed of atoms with and_, or_ and not_, two levels deep."""
    return st.recursive(
        atoms(backend),
        lambda inner: st.one_of(
            st.builds(lambda a, b: and_(a, b), inner, inner),
            st.builds(lambda a, b: or_(a, b), inner, inner),
            st.builds(not_, inner),
        ),
        max_leaves=4,
    )


def orderings(backend: str) -> st.SearchStrategy[list[Any]]:
    """Ordering terms: explicit NULL placement where the database's own differs from the fake's."""
    columns = [Note.rank, Note.text] if backend == "mariadb" else [Note.rank, Note.tag, Note.text]
    placements = ["first", "last"] if backend != "postgresql" else ["first", "last", None]

    def term(column: Any, descending: bool, nulls: str | None) -> Any:
        ordered = column.desc() if descending else column.asc()
        if nulls == "first":
            return ordered.nulls_first()
        return ordered.nulls_last() if nulls == "last" else ordered

    return st.lists(st.builds(term, st.sampled_from(columns), st.booleans(), st.sampled_from(placements)), max_size=2)


def store(rows: Rows, engine: Engine) -> FakeShopUnitOfWork:
    """Write *rows* to the database, and to a new fake, with the same keys."""
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM uow_notes"))
    fake = FakeShopUnitOfWork()
    for unit in (fake, SqlAlchemyShopUnitOfWork(engine)):
        with unit:
            unit.notes.add_all(
                [Note(id=n + 1, text=f"n{n:02}", rank=rank, tag=tag) for n, (rank, tag) in enumerate(rows)]
            )
            unit.commit()
    return fake


def answers(unit: Any, where: list[Any], order: list[Any], limit: int | None, offset: int) -> tuple[Any, ...]:
    """What a unit of work answers to the query: listing, page, count, exists."""
    with unit:
        notes = unit.notes
        listed = [note.text for note in notes.list(*where, order_by=order, limit=limit, offset=offset)]
        page = notes.page(*where, order_by=order, limit=limit or 3, offset=offset)
        after = notes.page(*where, order_by=order, limit=2, after=page.next) if page.next else None
        return (
            listed,
            [note.text for note in page.items],
            page.total,
            None if after is None else [note.text for note in after.items],
            notes.count(*where),
            notes.exists(*where),
        )


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_the_fake_answers_queries_as_each_database(engine: Engine, database: Any) -> None:
    """Random rows and queries get the same answer from the fake as from the database, but for documented cases."""
    backend = database.backend
    check = _checker(engine, backend)
    check()


def _checker(engine: Engine, backend: str) -> Callable[[], None]:
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        rows=st.lists(st.tuples(RANKS, TAGS), max_size=8),
        where=st.lists(clauses(backend), max_size=2),
        order=orderings(backend),
        limit=st.one_of(st.none(), st.integers(1, 4)),
        offset=st.integers(0, 3),
    )
    def check(rows: Rows, where: list[Any], order: list[Any], limit: int | None, offset: int) -> None:
        fake = store(rows, engine)
        expected = answers(SqlAlchemyShopUnitOfWork(engine), where, order, limit, offset)
        assert expected == answers(fake, where, order, limit, offset)

    return check
