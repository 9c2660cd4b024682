"""Which scope a block leaves, and who may enter it: run unchanged against every implementation.

A block leaves the scope it entered, also when a generator that joined the
transaction is still suspended inside its own block; the owner's
``commit()`` is real or raises; closing a generator is not a failure; and an
idle unit of work is claimed by one thread or task at a time. Sync units of
work are driven by sync generators and threads, async ones by async
generators and tasks; committed rows are read back without the unit of work
under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from uow import NEW_UOW, errors, transactional

from .harness import Shop
from .models import Note, Sku
from .transactions import Boom, codes, seed


def sync_names(uow: Any) -> Iterator[str]:
    """Join the caller's block and yield the committed Sku codes, one at a time: a streaming body."""
    with uow:
        for sku in uow.skus.list():
            yield sku.code


async def async_names(uow: Any) -> AsyncIterator[str]:
    """The async twin of :func:`sync_names`."""
    async with uow:
        for sku in await uow.skus.list():
            yield sku.code


def sync_in_savepoint(uow: Any, code: str) -> Iterator[str]:
    """Add *code* in a savepoint, then yield inside it."""
    with uow.savepoint():
        uow.skus.add(Sku(code))
        uow.skus.count()
        yield code
        yield code


async def async_in_savepoint(uow: Any, code: str) -> AsyncIterator[str]:
    """The async twin of :func:`sync_in_savepoint`."""
    async with uow.savepoint():
        await uow.skus.add(Sku(code))
        await uow.skus.count()
        yield code
        yield code


class Entering:
    """A context manager that enters a unit of work in its own ``__enter__``, as wrappers and overrides do."""

    def __init__(self, unit: Any) -> None:
        self.unit = unit

    def __enter__(self) -> Any:
        return self.unit.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self.unit.__exit__(*exc_info)

    async def __aenter__(self) -> Any:
        return await self.unit.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.unit.__aexit__(*exc_info)


class ScopeContract:
    """Blocks leave their own scopes, on every implementation."""

    async def test_owner_commit_is_real_while_a_generator_holds_a_joined_scope(self, shop: Shop) -> None:
        """A generator paused inside its joined block does not turn the owner's commit() into a flush."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:
            async with uow:
                await uow.skus.add(Sku("new"))
                stream = async_names(uow)
                assert "a" == await anext(stream)
                await uow.commit()
                assert (1, True) == (uow.commits, uow.committed)
            await stream.aclose()
        else:
            with uow:
                uow.skus.add(Sku("new"))
                stream = sync_names(uow)
                assert "a" == next(stream)
                uow.commit()
                assert (1, True) == (uow.commits, uow.committed)
            stream.close()
        assert not uow.active
        assert ["a", "b", "new"] == codes(shop)

    async def test_owner_exit_leaves_its_own_scope_and_closes_the_generators(self, shop: Shop) -> None:
        """The owner's exit ends the owner's block, not the paused generator's: the unit of work is idle after it."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:
            async with uow:
                stream = async_names(uow)
                await anext(stream)
            assert not uow.active
            with pytest.raises(errors.InactiveUnitOfWorkError):
                await uow.skus.count()
            await stream.aclose()  # its own exit, now, does nothing
            async with uow:
                await uow.skus.add(Sku("next"))
                await uow.commit()
        else:
            with uow:
                stream = sync_names(uow)
                next(stream)
            assert not uow.active
            with pytest.raises(errors.InactiveUnitOfWorkError):
                uow.skus.count()
            stream.close()
            with uow:
                uow.skus.add(Sku("next"))
                uow.commit()
        assert not uow.active
        assert ["a", "b", "next"] == codes(shop)

    async def test_break_out_of_a_joined_generator_is_not_a_failure(self, shop: Shop) -> None:
        """Leaving a for loop over a joined generator early closes it, and the transaction stays healthy."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:
            async with uow:
                stream = async_names(uow)
                async for code in stream:
                    if code == "a":
                        break
                await stream.aclose()  # an async for does not close it on break
                await uow.skus.add(Sku("after"))
                await uow.commit()
        else:
            with uow:
                for code in sync_names(uow):
                    if code == "a":
                        break
                uow.skus.add(Sku("after"))
                uow.commit()
        assert (1, True) == (uow.commits, uow.committed)
        assert ["a", "after", "b"] == codes(shop)

    async def test_nested_generators_joined_and_closed_early(self, shop: Shop) -> None:
        """A generator that delegates to a joined generator, abandoned midway, leaves the transaction healthy."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:

            async def outer() -> AsyncIterator[str]:
                async with uow:
                    async for code in async_names(uow):
                        yield code.upper()

            async with uow:
                stream = outer()
                assert "A" == await anext(stream)
                await stream.aclose()
                await uow.skus.add(Sku("c"))
                await uow.commit()
        else:

            def outer() -> Iterator[str]:
                with uow:
                    yield from (code.upper() for code in sync_names(uow))

            with uow:
                for code in outer():
                    assert "A" == code
                    break
                uow.skus.add(Sku("c"))
                uow.commit()
        assert ["a", "b", "c"] == codes(shop)

    async def test_closing_a_generator_rolls_back_its_savepoint_only(self, shop: Shop) -> None:
        """A generator closed inside its savepoint block rolls that savepoint back, and nothing else."""
        uow = shop.new()
        if shop.is_async:
            async with uow:
                await uow.skus.add(Sku("outer"))
                stream = async_in_savepoint(uow, "inner")
                await anext(stream)
                await stream.aclose()
                await uow.commit()
        else:
            with uow:
                uow.skus.add(Sku("outer"))
                stream = sync_in_savepoint(uow, "inner")
                next(stream)
                stream.close()
                uow.commit()
        assert ["outer"] == codes(shop)

    async def test_a_paused_generators_savepoint_refuses_the_code_around_it(self, shop: Shop) -> None:
        """While a paused generator holds a savepoint, the code around it gets OwnershipError naming the generator."""
        uow = shop.new()
        if shop.is_async:
            async with uow:
                stream = async_in_savepoint(uow, "inner")
                await anext(stream)
                with pytest.raises(errors.OwnershipError, match="async_in_savepoint"):
                    await uow.skus.add(Sku("outer"))
                with pytest.raises(errors.OwnershipError, match="async_in_savepoint"):
                    await uow.commit()
                assert ["inner"] == [code async for code in stream]  # runs to its end: released
                await uow.skus.add(Sku("outer"))
                await uow.commit()
        else:
            with uow:
                stream = sync_in_savepoint(uow, "inner")
                next(stream)
                with pytest.raises(errors.OwnershipError, match="sync_in_savepoint"):
                    uow.skus.add(Sku("outer"))
                with pytest.raises(errors.OwnershipError, match="sync_in_savepoint"):
                    uow.commit()
                assert ["inner"] == list(stream)
                uow.skus.add(Sku("outer"))
                uow.commit()
        assert ["inner", "outer"] == codes(shop)

    async def test_owner_exit_rolls_back_a_paused_generators_savepoint_first(
        self, shop: Shop, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The owner's exit closes a savepoint a paused generator still holds, rolled back, and logs where it was."""
        uow = shop.new(autocommit=True)
        with caplog.at_level(logging.WARNING, logger="uow"):
            if shop.is_async:
                async with uow:
                    await uow.skus.add(Sku("outer"))
                    await uow.skus.count()
                    stream = async_in_savepoint(uow, "inner")
                    await anext(stream)
                await stream.aclose()
            else:
                with uow:
                    uow.skus.add(Sku("outer"))
                    uow.skus.count()
                    stream = sync_in_savepoint(uow, "inner")
                    next(stream)
                stream.close()
        assert (1, True) == (uow.commits, uow.committed)
        assert ["outer"] == codes(shop)
        assert "in_savepoint" in caplog.text

    async def test_joined_generator_may_finish_inside_a_later_block(self, shop: Shop) -> None:
        """A joined generator that ends inside a savepoint entered after it leaves that savepoint alone."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:
            async with uow:
                stream = async_names(uow)
                await anext(stream)
                async with uow.savepoint():
                    await uow.skus.add(Sku("c"))
                    assert ["b"] == [code async for code in stream]
                await uow.commit()
        else:
            with uow:
                stream = sync_names(uow)
                next(stream)
                with uow.savepoint():
                    uow.skus.add(Sku("c"))
                    assert ["b"] == list(stream)
                uow.commit()
        assert ["a", "b", "c"] == codes(shop)

    async def test_blocks_that_overlap_roll_back_and_raise(self, shop: Shop) -> None:
        """A savepoint left from under a block entered after it raises OwnershipError, and nothing commits."""
        uow = shop.new()
        with pytest.raises(errors.OwnershipError, match="blocks must nest"):
            if shop.is_async:
                async with uow:
                    await uow.skus.add(Sku("outer"))
                    savepoint = uow.savepoint()
                    await savepoint.__aenter__()
                    async with uow:
                        await uow.skus.add(Sku("inner"))
                        await savepoint.__aexit__(None, None, None)
                    await uow.commit()
            else:
                with uow:
                    uow.skus.add(Sku("outer"))
                    savepoint = uow.savepoint()
                    savepoint.__enter__()
                    with uow:
                        uow.skus.add(Sku("inner"))
                        savepoint.__exit__(None, None, None)
                    uow.commit()
        assert [] == codes(shop)
        assert not uow.active

    async def test_generator_owning_its_block_rolls_back_quietly_when_closed(self, shop: Shop) -> None:
        """A generator that owns its block and is closed before commit() rolls back without an error."""
        uow = shop.new(autocommit=True)
        if shop.is_async:

            async def owner() -> AsyncIterator[int]:
                async with uow:
                    await uow.skus.add(Sku("never"))
                    await uow.skus.count()
                    yield 1
                    yield 2

            stream = owner()
            await anext(stream)
            await stream.aclose()
        else:

            def owner() -> Iterator[int]:
                with uow:
                    uow.skus.add(Sku("never"))
                    uow.skus.count()
                    yield 1
                    yield 2

            stream = owner()
            next(stream)
            stream.close()
        assert not uow.active
        assert (0, True) == (uow.commits, uow.rolled_back)
        assert [] == codes(shop)

    async def test_block_object_leaves_its_own_scope(self, shop: Shop) -> None:
        """uow.transaction() holds the scope it entered: its exit closes the generator's scope above it first."""
        await seed(shop, "a")
        uow = shop.new()
        if shop.is_async:
            async with uow.transaction() as unit:
                stream = async_names(unit)
                await anext(stream)
                await unit.skus.add(Sku("b"))
                await unit.commit()
            await stream.aclose()
        else:
            with uow.transaction() as unit:
                stream = sync_names(unit)
                next(stream)
                unit.skus.add(Sku("b"))
                unit.commit()
            stream.close()
        assert not uow.active
        assert ["a", "b"] == codes(shop)

    @pytest.mark.parametrize("entry", ["contextmanager", "exit stack", "overridden __enter__"])
    async def test_owner_commit_is_real_when_the_generator_enters_through_other_code(
        self, shop: Shop, entry: str
    ) -> None:
        """A generator that joins through a context manager, an exit stack or an __enter__ override still pauses."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:

            @contextlib.asynccontextmanager
            async def joined(unit: Any) -> AsyncIterator[Any]:
                async with unit:
                    yield unit

            async def stream() -> AsyncIterator[str]:
                async with contextlib.AsyncExitStack() as stack:
                    if entry == "contextmanager":
                        await stack.enter_async_context(joined(uow))
                    elif entry == "exit stack":
                        await stack.enter_async_context(uow)
                    else:
                        await stack.enter_async_context(Entering(uow))
                    for sku in await uow.skus.list():
                        yield sku.code

            async with uow:
                await uow.skus.add(Sku("new"))
                names = stream()
                await anext(names)
                await uow.commit()
                assert 1 == uow.commits
            await names.aclose()
        else:

            @contextlib.contextmanager
            def joined_sync(unit: Any) -> Iterator[Any]:
                with unit:
                    yield unit

            def stream_sync() -> Iterator[str]:
                with contextlib.ExitStack() as stack:
                    if entry == "contextmanager":
                        stack.enter_context(joined_sync(uow))
                    elif entry == "exit stack":
                        stack.enter_context(uow)
                    else:
                        stack.enter_context(Entering(uow))
                    for sku in uow.skus.list():
                        yield sku.code

            with uow:
                uow.skus.add(Sku("new"))
                names_sync = stream_sync()
                next(names_sync)
                uow.commit()
                assert 1 == uow.commits
            names_sync.close()
        assert not uow.active
        assert ["a", "b", "new"] == codes(shop)

    async def test_a_generator_that_owns_the_block_keeps_the_code_around_it_out(self, shop: Shop) -> None:
        """Code outside a paused generator that owns the block gets OwnershipError, instead of joining it blindly."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:

            async def export() -> AsyncIterator[str]:
                async with uow:
                    for sku in await uow.skus.list():
                        yield sku.code

            stream = export()
            await anext(stream)
            with pytest.raises(errors.OwnershipError, match="export"):
                async with uow:
                    await uow.skus.add(Sku("lost?"))
                    await uow.commit()
            await stream.aclose()
        else:

            def export_sync() -> Iterator[str]:
                with uow:
                    for sku in uow.skus.list():
                        yield sku.code

            stream_sync = export_sync()
            next(stream_sync)
            with pytest.raises(errors.OwnershipError, match="export_sync"), uow:
                uow.skus.add(Sku("lost?"))
                uow.commit()
            stream_sync.close()
        assert not uow.active
        assert ["a", "b"] == codes(shop)

    async def test_a_generator_closed_early_enters_again_without_breaking_the_unit_of_work(self, shop: Shop) -> None:
        """A generator whose block was closed early can open a new one later, and later blocks still commit."""
        uow = shop.new()
        if shop.is_async:

            async def twice() -> AsyncIterator[int]:
                async with uow.transaction():
                    yield 1
                async with uow:
                    await uow.skus.add(Sku("from the generator"))
                    await uow.commit()
                yield 2

            async with uow:
                stream = twice()
                await anext(stream)
            await anext(stream)
            async with uow:
                await uow.skus.add(Sku("after"))
                await uow.commit()
            await stream.aclose()
        else:

            def twice_sync() -> Iterator[int]:
                with uow.transaction():
                    yield 1
                with uow:
                    uow.skus.add(Sku("from the generator"))
                    uow.commit()
                yield 2

            with uow:
                stream_sync = twice_sync()
                next(stream_sync)
            next(stream_sync)
            with uow:
                uow.skus.add(Sku("after"))
                uow.commit()
            stream_sync.close()
        assert not uow.active
        assert not uow._closed_early
        assert ["after", "from the generator"] == codes(shop)

    async def test_a_generator_resumed_after_its_block_was_closed_may_not_use_it(self, shop: Shop) -> None:
        """A generator resumed inside a later block, after its own was closed early, gets OwnershipError."""
        uow = shop.new()
        if shop.is_async:

            async def late() -> AsyncIterator[int]:
                async with uow:
                    yield 1
                    await uow.skus.add(Sku("half"))
                    yield 2

            async with uow:
                stream = late()
                await anext(stream)
            async with uow:
                with pytest.raises(errors.OwnershipError, match="late"):
                    await anext(stream)
                await uow.skus.add(Sku("later block"))
                await uow.commit()
        else:

            def late_sync() -> Iterator[int]:
                with uow:
                    yield 1
                    uow.skus.add(Sku("half"))
                    yield 2

            with uow:
                stream_sync = late_sync()
                next(stream_sync)
            with uow:
                with pytest.raises(errors.OwnershipError, match="late_sync"):
                    next(stream_sync)
                uow.skus.add(Sku("later block"))
                uow.commit()
        assert not uow._closed_early
        assert ["later block"] == codes(shop)

    async def test_owner_exit_rolls_back_a_paused_generators_transaction_of_its_own(
        self, shop: Shop, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A requires_new transaction a paused generator holds is rolled back and closed by the owner's exit."""
        await seed(shop, "a")
        uow = shop.new()
        if shop.is_async:

            async def audit() -> AsyncIterator[int]:
                async with uow.transaction(propagation="requires_new"):
                    await uow.notes.add(Note(text="never committed"))
                    async with uow:  # a joined block inside it guards its session
                        await uow.notes.count()
                    yield 1
                    await uow.commit()

            async with uow:
                assert 1 == await uow.skus.count()
                stream = audit()
                await anext(stream)
            await stream.aclose()
        else:

            def audit_sync() -> Iterator[int]:
                with uow.transaction(propagation="requires_new"):
                    uow.notes.add(Note(text="never committed"))
                    with uow:  # a joined block inside it guards its session
                        uow.notes.count()
                    yield 1
                    uow.commit()

            with uow:
                assert 1 == uow.skus.count()
                stream_sync = audit_sync()
                next(stream_sync)
            stream_sync.close()
        assert not uow.active
        assert [] == shop.committed(Note, "text")
        assert [] == [record.message for record in caplog.records if record.levelno >= logging.ERROR]

    async def test_decorated_call_that_returns_while_its_generator_is_paused(self, shop: Shop) -> None:
        """A decorated call that returns a paused joined generator leaves the owner's commit real."""
        await seed(shop, "a", "b")
        uow = shop.new()
        if shop.is_async:

            @transactional
            async def start(uow: Any = NEW_UOW) -> AsyncIterator[str]:
                stream = async_names(uow)
                await anext(stream)
                return stream

            async with uow:
                await uow.skus.add(Sku("c"))
                stream = await start(uow=uow)
                await uow.commit()
                assert 1 == uow.commits
            await stream.aclose()
        else:

            @transactional
            def start_sync(uow: Any = NEW_UOW) -> Iterator[str]:
                stream = sync_names(uow)
                next(stream)
                return stream

            with uow:
                uow.skus.add(Sku("c"))
                stream_sync = start_sync(uow=uow)
                uow.commit()
                assert 1 == uow.commits
            stream_sync.close()
        assert not uow.active
        assert ["a", "b", "c"] == codes(shop)

    async def test_a_joined_generator_failing_under_a_later_block_makes_the_transaction_rollback_only(
        self, shop: Shop
    ) -> None:
        """A joined generator that raises while a block entered after it runs still poisons its transaction."""
        await seed(shop, "a", "b")
        uow = shop.new()
        with pytest.raises(errors.RollbackOnlyError):
            if shop.is_async:

                async def failing() -> AsyncIterator[str]:
                    async with uow:
                        yield "first"
                        raise Boom("the stream broke")

                async with uow:
                    stream = failing()
                    await anext(stream)
                    with pytest.raises(Boom):
                        async with uow.savepoint():
                            await uow.skus.add(Sku("in the savepoint"))
                            await anext(stream)
                    await uow.commit()
            else:

                def failing_sync() -> Iterator[str]:
                    with uow:
                        yield "first"
                        raise Boom("the stream broke")

                with uow:
                    stream_sync = failing_sync()
                    next(stream_sync)
                    with pytest.raises(Boom), uow.savepoint():
                        uow.skus.add(Sku("in the savepoint"))
                        next(stream_sync)
                    uow.commit()
        assert not uow.active
        assert ["a", "b"] == codes(shop)

    async def test_a_block_entered_twice_at_once_is_refused(self, shop: Shop) -> None:
        """One uow.transaction() block cannot be entered again while it is open; a new call gives a new block."""
        uow = shop.new()
        if shop.is_async:
            block = uow.transaction()
            async with block:
                with pytest.raises(errors.ConfigurationError, match="entered already"):
                    await block.__aenter__()
            async with block:  # once it has ended, it may be entered again
                await uow.skus.add(Sku("again"))
                await uow.commit()
        else:
            block_sync = uow.transaction()
            with block_sync, pytest.raises(errors.ConfigurationError, match="entered already"):
                block_sync.__enter__()
            with block_sync:
                uow.skus.add(Sku("again"))
                uow.commit()
        assert ["again"] == codes(shop)

    async def test_exit_of_an_idle_unit_of_work_raises(self, shop: Shop) -> None:
        """Leaving a block that was never entered raises InactiveUnitOfWorkError instead of ending another one."""
        uow = shop.new()
        with pytest.raises(errors.InactiveUnitOfWorkError, match="no block of it is open"):
            if shop.is_async:
                await uow.__aexit__(None, None, None)
            else:
                uow.__exit__(None, None, None)

    async def test_concurrent_entries_of_one_idle_instance(self, shop: Shop) -> None:
        """Threads (or tasks) entering one idle unit of work either get OwnershipError, or their row is stored.

        Opening the session yields to the others (a short sleep in a thread,
        ``asyncio.sleep(0)`` in a task), so that they arrive while an entry
        is under way: the claim must be taken before that.
        """
        uow = shop.new()
        workers, entries = 8, 40
        stored: list[str] = []
        refused: list[str] = []
        failures: list[BaseException] = []
        open_session = uow._open
        if shop.is_async:

            async def slow_open() -> Any:
                await asyncio.sleep(0)
                return await open_session()

            uow._open = slow_open

            async def enter(worker: int) -> None:
                for entry in range(entries):
                    code = f"{worker}-{entry}"
                    try:
                        async with uow:
                            await uow.skus.add(Sku(code))
                            await uow.commit()
                    except errors.OwnershipError:
                        refused.append(code)
                        await asyncio.sleep(0)
                        continue
                    except BaseException as error:  # kept for the assertion below
                        failures.append(error)
                        return
                    stored.append(code)

            await asyncio.gather(*(enter(worker) for worker in range(workers)))
        else:

            def slow_open() -> Any:
                time.sleep(0.0005)
                return open_session()

            uow._open = slow_open

            def enter(worker: int) -> None:
                for entry in range(entries):
                    code = f"{worker}-{entry}"
                    try:
                        with uow:
                            uow.skus.add(Sku(code))
                            uow.commit()
                    except errors.OwnershipError:
                        refused.append(code)
                        continue
                    except BaseException as error:  # kept for the assertion below
                        failures.append(error)
                        return
                    stored.append(code)

            threads = [threading.Thread(target=enter, args=(worker,)) for worker in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert [] == failures
        assert not uow.active
        assert stored, "no entry got through"
        assert refused, "no entry met another one"
        assert sorted(stored) == codes(shop)

    async def test_two_entries_racing_for_an_idle_instance(self, shop: Shop) -> None:
        """Of two threads (or tasks) that enter an idle unit of work at once, the later one gets OwnershipError.

        The first one opens its session slowly, until the second one has
        arrived. Before the claim was atomic, both got in and shared one stack
        of scopes: the second one's work was stored, and the first one, which
        entered first, was refused halfway through its block.
        """
        uow = shop.new()
        outcome: dict[str, str] = {}
        open_session = uow._open
        if shop.is_async:
            opening, arrived, added, first_done = (asyncio.Event() for _ in range(4))

            async def slow_open() -> Any:
                if asyncio.current_task() is first:
                    opening.set()
                    await asyncio.wait_for(arrived.wait(), 5)
                    await asyncio.sleep(0.05)  # the second one opens its session first
                else:
                    arrived.set()
                return await open_session()

            uow._open = slow_open

            async def run(code: str, *, second: bool) -> None:
                try:
                    if second:
                        await asyncio.wait_for(opening.wait(), 5)
                    async with uow:
                        if second:
                            await uow.skus.add(Sku(code))
                            added.set()
                            await asyncio.wait_for(first_done.wait(), 5)
                        else:
                            await asyncio.wait_for(added.wait(), 5)
                            await uow.skus.add(Sku(code))
                        await uow.commit()
                except errors.OwnershipError:
                    outcome[code] = "refused"
                except Exception as error:  # kept for the assertion below
                    outcome[code] = repr(error)
                else:
                    outcome[code] = "stored"
                finally:
                    arrived.set()
                    added.set()
                    if not second:
                        first_done.set()

            first = asyncio.create_task(run("first", second=False))
            await asyncio.gather(first, run("second", second=True))
        else:
            opening_t, arrived_t, added_t, first_done_t = (threading.Event() for _ in range(4))

            def slow_open_sync() -> Any:
                if threading.current_thread().name == "first":
                    opening_t.set()
                    arrived_t.wait(5)
                    time.sleep(0.05)  # the second one opens its session first
                else:
                    arrived_t.set()
                return open_session()

            uow._open = slow_open_sync

            def run_sync(code: str, *, second: bool) -> None:
                try:
                    if second:
                        opening_t.wait(5)
                    with uow:
                        if second:
                            uow.skus.add(Sku(code))
                            added_t.set()
                            first_done_t.wait(5)
                        else:
                            added_t.wait(5)
                            uow.skus.add(Sku(code))
                        uow.commit()
                except errors.OwnershipError:
                    outcome[code] = "refused"
                except BaseException as error:  # kept for the assertion below
                    outcome[code] = repr(error)
                else:
                    outcome[code] = "stored"
                finally:
                    arrived_t.set()
                    added_t.set()
                    if not second:
                        first_done_t.set()

            threads = [
                threading.Thread(target=run_sync, args=("first",), kwargs={"second": False}, name="first"),
                threading.Thread(target=run_sync, args=("second",), kwargs={"second": True}, name="second"),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert {"first": "stored", "second": "refused"} == outcome
        assert ["first"] == codes(shop)
        assert not uow.active


class AsyncScopeContract:
    """Timeouts around commit(), rollback() and blocks of async units of work."""

    async def test_wait_for_around_commit_and_rollback(self, async_shop: Shop) -> None:
        """asyncio.wait_for() around commit() and rollback() works, whatever task it runs them in."""
        uow = async_shop.new()
        async with uow:
            await uow.skus.add(Sku("dropped"))
            await asyncio.wait_for(uow.rollback(), 5)
            await uow.skus.add(Sku("kept"))
            await asyncio.wait_for(uow.commit(), 5)
            assert 1 == uow.commits
        assert ["kept"] == codes(async_shop)

    async def test_wait_for_around_a_joined_block(self, async_shop: Shop) -> None:
        """A service that joins the caller's block can run under asyncio.wait_for(), and its work commits once."""
        uow = async_shop.new()

        async def service() -> None:
            async with uow:
                await uow.skus.add(Sku("joined"))
                await uow.commit()

        async with uow:
            await asyncio.wait_for(service(), 5)
            assert 0 == uow.commits
            await uow.commit()
        assert ["joined"] == codes(async_shop)

    async def test_timeout_around_commit_and_block(self, async_shop: Shop) -> None:
        """asyncio.timeout() around a block and its commit() works, and a timeout rolls the block back."""
        uow = async_shop.new()
        async with asyncio.timeout(5):
            async with uow:
                await uow.skus.add(Sku("in time"))
                async with asyncio.timeout(5):
                    await uow.commit()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                async with uow:
                    await uow.skus.add(Sku("too late"))
                    await uow.skus.count()
                    await asyncio.sleep(5)
                    await uow.commit()
        assert not uow.active
        assert ["in time"] == codes(async_shop)

    async def test_wait_for_timeout_inside_a_block_rolls_back(self, async_shop: Shop) -> None:
        """A joined service cut off by asyncio.wait_for() makes the caller's block fail, and nothing commits."""
        uow = async_shop.new()

        async def slow_service() -> None:
            async with uow:
                await uow.skus.add(Sku("slow"))
                await uow.skus.count()
                await asyncio.sleep(5)

        with pytest.raises(errors.RollbackOnlyError):
            async with uow:
                await uow.skus.add(Sku("caller"))
                with contextlib.suppress(TimeoutError):  # swallowed: the joined scope failed
                    await asyncio.wait_for(slow_service(), 0.05)
                await uow.commit()
        assert not uow.active
        assert [] == codes(async_shop)

    async def test_wait_for_inside_a_generators_block_cannot_commit_the_owner(self, async_shop: Shop) -> None:
        """A joined commit() under wait_for() in a generator's block raises, instead of committing the owner's work."""
        uow = async_shop.new()

        async def stream() -> AsyncIterator[int]:
            async with uow:
                await uow.skus.add(Sku("from the generator"))
                await asyncio.wait_for(uow.commit(), 5)
                yield 1

        with pytest.raises(errors.OwnershipError, match="asyncio.timeout"):
            async with uow:
                await uow.skus.add(Sku("owner"))
                async for _ in stream():
                    pass
                await uow.commit()
        assert not uow.active
        assert [] == codes(async_shop)

    async def test_cancelled_while_closing_a_paused_generators_savepoint(self, async_shop: Shop) -> None:
        """A task cancelled while its block closes a paused generator's savepoint still ends its block."""
        uow = async_shop.new()
        started = asyncio.Event()

        async def request() -> None:
            async with uow:
                await uow.skus.add(Sku("a"))
                await uow.skus.count()
                stream = async_in_savepoint(uow, "inner")
                await anext(stream)
                started.set()
                await asyncio.sleep(5)

        task = asyncio.create_task(request())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not uow.active
        async with uow:  # the claim was given back
            await uow.skus.add(Sku("next"))
            await uow.commit()
        assert ["next"] == codes(async_shop)

    async def test_other_tasks_still_refused(self, async_shop: Shop) -> None:
        """A task that the owner does not wait for through wait_for() gets OwnershipError, as before."""
        uow = async_shop.new()

        async def elsewhere() -> int:
            return int(await uow.skus.count())

        async with uow:
            task = asyncio.create_task(elsewhere())
            await asyncio.wait({task})
            with pytest.raises(errors.OwnershipError):
                task.result()
            with pytest.raises(errors.OwnershipError):
                await asyncio.gather(elsewhere(), elsewhere())
        assert not uow.active


__all__ = ["AsyncScopeContract", "Boom", "ScopeContract"]
