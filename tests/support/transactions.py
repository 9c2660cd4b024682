"""The transaction rules, run unchanged against every implementation.

A test module subclasses :class:`TransactionContract` and provides a ``shop``
fixture (see :mod:`tests.support.harness`): the same tests then run on the
fakes and on SQLite, PostgreSQL and MariaDB, sync and async. Committed rows
are read back without the unit of work under test.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from uow import errors

from .harness import Shop
from .models import Item, Line, Order, Sku


class Boom(Exception):
    """Raised by service code in the tests."""


async def seed(shop: Shop, *codes: str) -> None:
    """Commit a Sku for each of *codes*."""
    uow = shop.uow()
    async with uow:
        await uow.skus.add_all([Sku(code) for code in codes])
        await uow.commit()


def codes(shop: Shop) -> list[str]:
    """The committed Sku codes, sorted."""
    return sorted(code for (code,) in shop.committed(Sku, "code"))


def inner_scope(uow: Any, kind: str) -> Any:
    """The inner scope of the nesting matrix: re-entering, a joined transaction() or a savepoint."""
    if kind == "reentered":
        return uow
    if kind == "joined":
        return uow.transaction(propagation="required")
    return uow.savepoint()


class TransactionContract:
    """How scopes of one unit of work compose, on every implementation."""

    # -- the nesting matrix ----------------------------------------------------

    @pytest.mark.parametrize("kind", ["reentered", "joined", "savepoint"])
    @pytest.mark.parametrize("inner", ["commit", "raise"])
    @pytest.mark.parametrize("outer", ["commit", "raise"])
    async def test_nesting_matrix(self, shop: Shop, kind: str, inner: str, outer: str) -> None:
        """Inner {commit, raise} x outer {commit, raise}: only what the rules keep is committed, once."""
        uow = shop.uow()
        fails = outer == "raise" or (inner == "raise" and kind != "savepoint")
        with pytest.raises((Boom, errors.RollbackOnlyError)) if fails else contextlib.nullcontext():
            async with uow:
                await uow.skus.add(Sku("outer"))
                try:
                    async with inner_scope(uow, kind):
                        await uow.skus.add(Sku("inner"))
                        if inner == "raise":
                            raise Boom("inner")
                        await uow.commit()
                except Boom:
                    pass  # the caller handles the inner failure and goes on
                assert 0 == uow.commits
                if outer == "raise":
                    raise Boom("outer")
                await uow.commit()
        expected = {
            ("commit", "commit"): ["inner", "outer"],
            ("raise", "commit"): ["outer"] if kind == "savepoint" else [],
        }.get((inner, outer), [])
        assert expected == codes(shop)
        assert (1 if expected else 0) == uow.commits
        assert not uow.active

    async def test_mixed_chain_commits_once(self, shop: Shop) -> None:
        """Owner, savepoint, joined and re-entered scopes stacked: everything commits once, at the owner."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
            async with uow.savepoint():
                await uow.skus.add(Sku("b"))
                async with uow.transaction():
                    await uow.skus.add(Sku("c"))
                    async with uow:
                        await uow.skus.add(Sku("d"))
                        await uow.commit()
                    await uow.commit()
                await uow.commit()
            assert [] == codes(shop)
            await uow.commit()
        assert ["a", "b", "c", "d"] == codes(shop)
        assert 1 == uow.commits

    # -- rollback-only -----------------------------------------------------------

    async def test_swallowed_error_in_joined_scope_poisons_the_transaction(self, shop: Shop) -> None:
        """After a joined scope's error is swallowed, any use raises RollbackOnlyError caused by it."""
        uow = shop.uow()
        original = Boom("inner")
        with pytest.raises(errors.RollbackOnlyError) as raised:
            async with uow:
                await uow.skus.add(Sku("a"))
                try:
                    async with uow:
                        raise original
                except Boom:
                    pass
                with pytest.raises(errors.RollbackOnlyError) as used:
                    await uow.skus.list()
                assert original is used.value.__cause__
                with pytest.raises(errors.RollbackOnlyError):
                    await uow.commit()
        assert original is raised.value.__cause__
        assert [] == codes(shop)
        assert not uow.active

    async def test_swallowed_error_in_joined_scope_fails_the_owners_clean_exit(self, shop: Shop) -> None:
        """The owner's clean exit after a swallowed joined error rolls back and raises, never commits."""
        uow = shop.uow(autocommit=True)
        with pytest.raises(errors.RollbackOnlyError, match="rolled back, not committed"):
            async with uow:
                await uow.skus.add(Sku("a"))
                try:
                    async with uow:
                        raise Boom("inner")
                except Boom:
                    pass
        assert [] == codes(shop)
        assert 0 == uow.commits
        assert uow.rolled_back

    async def test_swallowed_error_in_a_savepoints_joined_scope_fails_only_the_savepoint(self, shop: Shop) -> None:
        """A swallowed joined error inside a savepoint rolls back to it and raises there; the owner commits."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("kept"))
            with pytest.raises(errors.RollbackOnlyError) as raised:
                async with uow.savepoint():
                    await uow.skus.add(Sku("dropped"))
                    try:
                        async with uow:
                            raise Boom("inner")
                    except Boom:
                        pass
            assert isinstance(raised.value.__cause__, Boom)
            assert ["kept"] == [sku.code for sku in await uow.skus.list()]
            await uow.commit()
        assert ["kept"] == codes(shop)

    async def test_integrity_error_in_a_savepoint_leaves_the_transaction_healthy(self, shop: Shop) -> None:
        """try/except IntegrityError around a savepoint skips a duplicate, and the rest commits."""
        await seed(shop, "dup")
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("before"))
            with pytest.raises(IntegrityError):
                async with uow.savepoint():
                    await uow.skus.add(Sku("dup"))
                    await uow.skus.count()
            await uow.skus.add(Sku("after"))
            await uow.commit()
        assert ["after", "before", "dup"] == codes(shop)

    async def test_failed_release_rolls_back_to_the_savepoint(self, shop: Shop) -> None:
        """A duplicate first sent when the savepoint is released rolls back only the savepoint."""
        await seed(shop, "dup")
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("before"))
            with pytest.raises(IntegrityError):
                async with uow.savepoint():
                    await uow.skus.add(Sku("dup"))
            await uow.skus.add(Sku("after"))
            await uow.commit()
        assert ["after", "before", "dup"] == codes(shop)

    async def test_events_raised_in_a_rolled_back_savepoint_are_dropped(self, shop: Shop) -> None:
        """Domain events raised inside a savepoint that rolls back are not collected; the others are."""
        uow = shop.uow()
        async with uow:
            item = Item("box")
            await uow.items.add(item)
            item.events.append("outer")
            with pytest.raises(Boom):
                async with uow.savepoint():
                    item.events.append("inner")
                    other = Item("crate")
                    await uow.items.add(other)
                    other.events.append("new inside")
                    raise Boom("inner")
            async with uow.savepoint():
                item.events.append("released")
            await uow.commit()
        assert ["outer", "released"] == list(uow.collect_new_events())

    async def test_rolled_back_savepoint_restores_loaded_objects(self, shop: Shop) -> None:
        """Objects loaded before a savepoint get back their attributes and collections when it rolls back."""
        uow = shop.uow()
        async with uow:
            await uow.orders.add(Order("o1", [Line("red", 1)]))
            await uow.commit()
        async with uow:
            order = await uow.orders.get("o1")
            sku = Sku("kept", "before")
            await uow.skus.add(sku)
            await uow.skus.count()
            with pytest.raises(Boom):
                async with uow.savepoint():
                    order.lines.append(Line("blue", 2))
                    sku.description = "changed"
                    await uow.orders.count()
                    raise Boom("inner")
            # Read them again through the repository: an async session cannot reload expired attributes lazily.
            assert order is await uow.orders.get("o1")
            assert sku is await uow.skus.get("kept")
            assert [("red", 1)] == [(line.sku, line.qty) for line in order.lines]
            assert "before" == sku.description
            await uow.commit()
        assert [("red", 1)] == shop.committed(Line, "sku", "qty")
        assert [("kept", "before")] == shop.committed(Sku, "code", "description")

    async def test_released_savepoint_does_not_commit_the_outer_block(self, shop: Shop) -> None:
        """A savepoint opened before any write, then released, still leaves the decision to the owner."""
        await seed(shop, "old")
        uow = shop.uow()
        async with uow:
            assert 1 == await uow.skus.count()
            async with uow.savepoint():
                await uow.skus.add(Sku("new"))
            assert ["old"] == codes(shop)
        assert ["old"] == codes(shop)
        assert uow.rolled_back

    async def test_autocommit_commits_changes_made_after_a_commit(self, shop: Shop) -> None:
        """With autocommit, an attribute changed after a commit in the block is committed at the exit."""
        uow = shop.uow(autocommit=True)
        async with uow:
            sku = Sku("a", "first")
            await uow.skus.add(sku)
            await uow.commit()
            sku.description = "second"
        assert [("a", "second")] == shop.committed(Sku, "code", "description")
        assert 2 == uow.commits

    async def test_autocommit_does_not_write_back_a_row_committed_meanwhile(self, shop: Shop) -> None:
        """An outer block that only read a row after its commit leaves what requires_new committed to it."""
        uow = shop.uow(autocommit=True)
        async with uow:
            sku = Sku("a", "first")
            await uow.skus.add(sku)
            await uow.commit()
            async with uow.transaction(propagation="requires_new"):
                inner = await uow.skus.get("a")
                inner.description = "second"
                await uow.commit()
        assert [("a", "second")] == shop.committed(Sku, "code", "description")
        assert 2 == uow.commits

    async def test_autocommit_sends_no_commit_for_an_unchanged_value(self, shop: Shop) -> None:
        """Setting an attribute to the value it has is no change: the exit sends no second commit."""
        uow = shop.uow(autocommit=True)
        async with uow:
            sku = Sku("a", "same")
            await uow.skus.add(sku)
            await uow.commit()
            sku.description = "same"
        assert 1 == uow.commits

    async def test_set_rollback_only_rolls_back_quietly(self, shop: Shop) -> None:
        """set_rollback_only() makes a clean exit roll back without an error, and commit() raise."""
        uow = shop.uow(autocommit=True)
        async with uow:
            await uow.skus.add(Sku("a"))
            async with uow:
                uow.set_rollback_only()
            with pytest.raises(errors.RollbackOnlyError, match="set_rollback_only"):
                await uow.commit()
        assert [] == codes(shop)
        assert uow.rolled_back

    async def test_set_rollback_only_in_a_savepoint_drops_only_its_work(self, shop: Shop) -> None:
        """set_rollback_only() inside a savepoint rolls back to it quietly; the owner still commits."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("kept"))
            async with uow.savepoint():
                await uow.skus.add(Sku("dropped"))
                uow.set_rollback_only()
            await uow.commit()
        assert ["kept"] == codes(shop)

    # -- forbidden in joined scopes ------------------------------------------------

    async def test_rollback_in_a_joined_scope_raises(self, shop: Shop) -> None:
        """rollback() from a joined scope or a savepoint raises JoinedScopeError and the owner goes on."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
            async with uow.transaction():
                with pytest.raises(errors.JoinedScopeError, match="joined scope"):
                    await uow.rollback()
            async with uow.savepoint():
                with pytest.raises(errors.JoinedScopeError):
                    await uow.rollback()
            await uow.commit()
        assert ["a"] == codes(shop)

    async def test_savepoint_outside_a_block_raises(self, shop: Shop) -> None:
        """uow.savepoint() needs an active block."""
        uow = shop.uow()
        with pytest.raises(errors.InactiveUnitOfWorkError, match="savepoint"):
            async with uow.savepoint():
                pass  # pragma: no cover

    # -- propagation -----------------------------------------------------------------

    async def test_requires_new_commits_on_its_own(self, shop: Shop) -> None:
        """requires_new runs a transaction of its own: it stays committed when the outer one rolls back."""
        uow = shop.uow()
        with pytest.raises(Boom):
            async with uow:
                await uow.skus.add(Sku("outer"))
                async with uow.transaction(propagation="requires_new"):
                    await uow.skus.add(Sku("audit"))
                    await uow.commit()
                assert ["audit"] == codes(shop)
                assert "outer" in [sku.code for sku in await uow.skus.list()]
                raise Boom("outer")
        assert ["audit"] == codes(shop)
        assert 1 == uow.commits

    async def test_requires_new_commit_does_not_mark_the_block_committed(self, shop: Shop) -> None:
        """committed and rolled_back describe the outermost transaction, not a requires_new one inside it."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("outer"))
            async with uow.transaction(propagation="requires_new"):
                await uow.skus.add(Sku("audit"))
                await uow.commit()
        assert (False, True, 1) == (uow.committed, uow.rolled_back, uow.commits)
        assert ["audit"] == codes(shop)

    async def test_requires_new_and_outer_both_commit(self, shop: Shop) -> None:
        """Work committed by requires_new and by the outer transaction after it are both kept."""
        await seed(shop, "old")
        uow = shop.uow()
        async with uow:
            assert ["old"] == [sku.code for sku in await uow.skus.list()]
            async with uow.transaction(propagation="requires_new"):
                await uow.skus.add(Sku("inner"))
                await uow.commit()
            await uow.skus.add(Sku("outer"))
            await uow.commit()
        assert ["inner", "old", "outer"] == codes(shop)
        assert 2 == uow.commits

    async def test_row_deleted_by_requires_new_stays_deleted(self, shop: Shop) -> None:
        """A row that requires_new deletes and commits is not brought back by the outer commit."""
        await seed(shop, "gone", "kept")
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("outer"))
            async with uow.transaction(propagation="requires_new"):
                gone = await uow.skus.get("gone")
                await uow.skus.remove(gone)
                await uow.commit()
            await uow.commit()
        assert ["kept", "outer"] == codes(shop)

    async def test_requires_new_without_commit_rolls_back(self, shop: Shop) -> None:
        """A requires_new scope that ends without commit() rolls back its own work only."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("outer"))
            async with uow.transaction(propagation="requires_new"):
                await uow.skus.add(Sku("inner"))
            await uow.commit()
        assert ["outer"] == codes(shop)

    async def test_nested_without_a_transaction_owns_one(self, shop: Shop) -> None:
        """propagation='nested' with nothing active starts and owns a transaction."""
        uow = shop.uow()
        async with uow.transaction(propagation="nested"):
            await uow.skus.add(Sku("a"))
            await uow.commit()
        assert ["a"] == codes(shop)

    async def test_nested_in_a_transaction_is_a_savepoint(self, shop: Shop) -> None:
        """propagation='nested' inside a block rolls back only its own work on an error."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("outer"))
            with pytest.raises(Boom):
                async with uow.transaction(propagation="nested"):
                    await uow.skus.add(Sku("inner"))
                    raise Boom("inner")
            await uow.commit()
        assert ["outer"] == codes(shop)

    async def test_mandatory_needs_an_active_transaction(self, shop: Shop) -> None:
        """propagation='mandatory' raises with nothing to join, and joins an active block."""
        uow = shop.uow()
        with pytest.raises(errors.InactiveUnitOfWorkError, match="mandatory"):
            async with uow.transaction(propagation="mandatory"):
                pass  # pragma: no cover
        async with uow:
            async with uow.transaction(propagation="mandatory"):
                await uow.skus.add(Sku("a"))
                await uow.commit()
            assert [] == codes(shop)
            await uow.commit()
        assert ["a"] == codes(shop)

    async def test_never_refuses_an_active_transaction(self, shop: Shop) -> None:
        """propagation='never' raises inside a block, and owns a transaction outside one."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.ActiveUnitOfWorkError, match="never"):
                async with uow.transaction(propagation="never"):
                    pass  # pragma: no cover
            await uow.skus.add(Sku("still fine"))
            await uow.commit()
        async with uow.transaction(propagation="never"):
            await uow.skus.add(Sku("owned"))
            await uow.commit()
        assert ["owned", "still fine"] == codes(shop)

    async def test_unknown_options_raise(self, shop: Shop) -> None:
        """An unknown propagation or isolation level raises ConfigurationError before anything starts."""
        uow = shop.uow()
        with pytest.raises(errors.ConfigurationError, match="propagation"):
            async with uow.transaction(propagation="sometimes"):
                pass  # pragma: no cover
        with pytest.raises(errors.ConfigurationError, match="isolation_level"):
            async with uow.transaction(isolation_level="CHAOS"):
                pass  # pragma: no cover
        assert not uow.active

    # -- on_commit hooks -----------------------------------------------------------------

    async def test_hooks_run_after_the_outermost_commit_in_order(self, shop: Shop) -> None:
        """Hooks wait for the owner's real commit, then run in registration order, once."""
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            uow.on_commit(lambda: ran.append("first"))
            async with uow:
                await uow.skus.add(Sku("a"))
                uow.on_commit(lambda: ran.append("second"))
                await uow.commit()
            assert [] == ran
            await uow.commit()
            assert ["first", "second"] == ran
            await uow.skus.add(Sku("b"))
            await uow.commit()
        assert ["first", "second"] == ran

    async def test_hooks_are_dropped_on_rollback(self, shop: Shop) -> None:
        """Hooks of a transaction that rolls back never run: not on exit, not at a later commit."""
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            await uow.skus.add(Sku("a"))
            uow.on_commit(lambda: ran.append("dropped"))
        async with uow:
            uow.on_commit(lambda: ran.append("rolled back"))
            await uow.rollback()
            await uow.skus.add(Sku("b"))
            await uow.commit()
        with pytest.raises(Boom):
            async with uow:
                uow.on_commit(lambda: ran.append("error"))
                raise Boom("service")
        assert [] == ran
        assert ["b"] == codes(shop)

    async def test_hooks_from_a_rolled_back_savepoint_are_dropped(self, shop: Shop) -> None:
        """A savepoint that rolls back drops its hooks; a released one keeps them for the commit."""
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            uow.on_commit(lambda: ran.append("before"))
            with pytest.raises(Boom):
                async with uow.savepoint():
                    uow.on_commit(lambda: ran.append("dropped"))
                    raise Boom("inner")
            async with uow.savepoint():
                await uow.skus.add(Sku("a"))
                uow.on_commit(lambda: ran.append("released"))
            assert [] == ran  # releasing a savepoint does not fire on_commit
            await uow.commit()
        assert ["before", "released"] == ran

    async def test_hook_registered_by_a_hook_runs_in_the_same_pass(self, shop: Shop) -> None:
        """A hook that registers a hook: the new one runs after the others, in the same commit."""
        uow = shop.uow()
        ran: list[str] = []

        def first() -> None:
            ran.append("first")
            uow.on_commit(lambda: ran.append("added by first"))

        async with uow:
            uow.on_commit(first)
            uow.on_commit(lambda: ran.append("second"))
            await uow.commit()
        assert ["first", "second", "added by first"] == ran

    async def test_robust_hook_failure_is_logged_and_the_next_hook_runs(
        self, shop: Shop, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A robust hook that raises is logged on the uow logger, and the hooks after it still run."""
        uow = shop.uow()
        ran: list[str] = []

        def broken() -> None:
            raise Boom("hook")

        async with uow:
            await uow.skus.add(Sku("a"))
            uow.on_commit(broken, robust=True)
            uow.on_commit(lambda: ran.append("next"))
            with caplog.at_level(logging.ERROR, logger="uow"):
                await uow.commit()
        assert ["next"] == ran
        assert ["a"] == codes(shop)
        assert any("on_commit hook" in record.getMessage() for record in caplog.records)

    async def test_failing_hook_raises_after_the_commit(self, shop: Shop) -> None:
        """A hook that raises propagates from commit(), after the data is committed; later hooks are dropped."""
        uow = shop.uow()
        ran: list[str] = []

        def broken() -> None:
            raise Boom("hook")

        async with uow:
            await uow.skus.add(Sku("a"))
            uow.on_commit(broken)
            uow.on_commit(lambda: ran.append("never"))
            with pytest.raises(Boom, match="hook"):
                await uow.commit()
            assert uow.committed
            await uow.commit()
        assert [] == ran
        assert ["a"] == codes(shop)

    async def test_hooks_do_not_run_when_the_commit_fails(self, shop: Shop) -> None:
        """A commit that fails runs no hook and drops them all."""
        await seed(shop, "dup")
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            uow.on_commit(lambda: ran.append("never"))
            await uow.skus.add(Sku("dup"))
            with pytest.raises(IntegrityError):
                await uow.commit()
            await uow.skus.add(Sku("fresh"))
            await uow.commit()
        assert [] == ran
        assert ["dup", "fresh"] == codes(shop)

    async def test_on_commit_outside_a_block_raises(self, shop: Shop) -> None:
        """on_commit() needs an active block."""
        uow = shop.uow()
        with pytest.raises(errors.InactiveUnitOfWorkError, match="on_commit"):
            uow.on_commit(lambda: None)

    # -- before_commit, on_rollback and after_completion -------------------------------

    async def test_lifecycle_hooks_run_in_order_around_a_commit(self, shop: Shop) -> None:
        """before_commit runs inside the transaction and its write commits; on_commit, then after_completion follow."""
        uow = shop.uow()
        ran: list[str] = []

        def audit() -> Any:
            ran.append("before_commit")
            if shop.is_async:
                return uow.skus.add(Sku("audit"))  # a write inside the transaction, which uow awaits
            return uow.wrapped.skus.add(Sku("audit"))

        async with uow:
            uow.after_completion(lambda status: ran.append(f"after_completion {status}"))
            uow.on_commit(lambda: ran.append("on_commit"))
            uow.on_rollback(lambda: ran.append("on_rollback"))
            uow.before_commit(audit)
            await uow.skus.add(Sku("a"))
            assert [] == ran
            await uow.commit()
            assert ["before_commit", "on_commit", "after_completion committed"] == ran
            await uow.skus.add(Sku("b"))
        assert ["before_commit", "on_commit", "after_completion committed"] == ran  # the rollback found no hooks
        assert ["a", "audit"] == codes(shop)

    async def test_before_commit_that_raises_vetoes_the_commit(self, shop: Shop) -> None:
        """A before_commit hook that raises: nothing is committed, the rollback hooks run, the block goes on."""
        uow = shop.uow()
        ran: list[str] = []

        def veto() -> None:
            raise Boom("veto")

        async with uow:
            await uow.skus.add(Sku("vetoed"))
            uow.before_commit(veto)
            uow.on_commit(lambda: ran.append("on_commit"))
            uow.on_rollback(lambda: ran.append("on_rollback"))
            uow.after_completion(lambda status: ran.append(status))
            with pytest.raises(Boom, match="veto"):
                await uow.commit()
            assert ["on_rollback", "rolled_back"] == ran
            assert not uow.committed
            await uow.skus.add(Sku("later"))
            await uow.commit()
        assert ["later"] == codes(shop)

    async def test_before_commit_may_not_commit_or_roll_back(self, shop: Shop) -> None:
        """commit() or rollback() inside a before_commit hook raises ConfigurationError, which vetoes the commit."""
        for method in ("commit", "rollback"):
            uow = shop.uow()
            ran: list[str] = []

            def nested(method: str = method, uow: Any = uow) -> Any:
                return getattr(uow, method)()

            async with uow:
                await uow.skus.add(Sku(method))
                uow.before_commit(nested)
                uow.after_completion(lambda status, ran=ran: ran.append(status))
                with pytest.raises(errors.ConfigurationError, match="before_commit hook"):
                    await uow.commit()
            assert ["rolled_back"] == ran
        assert [] == codes(shop)

    async def test_before_commit_that_makes_the_transaction_rollback_only_vetoes(self, shop: Shop) -> None:
        """set_rollback_only() in a before_commit hook refuses the commit with RollbackOnlyError."""
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            await uow.skus.add(Sku("a"))
            uow.before_commit(uow.set_rollback_only)
            uow.on_rollback(lambda: ran.append("on_rollback"))
            with pytest.raises(errors.RollbackOnlyError):
                await uow.commit()
        assert ["on_rollback"] == ran
        assert [] == codes(shop)

    async def test_before_commit_runs_at_the_owners_commit_only(self, shop: Shop) -> None:
        """A joined commit() and a released savepoint run no before_commit hook; the owner's commit runs each once."""
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            async with uow.savepoint():
                uow.before_commit(lambda: ran.append("from a savepoint"))
            async with uow.transaction():
                uow.before_commit(lambda: ran.append("from a joined scope"))
                await uow.skus.add(Sku("a"))
                await uow.commit()
            assert [] == ran
            await uow.commit()
            await uow.skus.add(Sku("b"))
            await uow.commit()
        assert ["from a savepoint", "from a joined scope"] == ran
        assert ["a", "b"] == codes(shop)

    async def test_on_rollback_runs_after_each_kind_of_rollback(self, shop: Shop) -> None:
        """on_rollback runs after an exception leaves the owner, after rollback(), and after a commit that failed."""
        await seed(shop, "dup")
        uow = shop.uow()
        ran: list[str] = []
        with pytest.raises(Boom):
            async with uow:
                uow.on_rollback(lambda: ran.append("exception"))
                raise Boom("service")
        async with uow:
            uow.on_rollback(lambda: ran.append("rollback()"))
            await uow.rollback()
            assert ["exception", "rollback()"] == ran
            uow.on_rollback(lambda: ran.append("failed commit"))
            uow.after_completion(lambda status: ran.append(status))
            await uow.skus.add(Sku("dup"))
            with pytest.raises(IntegrityError):
                await uow.commit()
        async with uow:
            uow.on_rollback(lambda: ran.append("left without commit"))
        assert ["exception", "rollback()", "failed commit", "rolled_back", "left without commit"] == ran
        assert ["dup"] == codes(shop)

    async def test_on_rollback_hooks_are_dropped_by_a_commit(self, shop: Shop) -> None:
        """A commit drops the on_rollback hooks registered before it: a later rollback in the block runs none."""
        uow = shop.uow()
        ran: list[str] = []
        with pytest.raises(Boom):
            async with uow:
                uow.on_rollback(lambda: ran.append("before the commit"))
                await uow.skus.add(Sku("a"))
                await uow.commit()
                uow.on_rollback(lambda: ran.append("after the commit"))
                raise Boom("service")
        assert ["after the commit"] == ran
        assert ["a"] == codes(shop)

    async def test_hooks_of_every_kind_from_a_rolled_back_savepoint_are_dropped(self, shop: Shop) -> None:
        """A savepoint that rolls back drops its before_commit, on_rollback and after_completion hooks."""
        uow = shop.uow()
        ran: list[str] = []
        async with uow:
            uow.after_completion(lambda status: ran.append(f"kept {status}"))
            with pytest.raises(Boom):
                async with uow.savepoint():
                    uow.before_commit(lambda: ran.append("before_commit"))
                    uow.on_rollback(lambda: ran.append("on_rollback"))
                    uow.after_completion(lambda status: ran.append(f"dropped {status}"))
                    raise Boom("inner")
            await uow.skus.add(Sku("a"))
            await uow.commit()
        assert ["kept committed"] == ran

    async def test_after_completion_runs_when_an_on_commit_hook_fails(
        self, shop: Shop, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A failing on_commit hook still lets after_completion run; failures of the others are logged, not raised."""
        uow = shop.uow()
        ran: list[str] = []

        def broken(*args: object) -> None:
            raise Boom("hook")

        async with uow:
            await uow.skus.add(Sku("a"))
            uow.on_commit(broken)
            uow.after_completion(broken)
            uow.after_completion(lambda status: ran.append(status))
            with caplog.at_level(logging.ERROR, logger="uow"), pytest.raises(Boom, match="hook"):
                await uow.commit()
        with caplog.at_level(logging.ERROR, logger="uow"), pytest.raises(KeyError):
            async with uow:
                uow.on_rollback(broken)
                uow.after_completion(lambda status: ran.append(status))
                raise KeyError("the service's own error")
        assert ["committed", "rolled_back"] == ran
        assert ["a"] == codes(shop)
        failed = [record.getMessage() for record in caplog.records if "hook" in record.getMessage()]
        assert 2 == len(failed)
        assert "after_completion hook" in failed[0]
        assert "on_rollback hook" in failed[1]

    async def test_a_rollback_hook_that_enters_the_unit_of_work_gets_a_transaction_of_its_own(self, shop: Shop) -> None:
        """An on_rollback hook may record the failure: its block is a new transaction, which commits."""
        uow = shop.uow()

        async def record_async() -> None:
            async with uow:
                await uow.skus.add(Sku("failure recorded"))
                await uow.commit()

        def record() -> None:
            unit = uow.wrapped
            with unit:
                unit.skus.add(Sku("failure recorded"))
                unit.commit()

        with pytest.raises(Boom):
            async with uow:
                await uow.skus.add(Sku("lost"))
                uow.on_rollback(record_async if shop.is_async else record)
                raise Boom("service")
        assert ["failure recorded"] == codes(shop)
        assert not uow.active

    async def test_hooks_learn_of_a_read_only_block_that_refuses_its_write(self, shop: Shop) -> None:
        """A read-only block left with a pending write raises ReadOnlyError; its rollback hooks run, once."""
        uow = shop.uow()
        ran: list[str] = []
        with pytest.raises(errors.ReadOnlyError):
            async with uow.transaction(read_only=True):
                uow.on_rollback(lambda: ran.append("on_rollback"))
                uow.after_completion(lambda status: ran.append(status))
                await uow.skus.add(Sku("a"))
        assert ["on_rollback", "rolled_back"] == ran
        assert not uow.active
        assert [] == codes(shop)

    async def test_a_hook_of_an_ended_transaction_cannot_register_one_for_no_transaction(self, shop: Shop) -> None:
        """An on_commit hook that registers on_rollback gets ConfigurationError: no transaction is left for it."""
        uow = shop.uow()

        def late() -> None:
            uow.on_rollback(lambda: None)

        async with uow:
            await uow.skus.add(Sku("a"))
            uow.on_commit(late)
            with pytest.raises(errors.ConfigurationError, match="on_rollback"):
                await uow.commit()
        assert (True, False, 0) == (uow.committed, uow.rolled_back, uow.rollbacks)
        assert ["a"] == codes(shop)

    async def test_lifecycle_hooks_outside_a_block_raise(self, shop: Shop) -> None:
        """before_commit(), on_rollback() and after_completion() need an active block."""
        uow = shop.uow()
        for method in ("before_commit", "on_rollback", "after_completion"):
            with pytest.raises(errors.InactiveUnitOfWorkError, match=method):
                getattr(uow, method)(lambda *args: None)

    # -- domain events -----------------------------------------------------------------

    async def test_events_wait_for_the_owners_commit(self, shop: Shop) -> None:
        """A joined commit() collects no events; the owner's real commit does."""
        uow = shop.uow()
        async with uow:
            async with uow:
                item = Item("box")
                item.events.append("created")
                await uow.items.add(item)
                await uow.commit()
            assert [] == list(uow.collect_new_events())
            await uow.commit()
        assert ["created"] == list(uow.collect_new_events())

    # -- read-only and isolation ------------------------------------------------------------

    async def test_read_only_transaction_refuses_writes(self, shop: Shop) -> None:
        """A read-only transaction reads, raises ReadOnlyError on a pending write and on commit()."""
        await seed(shop, "a")
        uow = shop.uow()
        async with uow.transaction(read_only=True):
            assert ["a"] == [sku.code for sku in await uow.skus.list()]
            await uow.skus.add(Sku("b"))
            with pytest.raises(errors.ReadOnlyError, match="read-only"):
                await uow.skus.count()
            with pytest.raises(errors.ReadOnlyError):
                await uow.commit()
        assert ["a"] == codes(shop)
        assert 0 == uow.commits

    async def test_read_only_transaction_never_commits_on_exit(self, shop: Shop) -> None:
        """With autocommit, a read-only transaction still ends with a rollback."""
        await seed(shop, "a")
        uow = shop.uow(autocommit=True)
        async with uow.transaction(read_only=True):
            assert 1 == await uow.skus.count()
        assert 0 == uow.commits
        assert not uow.committed

    async def test_read_only_scope_may_join_a_read_write_one(self, shop: Shop) -> None:
        """A read-only scope joins a read-write transaction and reads its pending work; writes resume after."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("before"))
            async with uow.transaction(read_only=True):
                assert ["before"] == [sku.code for sku in await uow.skus.list()]
            await uow.skus.add(Sku("after"))
            await uow.commit()
        assert ["after", "before"] == codes(shop)

    async def test_refused_write_in_a_joined_read_only_scope_blocks_the_commit(self, shop: Shop) -> None:
        """A write refused in a read-only scope stays pending, so the read-write owner can no longer commit it."""
        uow = shop.uow()
        with pytest.raises(errors.RollbackOnlyError) as raised:
            async with uow:
                await uow.skus.add(Sku("before"))
                async with uow.transaction(read_only=True):
                    await uow.skus.add(Sku("refused"))
                    with pytest.raises(errors.ReadOnlyError):
                        await uow.skus.count()
                await uow.commit()
        assert isinstance(raised.value.__cause__, errors.ReadOnlyError)
        assert [] == codes(shop)

    async def test_write_left_pending_in_a_read_only_scope_is_refused_when_it_ends(self, shop: Shop) -> None:
        """A new object added in a read-only scope without a query is refused at the scope's end, not committed."""
        uow = shop.uow()
        with pytest.raises(errors.RollbackOnlyError):
            async with uow:
                await uow.skus.add(Sku("before"))
                with pytest.raises(errors.ReadOnlyError):
                    async with uow.transaction(read_only=True):
                        await uow.skus.add(Sku("refused"))
                await uow.commit()
        assert [] == codes(shop)

    async def test_joined_commit_in_a_read_only_transaction_refuses_the_write(self, shop: Shop) -> None:
        """A service that adds and commits inside a read-only transaction gets ReadOnlyError, not a lost write."""
        uow = shop.uow()
        with pytest.raises(errors.RollbackOnlyError):  # the caller swallowed the service's error
            async with uow.transaction(read_only=True):
                with pytest.raises(errors.ReadOnlyError):
                    async with uow:
                        await uow.skus.add(Sku("refused"))
                        await uow.commit()
        assert [] == codes(shop)

    async def test_write_left_pending_in_a_read_only_transaction_is_refused_at_its_end(self, shop: Shop) -> None:
        """A read-only owner that ends with a new object never flushed raises ReadOnlyError instead of dropping it."""
        uow = shop.uow()
        with pytest.raises(errors.ReadOnlyError):
            async with uow.transaction(read_only=True):
                await uow.skus.add(Sku("refused"))
        assert [] == codes(shop)
        assert not uow.active

    async def test_changed_object_in_a_joined_read_only_scope_is_refused(self, shop: Shop) -> None:
        """Changing a loaded object in a read-only scope joined to a read-write one is refused, and never committed."""
        await seed(shop, "a")
        uow = shop.uow()
        with pytest.raises(errors.RollbackOnlyError):
            async with uow:
                sku = await uow.skus.get("a")
                with pytest.raises(errors.ReadOnlyError, match="1 changed"):
                    async with uow.transaction(read_only=True):
                        sku.description = "changed"
                await uow.commit()
        assert [("a", "")] == shop.committed(Sku, "code", "description")

    async def test_read_only_scope_that_changes_nothing_passes(self, shop: Shop) -> None:
        """A read-only scope joined to a read-write one that only reads ends quietly, with collections loaded."""
        uow = shop.uow()
        async with uow:
            await uow.orders.add(Order("o1", [Line("red", 1)]))
            await uow.commit()
        async with uow:
            async with uow.transaction(read_only=True):
                order = await uow.orders.get("o1")
                assert [("red", 1)] == [(line.sku, line.qty) for line in order.lines]
            await uow.skus.add(Sku("after"))
            await uow.commit()
        assert ["after"] == codes(shop)

    async def test_savepoint_inside_a_read_only_transaction(self, shop: Shop) -> None:
        """A savepoint inside a read-only transaction that has read works: reads only, then released."""
        await seed(shop, "a")
        uow = shop.uow()
        async with uow.transaction(read_only=True):
            assert 1 == await uow.skus.count()
            async with uow.savepoint():
                assert ["a"] == [sku.code for sku in await uow.skus.list()]
        assert not uow.active

    async def test_read_write_scope_cannot_join_a_read_only_one(self, shop: Shop) -> None:
        """read_only=False inside a read-only transaction raises JoinedScopeError; None inherits."""
        uow = shop.uow()
        async with uow.transaction(read_only=True):
            with pytest.raises(errors.JoinedScopeError, match="read-only"):
                async with uow.transaction(read_only=False):
                    pass  # pragma: no cover
            async with uow.transaction():
                await uow.skus.add(Sku("refused"))
                with pytest.raises(errors.ReadOnlyError):
                    await uow.skus.count()

    async def test_joined_scope_cannot_change_the_isolation_level(self, shop: Shop) -> None:
        """Only the owner sets the isolation level: a joined scope asking for another one raises."""
        uow = shop.uow()
        async with uow.transaction(isolation_level="SERIALIZABLE"):
            async with uow.transaction(isolation_level="SERIALIZABLE"):
                await uow.skus.add(Sku("same level"))
            with pytest.raises(errors.JoinedScopeError, match="isolation_level"):
                async with uow.transaction(isolation_level="READ UNCOMMITTED"):
                    pass  # pragma: no cover
            await uow.commit()
        assert ["same level"] == codes(shop)
