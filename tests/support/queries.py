"""The query contract: where clauses, ordering, pages, ``count`` and ``exists``, the same on every implementation.

Run by the fakes' and the databases' contract modules, like :mod:`tests.support.contract`.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import and_, func, not_, or_, true
from sqlalchemy.exc import DBAPIError

from uow import errors

from .contract import seed
from .harness import Shop
from .models import Item, Note, Sku, items, skus


async def notes(shop: Shop, *rows: tuple[str, int | None, str | None]) -> None:
    """Commit a note per (text, rank, tag)."""
    uow = shop.uow()
    async with uow:
        await uow.notes.add_all([Note(text=text, rank=rank, tag=tag) for text, rank, tag in rows])
        await uow.commit()


ROWS = (
    ("a", 3, "red"),
    ("b", None, "Blue"),
    ("c", 1, None),
    ("d", 3, "blue"),
    ("e", 2, "red_x"),
)


async def texts(shop: Shop, *where: Any, **options: Any) -> list[str]:
    """The texts of the notes a query lists."""
    uow = shop.uow()
    async with uow:
        return [note.text for note in await uow.notes.list(*where, **options)]


class QueryContract:
    """Queries every repository answers alike."""

    async def test_where_clauses_combine_with_keyword_filters(self, shop: Shop) -> None:
        """Comparisons on mapped attributes combine with equality filters, in primary-key order by default."""
        await notes(shop, *ROWS)
        assert ["a", "d"] == await texts(shop, Note.rank >= 3)
        assert ["c", "e"] == await texts(shop, Note.rank < 3)
        assert ["a"] == await texts(shop, Note.rank != 2, tag="red")
        assert ["e"] == await texts(shop, Note.rank > 1, Note.rank <= 2)

    async def test_null_follows_three_valued_logic(self, shop: Shop) -> None:
        """A comparison with NULL is unknown: neither it nor its negation lists the row; is_(None) does."""
        await notes(shop, *ROWS)
        assert ["a", "c", "d", "e"] == await texts(shop, or_(Note.rank == 3, Note.rank != 3))
        assert ["c", "e"] == await texts(shop, not_(Note.rank >= 3))
        assert ["b"] == await texts(shop, Note.rank.is_(None))
        assert ["b"] == await texts(shop, Note.rank == None)  # noqa: E711 - SQLAlchemy makes this IS NULL
        assert ["a", "c", "d", "e"] == await texts(shop, Note.rank.is_not(None))
        # NULL AND FALSE is FALSE, so its negation holds: row c, whose tag is NULL, is listed.
        assert ["a", "b", "c", "d", "e"] == await texts(shop, not_(and_(Note.tag == "zz", Note.rank == 9)))
        assert ["c"] == await texts(shop, not_(or_(Note.tag.is_not(None), Note.rank == 9)))

    async def test_in_and_not_in_as_sql_evaluates_them(self, shop: Shop) -> None:
        """in_ and not_in list what SQL does, including an empty list and a NULL among the values."""
        await notes(shop, *ROWS)
        assert ["a", "c", "d"] == await texts(shop, Note.rank.in_([1, 3]))
        assert ["e"] == await texts(shop, Note.rank.not_in([1, 3]))
        assert [] == await texts(shop, Note.rank.in_([]))
        assert ["a", "b", "c", "d", "e"] == await texts(shop, Note.rank.not_in([]))
        assert [] == await texts(shop, Note.rank.not_in([1, None]))
        assert ["c"] == await texts(shop, Note.rank.in_([1, None]))

    async def test_ranges_with_between_and_composition(self, shop: Shop) -> None:
        """between is inclusive; and_, or_ and not_ compose clauses."""
        await notes(shop, *ROWS)
        assert ["c", "e"] == await texts(shop, Note.rank.between(1, 2))
        assert ["a", "b", "d"] == await texts(shop, or_(Note.rank.is_(None), not_(Note.rank.between(1, 2))))
        assert ["a", "c"] == await texts(shop, or_(and_(Note.rank == 3, Note.tag == "red"), Note.tag.is_(None)))

    async def test_string_matching_with_lowercase_patterns(self, shop: Shop) -> None:
        """like, startswith, endswith and contains match alike where case does not differ."""
        await notes(shop, *ROWS)
        assert ["a", "e"] == await texts(shop, Note.tag.like("red%"))
        assert ["e"] == await texts(shop, Note.tag.like("red_%"))
        assert ["a", "e"] == await texts(shop, Note.tag.startswith("re"))
        assert ["b", "d"] == await texts(shop, Note.tag.endswith("lue"))
        assert ["e"] == await texts(shop, Note.tag.contains("d_"))
        assert ["e"] == await texts(shop, Note.tag.like("red\\_%", escape="\\"))
        assert ["b", "c", "d"] == await texts(shop, or_(Note.tag.not_like("red%"), Note.tag.is_(None)))

    async def test_ilike_ignores_case(self, shop: Shop) -> None:
        """ilike matches regardless of case on every implementation."""
        await notes(shop, *ROWS)
        assert ["b", "d"] == await texts(shop, Note.tag.ilike("BLUE"))
        assert ["b", "d"] == await texts(shop, Note.tag.ilike("%lu%"))

    async def test_order_by_several_terms_then_the_primary_key(self, shop: Shop) -> None:
        """order_by sorts by each term in turn, descending where asked; the primary key breaks ties."""
        await notes(shop, ("x", 2, "p"), ("y", 1, "q"), ("z", 2, "p"), ("w", 1, "p"))
        assert ["y", "w", "x", "z"] == await texts(shop, order_by=Note.rank)
        assert ["x", "z", "w", "y"] == await texts(shop, order_by=[Note.rank.desc(), Note.tag])
        assert ["y", "w", "z", "x"] == await texts(shop, order_by=[Note.tag.desc(), Note.id.desc()])

    async def test_explicit_null_placement_is_honoured(self, shop: Shop) -> None:
        """nulls_first() and nulls_last() place NULLs as asked on every implementation."""
        await notes(shop, *ROWS)
        assert ["b", "c", "e", "a", "d"] == await texts(shop, order_by=Note.rank.asc().nulls_first())
        assert ["c", "e", "a", "d", "b"] == await texts(shop, order_by=Note.rank.nulls_last())
        assert ["a", "d", "e", "c", "b"] == await texts(shop, order_by=Note.rank.desc().nulls_last())
        assert ["b", "a", "d", "e", "c"] == await texts(shop, order_by=Note.rank.desc().nulls_first())

    async def test_limit_and_offset_take_a_page(self, shop: Shop) -> None:
        """limit and offset take a page of the ordered objects, and count ignores them."""
        await notes(shop, *ROWS)
        assert ["c", "d"] == await texts(shop, order_by=Note.text, limit=2, offset=2)
        assert ["e"] == await texts(shop, order_by=Note.text, limit=2, offset=4)
        assert [] == await texts(shop, order_by=Note.text, offset=9)
        assert ["d", "e"] == await texts(shop, order_by=Note.text, offset=3)
        assert [] == await texts(shop, limit=0)
        uow = shop.uow()
        async with uow:
            assert 2 == await uow.notes.count(Note.rank >= 3)
            assert 5 == await uow.notes.count()

    async def test_exists_answers_whether_any_object_matches(self, shop: Shop) -> None:
        """exists() is true when list() would return something for the same clauses."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            assert await uow.notes.exists(Note.rank == 2)
            assert not await uow.notes.exists(Note.rank > 3)
            assert await uow.notes.exists(tag="red")
            assert not await uow.notes.exists(Note.rank == 2, tag="red")

    async def test_table_columns_query_imperatively_mapped_classes(self, shop: Shop) -> None:
        """Columns of the mapped table work where type checkers see an imperative attribute as a plain value."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add_all([Sku("a", stock=5), Sku("b", stock=1), Sku("c", stock=9)])
            await uow.commit()
        async with uow:
            found = await uow.skus.list(skus.c.stock > 2, order_by=skus.c.stock.desc())
            assert ["c", "a"] == [sku.code for sku in found]
            assert ["b"] == [sku.code for sku in await uow.skus.list(Sku.stock < 2)]  # type: ignore[arg-type]

    async def test_values_are_converted_by_column_type(self, shop: Shop) -> None:
        """A value given as text compares as the integer column holds it, as SQLite does."""
        uow = shop.uow()
        async with uow:
            await uow.items.add_all([Item("a", qty=3), Item("b", qty=12)])
            await uow.commit()
        async with uow:
            assert ["b"] == [item.name for item in await uow.items.list(items.c.qty > 5)]
            assert 1 == await uow.items.count(items.c.qty.in_([3, 4]))

    async def test_queries_see_unflushed_changes(self, shop: Shop) -> None:
        """A query autoflushes first, so it answers from what the block changed."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            first = await uow.notes.get_by(text="a")
            first.rank = 0
            await uow.notes.add(Note(text="f", rank=0))
            assert ["a", "f"] == [note.text for note in await uow.notes.list(Note.rank == 0)]

    async def test_unsupported_queries_are_refused_alike(self, shop: Shop) -> None:
        """A plain bool, another model's column, a function, or a bad page raise QueryError everywhere."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.QueryError, match="SQLAlchemy expression"):
                await uow.notes.list(True)
            with pytest.raises(errors.QueryError, match="cannot answer the same way"):
                await uow.notes.list(Sku.stock > 3)  # type: ignore[arg-type]
            with pytest.raises(errors.QueryError, match="cannot answer the same way"):
                await uow.notes.list(func.lower(Note.text) == "a")
            with pytest.raises(errors.QueryError, match="order_by"):
                await uow.notes.list(order_by=skus.c.code)
            with pytest.raises(errors.QueryError, match="limit"):
                await uow.notes.list(limit=-1)
            with pytest.raises(errors.QueryError, match="offset"):
                await uow.notes.list(offset=-2)
            with pytest.raises(errors.UnknownFieldError):
                await uow.notes.list(Note.rank > 1, colour="red")

    async def test_case_and_default_null_order_follow_each_database(self, shop: Shop) -> None:
        """The fake compares and orders as PostgreSQL does; SQLite's LIKE and MariaDB's collation ignore case."""
        await notes(shop, *ROWS)
        backend = shop.name.split("-")[0]
        like_ignores_case = backend in ("sqlite", "mariadb")
        equality_ignores_case = backend == "mariadb"
        assert (["b", "d"] if like_ignores_case else ["d"]) == await texts(shop, Note.tag.like("blue"))
        assert (["b", "d"] if equality_ignores_case else ["d"]) == await texts(shop, Note.tag == "blue")
        nulls_first = backend in ("sqlite", "mariadb")  # NULL is the smallest value there, the largest elsewhere
        ascending = await texts(shop, order_by=Note.rank)
        assert (["b", "c", "e", "a", "d"] if nulls_first else ["c", "e", "a", "d", "b"]) == ascending

    async def test_a_page_holds_its_objects_the_total_and_the_next_cursor(self, shop: Shop) -> None:
        """page() returns a slice of the ordered listing, how many match in all, and a cursor while more follow."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            first = await uow.notes.page(Note.text != "c", order_by=Note.text.desc(), limit=2)
            assert (["e", "d"], 4) == ([note.text for note in first.items], first.total)
            assert first.next is not None
            second = await uow.notes.page(Note.text != "c", order_by=Note.text.desc(), limit=2, after=first.next)
            assert (["b", "a"], 4, None) == ([note.text for note in second.items], second.total, second.next)
            by_offset = await uow.notes.page(order_by=Note.text, limit=2, offset=4)
            assert (["e"], 5, None) == ([note.text for note in by_offset.items], by_offset.total, by_offset.next)
            past = await uow.notes.page(order_by=Note.text, limit=2, offset=7)
            assert ([], 5, None) == (past.items, past.total, past.next)

    async def test_offset_pages_end_where_the_total_does(self, shop: Shop) -> None:
        """An offset page has a next cursor exactly while objects follow it; keyword filters narrow the total too."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            middle = await uow.notes.page(order_by=Note.text, limit=2, offset=2)
            assert (["c", "d"], 5) == ([note.text for note in middle.items], middle.total)
            assert middle.next is not None
            last = await uow.notes.page(order_by=Note.text, limit=2, offset=3)
            assert (["d", "e"], 5, None) == ([note.text for note in last.items], last.total, last.next)
            none = await uow.notes.page(Note.rank > 100, limit=2)
            assert ([], 0, None) == (none.items, none.total, none.next)
            red = await uow.notes.page(Note.rank > 0, order_by=Note.text, limit=1, tag="red")
            assert (["a"], 1, None) == ([note.text for note in red.items], red.total, red.next)
            following = await uow.notes.page(order_by=Note.text, limit=3, after=middle.next)
            assert (["e"], 5, None) == ([note.text for note in following.items], following.total, following.next)

    async def test_a_clause_or_ordering_checked_for_one_model_is_still_refused_for_another(self, shop: Shop) -> None:
        """The same where clause or order_by object, accepted for notes, raises QueryError on another model."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        ranked, by_text = Note.rank > 1, Note.text.desc()
        async with uow:
            assert ["e", "d", "a"] == [note.text for note in await uow.notes.list(ranked, order_by=by_text)]
            with pytest.raises(errors.QueryError, match="cannot answer the same way"):
                await uow.skus.list(ranked)  # type: ignore[arg-type]
            with pytest.raises(errors.QueryError, match="order_by"):
                await uow.skus.list(order_by=by_text)

    async def test_keyset_cursor_survives_rows_added_before_it(self, shop: Shop) -> None:
        """A cursor on NOT NULL columns starts after its object, even when rows are inserted before it."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            first = await uow.notes.page(order_by=Note.text, limit=2)
            assert ["a", "b"] == [note.text for note in first.items]
        await notes(shop, ("aa", 9, None), ("ab", 9, None))
        async with uow:
            second = await uow.notes.page(order_by=Note.text, limit=2, after=first.next)
            assert (["c", "d"], 7) == ([note.text for note in second.items], second.total)

    async def test_a_nullable_ordering_pages_by_position(self, shop: Shop) -> None:
        """On a column that takes NULL the cursor holds a position, and the pages still cover every object once."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        seen: list[str] = []
        async with uow:
            page = await uow.notes.page(order_by=Note.rank.nulls_last(), limit=2)
            seen += [note.text for note in page.items]
            while page.next is not None:
                page = await uow.notes.page(order_by=Note.rank.nulls_last(), limit=2, after=page.next)
                seen += [note.text for note in page.items]
        assert ["c", "e", "a", "d", "b"] == seen

    async def test_cursors_belong_to_their_query(self, shop: Shop) -> None:
        """A cursor of another ordering, a forged one, a cursor with an offset, or no limit raise QueryError."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            cursor = (await uow.notes.page(order_by=Note.text, limit=1)).next
            with pytest.raises(errors.QueryError, match="same query"):
                await uow.notes.page(order_by=Note.id, limit=1, after=cursor)
            with pytest.raises(errors.QueryError, match="same query"):
                await uow.notes.page(order_by=Note.text, limit=1, after="not-a-cursor")
            with pytest.raises(errors.QueryError, match="not both"):
                await uow.notes.page(order_by=Note.text, limit=1, offset=1, after=cursor)
            with pytest.raises(errors.QueryError, match="limit"):
                await uow.notes.page(order_by=Note.text, limit=0)

    async def test_row_locks_hold_off_other_transactions(self, shop: Shop) -> None:
        """A row read with for_update=True is skipped by skip_locked and fails nowait elsewhere; not on SQLite."""
        await notes(shop, *ROWS)
        backend = shop.name.split("-")[0]
        holder, other = shop.uow(), shop.uow()
        async with holder:
            locked = await holder.notes.get_by(text="a")
            assert locked is await holder.notes.get(locked.id, for_update=True)
            async with other:
                free = await other.notes.list(Note.rank == 3, for_update=True, skip_locked=True)
                assert (["a", "d"] if backend == "sqlite" else ["d"]) == [note.text for note in free]
            if backend == "sqlite":
                async with other:
                    assert "a" == (await other.notes.get(locked.id, for_update=True, nowait=True)).text
            else:
                with pytest.raises(DBAPIError):
                    async with other:
                        await other.notes.get(locked.id, for_update=True, nowait=True)
                async with other:
                    assert None is await other.notes.get(locked.id, for_update=True, skip_locked=True)
        async with other:  # the holder's block ended: its locks went with it
            assert "a" == (await other.notes.get(locked.id, for_update=True, nowait=True)).text

    async def test_a_locked_page_and_listing_return_what_they_would_unlocked(self, shop: Shop) -> None:
        """for_update=True changes no result: a page still counts its total, a listing still orders."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            page = await uow.notes.page(order_by=Note.text.desc(), limit=2, for_update=True)
            assert (["e", "d"], 5) == ([note.text for note in page.items], page.total)
            locked = await uow.notes.list(Note.rank >= 2, order_by=Note.rank, for_update=True, nowait=True)
            assert ["e", "a", "d"] == [note.text for note in locked]

    async def test_lock_options_are_checked_and_refused_when_read_only(self, shop: Shop) -> None:
        """skip_locked or nowait without for_update, both at once, or any lock in a read-only unit raise."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.QueryError, match="for_update=True"):
                await uow.notes.get(1, skip_locked=True)
            with pytest.raises(errors.QueryError, match="at once"):
                await uow.notes.list(for_update=True, skip_locked=True, nowait=True)
            with pytest.raises(errors.QueryError, match="True or False"):
                await uow.notes.list(for_update="yes")
        reader = shop.uow(read_only=True)
        async with reader:
            first = await reader.notes.get_by(text="a")
            with pytest.raises(errors.ReadOnlyError, match="row lock"):
                await reader.notes.get(first.id, for_update=True)
            assert first is await reader.notes.get(first.id)

    # -- upserts ----------------------------------------------------------------

    async def test_upsert_inserts_a_missing_row_and_updates_an_existing_one(self, shop: Shop) -> None:
        """upsert() on the primary key inserts the first time and sets the given values the second."""
        uow = shop.uow()
        async with uow:
            created = await uow.skus.upsert(Sku("a", "first", 3))
            assert ("a", "first", 3) == (created.code, created.description, created.stock)
            await uow.commit()
        async with uow:
            loaded = await uow.skus.get("a")
            changed = await uow.skus.upsert({"code": "a", "description": "second", "stock": 7})
            assert loaded is changed
            assert ("second", 7) == (changed.description, changed.stock)
            await uow.commit()
        assert [("a", "second", 7)] == shop.committed(Sku, "code", "description", "stock")

    async def test_upsert_checks_the_row_it_would_insert_even_on_a_conflict(self, shop: Shop) -> None:
        """Values that could not be inserted (a NOT NULL column left out) fail even when the row exists."""
        await seed(shop, Sku("a", "first", 3))
        uow = shop.uow()
        with pytest.raises(DBAPIError, match="description"):
            async with uow:
                await uow.skus.upsert({"code": "a", "stock": 7})
        assert [("a", "first", 3)] == shop.committed(Sku, "code", "description", "stock")

    async def test_upsert_on_a_unique_column_keeps_the_generated_key(self, shop: Shop) -> None:
        """upsert(on=...) of a UNIQUE column finds the row by it and leaves its generated key alone."""
        uow = shop.uow()
        async with uow:
            first = await uow.notes.upsert(Note(text="one", slug="s1"), on=("slug",))
            await uow.commit()
            first_id = first.id
        async with uow:
            again = await uow.notes.upsert({"text": "two", "slug": "s1"}, on=("slug",))
            assert (first_id, "two") == (again.id, again.text)
            await uow.commit()
        assert [("two", "s1")] == shop.committed(Note, "text", "slug")

    async def test_get_or_create_inserts_once_and_never_changes_a_row(self, shop: Shop) -> None:
        """get_or_create() inserts a missing row and returns an existing one as it is."""
        uow = shop.uow()
        async with uow:
            made, created = await uow.skus.get_or_create(Sku("a", "first", 3))
            assert (True, "first") == (created, made.description)
            again, created_again = await uow.skus.get_or_create(Sku("a", "second", 9))
            assert (False, "first", 3) == (created_again, again.description, again.stock)
            assert made is again
            await uow.commit()
        async with uow:
            found, created = await uow.notes.get_or_create({"text": "x", "slug": "k"}, on=("slug",))
            same, created_again = await uow.notes.get_or_create({"text": "y", "slug": "k"}, on=("slug",))
            assert (True, False, "x") == (created, created_again, same.text)
            assert found is same
            await uow.commit()
        assert [("a", "first", 3)] == shop.committed(Sku, "code", "description", "stock")
        assert [("x", "k")] == shop.committed(Note, "text", "slug")

    async def test_an_upsert_in_a_rolled_back_block_leaves_nothing(self, shop: Shop) -> None:
        """An upsert is part of the transaction: without a commit, neither its insert nor its update stays."""
        uow = shop.uow()
        async with uow:
            await uow.skus.upsert(Sku("a", "first", 3))
            await uow.commit()
        async with uow:
            await uow.skus.upsert(Sku("a", "changed", 0))
            await uow.skus.upsert(Sku("b", "new", 1))
        assert [("a", "first", 3)] == shop.committed(Sku, "code", "description", "stock")

    async def test_wrong_upserts_are_refused_alike(self, shop: Shop) -> None:
        """A key that is not unique, a missing key value, another type, or a read-only unit raise everywhere."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.QueryError, match="not a unique key"):
                await uow.notes.upsert({"text": "a"}, on=("text",))
            with pytest.raises(errors.QueryError, match="needs a value"):
                await uow.notes.upsert({"text": "a"}, on=("slug",))
            with pytest.raises(errors.QueryError, match="column attributes"):
                await uow.notes.upsert({"colour": "red", "slug": "s"}, on=("slug",))
            with pytest.raises(errors.QueryError, match="takes a Note"):
                await uow.notes.upsert(Sku("a"))
            with pytest.raises(errors.QueryError, match="as a tuple"):
                await uow.notes.upsert({"slug": "s"}, on="slug")  # type: ignore[arg-type]
        reader = shop.uow(read_only=True)
        async with reader:
            with pytest.raises(errors.ReadOnlyError):
                await reader.skus.upsert(Sku("a"))
        assert [] == shop.committed(Sku, "code")

    # -- bulk updates and deletes -------------------------------------------------

    async def test_bulk_update_sets_values_on_the_selected_rows(self, shop: Shop) -> None:
        """update() sets values and expressions on the rows its clauses select, and the held objects follow."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            held = await uow.notes.get_by(text="a")
            assert 2 == await uow.notes.update(Note.rank == 3, values={"tag": "top"})
            assert "top" == held.tag
            assert 4 == await uow.notes.update(Note.rank.is_not(None), values={"rank": Note.rank + 10})
            assert 13 == held.rank
            await uow.commit()
        assert [("a", 13, "top"), ("b", None, "Blue"), ("c", 11, None), ("d", 13, "top"), ("e", 12, "red_x")] == (
            shop.committed(Note, "text", "rank", "tag")
        )

    async def test_bulk_delete_removes_the_selected_rows_and_their_objects(self, shop: Shop) -> None:
        """delete() removes the rows its clauses select; their held objects are gone, and a rollback keeps them."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            held = await uow.notes.get_by(text="c")
            assert 3 == await uow.notes.delete(or_(Note.rank < 3, Note.rank.is_(None)))
            assert None is await uow.notes.get(held.id)
            assert ["a", "d"] == [note.text for note in await uow.notes.list()]
        assert 5 == len(shop.committed(Note, "text"))
        async with uow:
            assert 2 == await uow.notes.delete(tag="red", rank=3) + await uow.notes.delete(Note.text == "b")
            await uow.commit()
        assert [("c",), ("d",), ("e",)] == shop.committed(Note, "text")

    async def test_bulk_writes_see_unflushed_changes_and_count_matches(self, shop: Shop) -> None:
        """A bulk update autoflushes first, and counts the rows it matched even where nothing changes."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            (await uow.notes.get_by(text="b")).rank = 3
            assert 3 == await uow.notes.update(Note.rank == 3, values={"rank": 3})
            await uow.commit()
        assert [("a", 3), ("b", 3), ("d", 3)] == [row for row in shop.committed(Note, "text", "rank") if row[1] == 3]

    async def test_wrong_bulk_writes_are_refused_alike(self, shop: Shop) -> None:
        """No clause, a key change, an unknown attribute, a function, or a read-only unit raise everywhere."""
        await notes(shop, *ROWS)
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.QueryError, match="true()"):
                await uow.notes.delete()
            with pytest.raises(errors.QueryError, match="primary key"):
                await uow.notes.update(Note.rank == 3, values={"id": 99})
            with pytest.raises(errors.QueryError, match="column attributes"):
                await uow.notes.update(Note.rank == 3, values={"colour": "red"})
            with pytest.raises(errors.QueryError, match="compute alike"):
                await uow.notes.update(Note.rank == 3, values={"text": func.upper(Note.text)})
            assert 5 == await uow.notes.update(true(), values={"pinned": True})
        reader = shop.uow(read_only=True)
        async with reader:
            with pytest.raises(errors.ReadOnlyError):
                await reader.notes.delete(Note.rank == 3)
        assert 5 == len(shop.committed(Note, "text"))
        assert [] == [row for row in shop.committed(Note, "pinned") if row[0]]
