"""The repository and unit-of-work contract, run unchanged against every implementation.

A test module subclasses :class:`Contract` and provides a ``shop`` fixture
(see :mod:`tests.support.harness`). The same tests then run against the fake,
sync and async, and against SQLite, PostgreSQL and MariaDB, sync and async.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError, PendingRollbackError, SAWarning

from uow import errors

from .harness import Shop
from .models import Item, Line, Note, Order, Pair, Sku


class Boom(Exception):
    """Raised by service code in the tests."""


async def seed(shop: Shop, *objs: object) -> None:
    """Commit *objs* through a unit of work of the shop."""
    uow = shop.uow()
    async with uow:
        for obj in objs:
            repo = {Item: uow.items, Sku: uow.skus, Pair: uow.pairs, Order: uow.orders}[type(obj)]
            await repo.add(obj)
        await uow.commit()


class Contract:
    """Behaviour every unit of work and repository implementation shares."""

    # -- lifecycle -----------------------------------------------------------

    async def test_commit_persists_added_objects(self, shop: Shop) -> None:
        """Objects added and committed are in the database afterwards."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a", "first", 3))
            await uow.commit()
        assert [("a", "first", 3)] == shop.committed(Sku, "code", "description", "stock")

    async def test_rolls_back_uncommitted_work_by_default(self, shop: Shop) -> None:
        """Leaving the block without commit() discards the work."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
        assert [] == shop.committed(Sku, "code")
        assert (False, True) == (uow.committed, uow.rolled_back)

    async def test_rolls_back_on_error_and_reraises_it(self, shop: Shop) -> None:
        """An exception in the block rolls back and propagates unchanged."""
        uow = shop.uow()
        error = Boom("service failed")
        with pytest.raises(Boom) as raised:
            async with uow:
                await uow.skus.add(Sku("a"))
                raise error
        assert error is raised.value
        assert [] == shop.committed(Sku, "code")
        assert uow.rolled_back

    async def test_rolls_back_on_error_after_commit(self, shop: Shop) -> None:
        """Work after a commit is discarded when the block then fails; committed work stays."""
        uow = shop.uow()
        with pytest.raises(Boom):
            async with uow:
                await uow.skus.add(Sku("kept"))
                await uow.commit()
                await uow.skus.add(Sku("lost"))
                raise Boom
        assert [("kept",)] == shop.committed(Sku, "code")

    async def test_autocommit_commits_on_clean_exit(self, shop: Shop) -> None:
        """With autocommit=True a clean exit commits."""
        uow = shop.uow(autocommit=True)
        async with uow:
            await uow.skus.add(Sku("a"))
        assert [("a",)] == shop.committed(Sku, "code")
        assert (True, 1) == (uow.committed, uow.commits)

    async def test_autocommit_still_rolls_back_on_error(self, shop: Shop) -> None:
        """With autocommit=True an exception still rolls back."""
        uow = shop.uow(autocommit=True)
        with pytest.raises(Boom):
            async with uow:
                await uow.skus.add(Sku("a"))
                raise Boom
        assert [] == shop.committed(Sku, "code")
        assert (False, 0) == (uow.committed, uow.commits)

    async def test_explicit_rollback_discards_work_and_block_goes_on(self, shop: Shop) -> None:
        """rollback() inside the block discards work so far; later work can still commit."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("dropped"))
            await uow.rollback()
            await uow.skus.add(Sku("kept"))
            await uow.commit()
        assert [("kept",)] == shop.committed(Sku, "code")
        assert (1, 1) == (uow.commits, uow.rollbacks)

    async def test_same_uow_runs_blocks_in_a_row_with_fresh_sessions(self, shop: Shop) -> None:
        """A unit of work is reusable, and each block loads its own objects."""
        await seed(shop, Sku("a", stock=1))
        uow = shop.uow()
        async with uow:
            first = await uow.skus.get("a")
            first.stock = 50
        async with uow:
            second = await uow.skus.get("a")
            assert 1 == second.stock
        assert first is not second
        assert [("a", 1)] == shop.committed(Sku, "code", "stock")

    async def test_changes_to_loaded_objects_commit(self, shop: Shop) -> None:
        """Attribute changes on a loaded object are written by commit()."""
        await seed(shop, Sku("a", stock=1))
        uow = shop.uow()
        async with uow:
            sku = await uow.skus.get("a")
            sku.stock = 7
            await uow.commit()
        assert [("a", 7)] == shop.committed(Sku, "code", "stock")

    async def test_objects_stay_readable_after_the_block(self, shop: Shop) -> None:
        """Objects returned from a committed block keep their attribute values."""
        uow = shop.uow()
        async with uow:
            await uow.items.add(Item("a", 2))
            await uow.commit()
            item = (await uow.items.list())[0]
        assert ("a", 2) == (item.name, item.qty)
        assert isinstance(item.id, int)

    async def test_flags_count_commits_and_rollbacks(self, shop: Shop) -> None:
        """committed, commits, rolled_back and rollbacks describe what happened."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
            await uow.commit()
        assert (True, False, 1, 0) == (uow.committed, uow.rolled_back, uow.commits, uow.rollbacks)
        async with uow:
            await uow.skus.add(Sku("b"))
        assert (False, True, 1, 1) == (uow.committed, uow.rolled_back, uow.commits, uow.rollbacks)

    async def test_failed_commit_raises_and_keeps_nothing(self, shop: Shop) -> None:
        """A commit that fails raises IntegrityError, commits nothing, and the next block works."""
        await seed(shop, Sku("a"))
        uow = shop.uow()
        with pytest.raises(IntegrityError):
            async with uow:
                await uow.skus.add(Sku("b"))
                await uow.skus.add(Sku("a"))
                await uow.commit()
        assert (False, True) == (uow.committed, uow.rolled_back)
        async with uow:
            await uow.skus.add(Sku("c"))
            await uow.commit()
        assert [("a",), ("c",)] == shop.committed(Sku, "code")

    async def test_failed_flush_needs_a_rollback(self, shop: Shop) -> None:
        """After a flush fails inside a block, further work raises PendingRollbackError until rollback()."""
        await seed(shop, Sku("a"))
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
            with pytest.raises(IntegrityError):
                await uow.skus.count()
            with pytest.raises(PendingRollbackError):
                await uow.skus.count()
            await uow.rollback()
            assert 1 == await uow.skus.count()

    # -- misuse --------------------------------------------------------------

    async def test_repository_outside_the_block_raises(self, shop: Shop) -> None:
        """A repository used before or after the block raises InactiveUnitOfWorkError."""
        uow = shop.uow()
        with pytest.raises(errors.InactiveUnitOfWorkError, match="outside a block"):
            uow.skus
        async with uow:
            held = uow.skus
        with pytest.raises(errors.InactiveUnitOfWorkError, match="ended"):
            await held.count()
        with pytest.raises(errors.InactiveUnitOfWorkError):
            uow.skus

    async def test_commit_outside_the_block_raises(self, shop: Shop) -> None:
        """commit() and rollback() outside the block raise InactiveUnitOfWorkError."""
        uow = shop.uow()
        with pytest.raises(errors.InactiveUnitOfWorkError, match=r"commit\(\)"):
            await uow.commit()
        with pytest.raises(errors.InactiveUnitOfWorkError, match=r"rollback\(\)"):
            await uow.rollback()

    async def test_reentering_joins_and_the_owner_commits_once(self, shop: Shop) -> None:
        """Entering an active unit of work again joins it: the inner commit() waits for the owner's."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
            async with uow:
                await uow.skus.add(Sku("b"))
                await uow.commit()
            assert [] == shop.committed(Sku, "code")
            assert 0 == uow.commits
            await uow.commit()
        assert [("a",), ("b",)] == shop.committed(Sku, "code")
        assert 1 == uow.commits

    async def test_unknown_filter_raises(self, shop: Shop) -> None:
        """Filtering on something that is not a column attribute raises UnknownFieldError."""
        uow = shop.uow()
        async with uow:
            for call in (uow.skus.list, uow.skus.get_by, uow.skus.count):
                with pytest.raises(errors.UnknownFieldError, match="no column attribute colour"):
                    await call(colour="red")

    async def test_wrong_model_raises(self, shop: Shop) -> None:
        """Giving a repository an object of another class raises ModelTypeError."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.ModelTypeError, match="was given a Item"):
                await uow.skus.add(Item("x"))
            with pytest.raises(errors.ModelTypeError):
                await uow.skus.add_all([Sku("ok"), Item("x")])
            with pytest.raises(errors.ModelTypeError):
                await uow.skus.remove(Item("x"))
            assert 0 == await uow.skus.count()

    async def test_remove_of_a_stranger_raises(self, shop: Shop) -> None:
        """remove() of an object this block never saw raises NotInRepositoryError."""
        await seed(shop, Sku("a"))
        uow = shop.uow()
        async with uow:
            loaded = await uow.skus.get("a")
        async with uow:
            with pytest.raises(errors.NotInRepositoryError, match="load it through the repository"):
                await uow.skus.remove(Sku("never-added"))
            with pytest.raises(errors.NotInRepositoryError):
                await uow.skus.remove(loaded)

    # -- repository contract -------------------------------------------------

    async def test_get_returns_none_when_absent(self, shop: Shop) -> None:
        """get() of a missing key returns None."""
        uow = shop.uow()
        async with uow:
            assert await uow.skus.get("missing") is None
            assert await uow.items.get(12345) is None

    async def test_get_by_primary_key(self, shop: Shop) -> None:
        """get() finds an object by primary key, and returns the same object twice in a block."""
        await seed(shop, Sku("a", "first"), Sku("b", "second"))
        uow = shop.uow()
        async with uow:
            found = await uow.skus.get("b")
            assert "second" == found.description
            assert found is await uow.skus.get("b")

    async def test_get_with_a_composite_key(self, shop: Shop) -> None:
        """get() takes a composite key as a tuple or a dict; a wrong shape raises."""
        await seed(shop, Pair("x", 1, "one"), Pair("x", 2, "two"))
        uow = shop.uow()
        async with uow:
            assert "two" == (await uow.pairs.get(("x", 2))).label
            assert "one" == (await uow.pairs.get({"kind": "x", "number": 1})).label
            assert await uow.pairs.get(("x", 3)) is None
            with pytest.raises(errors.UnknownFieldError, match="composite primary key"):
                await uow.pairs.get("x")
            with pytest.raises(errors.UnknownFieldError, match="missing"):
                await uow.pairs.get({"kind": "x"})
            with pytest.raises(errors.UnknownFieldError, match="single primary key"):
                await uow.skus.get(("a", "b"))
            assert await uow.skus.get(("nope",)) is None

    async def test_get_by_matches_attribute_equality(self, shop: Shop) -> None:
        """get_by() returns the single match, None for no match, and raises for several."""
        await seed(shop, Sku("a", "red", 1), Sku("b", "blue", 1), Sku("c", "green", 2))
        uow = shop.uow()
        async with uow:
            assert "b" == (await uow.skus.get_by(description="blue")).code
            assert "c" == (await uow.skus.get_by(description="green", stock=2)).code
            assert await uow.skus.get_by(description="green", stock=1) is None
            with pytest.raises(errors.MultipleResultsError, match=r"get_by\(stock=1\) matched more than one Sku"):
                await uow.skus.get_by(stock=1)

    async def test_list_filters_and_orders_by_primary_key(self, shop: Shop) -> None:
        """list() returns every match, in primary-key order."""
        await seed(shop, Pair("b", 2), Pair("a", 9), Pair("b", 1), Pair("a", 3, "odd"))
        uow = shop.uow()
        async with uow:
            everything = await uow.pairs.list()
            assert [("a", 3), ("a", 9), ("b", 1), ("b", 2)] == [(p.kind, p.number) for p in everything]
            assert [1, 2] == [p.number for p in await uow.pairs.list(kind="b")]
            assert [3] == [p.number for p in await uow.pairs.list(kind="a", label="odd")]
            assert [] == await uow.pairs.list(kind="z")

    async def test_list_filters_on_none(self, shop: Shop) -> None:
        """A filter value of None matches nothing on a NOT NULL column, as in SQL's IS NULL."""
        await seed(shop, Sku("a"))
        uow = shop.uow()
        async with uow:
            assert [] == await uow.skus.list(description=None)
            assert 0 == await uow.skus.count(description=None)

    async def test_count_with_and_without_filters(self, shop: Shop) -> None:
        """count() counts all objects or those matching filters."""
        await seed(shop, Sku("a", stock=1), Sku("b", stock=1), Sku("c", stock=5))
        uow = shop.uow()
        async with uow:
            assert 3 == await uow.skus.count()
            assert 2 == await uow.skus.count(stock=1)
            assert 0 == await uow.skus.count(stock=99)

    async def test_queries_see_pending_objects(self, shop: Shop) -> None:
        """Objects added in the block are visible to its queries before commit."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a", stock=4))
            assert 1 == await uow.skus.count(stock=4)
            assert "a" == (await uow.skus.get("a")).code

    async def test_add_all_adds_every_object(self, shop: Shop) -> None:
        """add_all() adds many objects in one call."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add_all(Sku(code) for code in "xyz")
            await uow.commit()
        assert [("x",), ("y",), ("z",)] == shop.committed(Sku, "code")

    # -- add_all(bulk=True) ------------------------------------------------------

    async def test_bulk_add_all_inserts_every_row(self, shop: Shop) -> None:
        """add_all(bulk=True) inserts every object, and the commit keeps them."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add_all((Sku(f"s{i:03}", "bulk", i) for i in range(250)), bulk=True)
            assert 250 == await uow.skus.count(description="bulk")
            await uow.commit()
        assert [(f"s{i:03}", i) for i in range(250)] == sorted(shop.committed(Sku, "code", "stock"))

    async def test_bulk_rows_roll_back_with_the_block(self, shop: Shop) -> None:
        """Rows inserted in bulk disappear when the block rolls back."""
        uow = shop.uow()
        with pytest.raises(Boom):
            async with uow:
                await uow.skus.add_all([Sku("a"), Sku("b")], bulk=True)
                raise Boom
        assert [] == shop.committed(Sku, "code")

    async def test_bulk_objects_stay_unattached(self, shop: Shop) -> None:
        """After a bulk insert, changing the object saves nothing, and no generated key is set on it."""
        uow = shop.uow()
        async with uow:
            sku, item = Sku("a", "as inserted", 1), Item("first")
            await uow.skus.add_all([sku], bulk=True)
            await uow.items.add_all([item], bulk=True)
            sku.description = "changed afterwards"
            loaded = await uow.skus.get("a")
            await uow.commit()
        assert loaded is not sku
        assert "as inserted" == loaded.description
        assert item.id is None
        assert [("a", "as inserted")] == shop.committed(Sku, "code", "description")
        assert [("first",)] == shop.committed(Item, "name")

    async def test_bulk_applies_column_defaults_and_generated_keys(self, shop: Shop) -> None:
        """Unset attributes get their column default, and None keys are generated, as at a flush."""
        uow = shop.uow()
        async with uow:
            await uow.notes.add_all([Note(text="plain"), Note(text="pinned", pinned=True)], bulk=True)
            await uow.items.add_all([Item("a", 1), Item("b", 2), Item("c", 3, id=10**6)], bulk=True)
            await uow.commit()
        assert [("pinned", True), ("plain", False)] == shop.committed(Note, "text", "pinned")
        rows = shop.committed(Item, "id", "name")
        assert (10**6, "c") in rows
        assert ["a", "b", "c"] == sorted(name for _, name in rows)
        assert 3 == len({key for key, _ in rows})

    async def test_bulk_writes_pending_objects_first(self, shop: Shop) -> None:
        """Objects added before a bulk insert are written before it, and both are committed."""
        uow = shop.uow()
        async with uow:
            await uow.orders.add(Order("o1"))
            await uow.skus.add_all([Sku("x")], bulk=True)
            await uow.commit()
        assert [("o1",)] == shop.committed(Order, "ref")
        assert [("x",)] == shop.committed(Sku, "code")

    async def test_bulk_does_not_add_related_objects(self, shop: Shop) -> None:
        """A bulk insert writes the objects' own table only, not objects they refer to."""
        uow = shop.uow()
        async with uow:
            await uow.orders.add_all([Order("o1", [Line("LAMP", 1)])], bulk=True)
            await uow.commit()
        assert [("o1",)] == shop.committed(Order, "ref")
        assert [] == shop.committed(Line, "sku")

    async def test_bulk_duplicate_key_raises_and_commits_nothing(self, shop: Shop) -> None:
        """A duplicate primary key in a bulk insert raises IntegrityError, and the block commits nothing."""
        await seed(shop, Sku("a"))
        uow = shop.uow()
        with pytest.raises(IntegrityError):
            async with uow:
                await uow.skus.add_all([Sku("b"), Sku("a")], bulk=True)
                await uow.commit()
        assert [("a",)] == shop.committed(Sku, "code")

    async def test_bulk_of_the_wrong_type_raises_before_writing(self, shop: Shop) -> None:
        """An object of another class in a bulk insert raises ModelTypeError and nothing is written."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.ModelTypeError):
                await uow.skus.add_all([Sku("a"), Item("x")], bulk=True)
            assert 0 == await uow.skus.count()
            await uow.commit()
        assert [] == shop.committed(Sku, "code")

    async def test_bulk_in_a_read_only_transaction_raises(self, shop: Shop) -> None:
        """A bulk insert in a read-only transaction raises ReadOnlyError and writes nothing."""
        uow = shop.uow()
        with pytest.raises(errors.ReadOnlyError):
            async with uow.transaction(read_only=True):
                await uow.skus.add_all([Sku("a")], bulk=True)
        assert [] == shop.committed(Sku, "code")

    async def test_generated_keys_are_assigned_at_flush(self, shop: Shop) -> None:
        """A database-generated key is None after add() and set by the next query or commit."""
        uow = shop.uow()
        async with uow:
            first, second = Item("a"), Item("b")
            await uow.items.add(first)
            assert first.id is None
            assert 1 == await uow.items.count(name="a")
            await uow.items.add(second)
            await uow.commit()
        assert isinstance(first.id, int)
        assert isinstance(second.id, int)
        assert first.id < second.id
        assert [(first.id, "a"), (second.id, "b")] == sorted(shop.committed(Item, "id", "name"))

    async def test_duplicate_primary_key_in_one_flush_raises(self, shop: Shop) -> None:
        """Two new objects with one primary key fail with IntegrityError at commit."""
        uow = shop.uow()
        with pytest.raises(IntegrityError):
            async with uow:
                await uow.skus.add_all([Sku("a"), Sku("a")])
                await uow.commit()
        assert [] == shop.committed(Sku, "code")

    async def test_missing_primary_key_raises(self, shop: Shop) -> None:
        """A new object without its (not generated) primary key fails at commit with a DBAPIError.

        SQLite, PostgreSQL and the fake raise IntegrityError; MariaDB in strict
        mode raises OperationalError 1364 ("doesn't have a default value").
        """
        uow = shop.uow()
        on_database = shop.name.startswith(("sqlite", "postgresql", "mariadb"))
        with (
            pytest.warns(SAWarning, match="primary key") if on_database else _nothing(),
            pytest.raises(IntegrityError if not shop.name.startswith("mariadb") else OperationalError),
        ):
            async with uow:
                await uow.pairs.add(Pair("a", None))  # type: ignore[arg-type]
                await uow.commit()
        assert [] == shop.committed(Pair, "kind")

    async def test_remove_deletes_at_commit(self, shop: Shop) -> None:
        """remove() of a loaded object deletes its row when the block commits."""
        await seed(shop, Sku("a"), Sku("b"))
        uow = shop.uow()
        async with uow:
            await uow.skus.remove(await uow.skus.get("a"))
            assert 1 == await uow.skus.count()
            await uow.commit()
        assert [("b",)] == shop.committed(Sku, "code")

    async def test_remove_without_commit_is_rolled_back(self, shop: Shop) -> None:
        """A remove() that is not committed leaves the row in place."""
        await seed(shop, Sku("a"))
        uow = shop.uow()
        async with uow:
            await uow.skus.remove(await uow.skus.get("a"))
        assert [("a",)] == shop.committed(Sku, "code")

    async def test_remove_of_a_pending_object_cancels_its_add(self, shop: Shop) -> None:
        """remove() of an object added in the same block means it is never written."""
        uow = shop.uow()
        async with uow:
            sku = Sku("a")
            await uow.skus.add(sku)
            await uow.skus.remove(sku)
            await uow.skus.add(Sku("b"))
            await uow.commit()
        assert [("b",)] == shop.committed(Sku, "code")

    async def test_remove_then_add_the_same_key(self, shop: Shop) -> None:
        """A row can be removed and a new object with its key added in one commit."""
        await seed(shop, Sku("a", "old"))
        uow = shop.uow()
        async with uow:
            await uow.skus.remove(await uow.skus.get("a"))
            await uow.commit()
            await uow.skus.add(Sku("a", "new"))
            await uow.commit()
        assert [("a", "new")] == shop.committed(Sku, "code", "description")

    async def test_save_update_cascades_to_related_objects(self, shop: Shop) -> None:
        """Objects reachable through a relationship are saved with their parent."""
        uow = shop.uow()
        async with uow:
            await uow.orders.add(Order("o1", [Line("red", 1), Line("blue", 2)]))
            await uow.commit()
        async with uow:
            order = await uow.orders.get("o1")
            order.lines.append(Line("green", 3))
            await uow.commit()
        assert [("blue", 2), ("green", 3), ("red", 1)] == shop.committed(Line, "sku", "qty")

    async def test_declarative_models_work_the_same(self, shop: Shop) -> None:
        """A declarative model gets the same repository behaviour as an imperatively mapped one."""
        uow = shop.uow()
        async with uow:
            await uow.notes.add_all([Note(text="first"), Note(text="second", pinned=True)])
            await uow.commit()
        async with uow:
            pinned = await uow.notes.get_by(pinned=True)
            assert "second" == pinned.text
            assert pinned is await uow.notes.get(pinned.id)
            assert ["first", "second"] == [note.text for note in await uow.notes.list()]
        assert [("first", False), ("second", True)] == shop.committed(Note, "text", "pinned")

    async def test_seen_records_returned_and_added_objects(self, shop: Shop) -> None:
        """seen holds every object the repository returned or was given, once each."""
        await seed(shop, Sku("a"), Sku("b"))
        uow = shop.uow()
        async with uow:
            added = Sku("c")
            await uow.skus.add(added)
            a = await uow.skus.get("a")
            listed = await uow.skus.list()
            assert await uow.skus.get("nope") is None
            seen = uow.skus.seen
        assert 3 == len(seen)
        assert {id(added), id(a), *map(id, listed)} == {id(obj) for obj in seen}

    async def test_events_are_collected_only_after_commit(self, shop: Shop) -> None:
        """collect_new_events() yields events of committed aggregates once, and none from rolled-back work."""
        uow = shop.uow()
        async with uow:
            item = Item("a")
            item.events.append("created")
            await uow.items.add(item)
            assert [] == list(uow.collect_new_events())
            await uow.commit()
        assert ["created"] == list(uow.collect_new_events())
        assert [] == list(uow.collect_new_events())
        async with uow:
            loaded = await uow.items.get_by(name="a")
            loaded.events = ["renamed"]
        assert [] == list(uow.collect_new_events())

    async def test_events_of_later_blocks_are_new_ones_only(self, shop: Shop) -> None:
        """An aggregate loaded in a later block brings no events from earlier commits."""
        uow = shop.uow()
        async with uow:
            item = Item("a")
            item.events.append("created")
            await uow.items.add(item)
            await uow.commit()
        assert ["created"] == list(uow.collect_new_events())
        async with uow:
            loaded = await uow.items.get_by(name="a")
            loaded.qty = 3
            loaded.events = [*getattr(loaded, "events", []), "restocked"]
            await uow.commit()
        assert ["restocked"] == list(uow.collect_new_events())


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: Any) -> None:
        return None
