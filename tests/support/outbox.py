"""The outbox contract: messages are written by the owner's real commit only, the same on every implementation.

Run by the fakes' and the databases' contract modules; the committed outbox is
read back without the unit of work under test.
"""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from uow import errors

from .harness import Shop
from .models import Item, Sku


class Boom(Exception):
    pass


class OutboxContract:
    """What publish() and routed domain events do, on every implementation."""

    async def test_a_message_is_written_by_the_owners_commit_with_its_key_and_headers(self, shop: Shop) -> None:
        """publish() writes nothing until the owner commits; then the message, as given, is in the outbox."""
        uow = shop.uow()
        async with uow:
            sent = uow.publish("orders.placed", {"order": 7, "lines": ["a"]}, key="order-7", headers={"by": "test"})
            assert [] == shop.messages()
            await uow.commit()
        assert [("orders.placed", "order-7", {"order": 7, "lines": ["a"]}, {"by": "test"})] == shop.messages()
        assert (32, "orders.placed") == (len(sent.id), sent.topic)

    async def test_messages_keep_the_order_they_were_published_in(self, shop: Shop) -> None:
        """Messages of one commit, and of commits one after another, are stored in publishing order."""
        uow = shop.uow()
        async with uow:
            for number in range(3):
                uow.publish("counted", number, key="k")
            await uow.commit()
            uow.publish("counted", 3, key="k")
            await uow.commit()
        assert [0, 1, 2, 3] == [payload for _, _, payload, _ in shop.messages()]

    async def test_a_rollback_drops_the_messages_of_the_work_it_discards(self, shop: Shop) -> None:
        """An exception out of the block, or an explicit rollback(), writes none of the messages before it."""
        uow = shop.uow()
        with pytest.raises(Boom):
            async with uow:
                uow.publish("lost", 1)
                raise Boom
        async with uow:
            uow.publish("lost", 2)
            await uow.rollback()
            uow.publish("kept", 3)
            await uow.commit()
        assert [("kept", None, 3, {})] == shop.messages()

    async def test_a_savepoint_that_rolls_back_drops_its_own_messages(self, shop: Shop) -> None:
        """Messages published inside a savepoint that rolls back are dropped; the others are committed."""
        uow = shop.uow()
        async with uow:
            uow.publish("before", 1)
            with pytest.raises(Boom):
                async with uow.savepoint():
                    uow.publish("inside", 2)
                    raise Boom
            async with uow.savepoint():
                uow.publish("released", 3)
            await uow.commit()
        assert ["before", "released"] == [topic for topic, _, _, _ in shop.messages()]

    async def test_a_joined_scope_publishes_with_its_owner(self, shop: Shop) -> None:
        """A joined scope's message is written by the owner's commit, and dropped when the owner rolls back."""
        uow = shop.uow()
        async with uow:
            async with uow.transaction():
                uow.publish("joined", 1)
                await uow.commit()  # records that the joined work is done; the owner commits it
            assert [] == shop.messages()
            await uow.commit()
        with pytest.raises(Boom):
            async with uow:
                async with uow.transaction():
                    uow.publish("joined", 2)
                raise Boom
        assert [("joined", None, 1, {})] == shop.messages()

    async def test_domain_events_are_routed_to_the_outbox_in_the_same_commit(self, shop: Shop) -> None:
        """An aggregate's event that the outbox routes is written with its data, and still collected after it."""
        uow = shop.uow()
        async with uow:
            item = Item("lamp", 2)
            item.events.append({"topic": "items.added", "payload": {"name": "lamp"}, "key": "lamp"})
            item.events.append("not routed")
            await uow.items.add(item)
            await uow.commit()
        assert [("items.added", "lamp", {"name": "lamp"}, {})] == shop.messages()
        assert [{"topic": "items.added", "payload": {"name": "lamp"}, "key": "lamp"}, "not routed"] == list(
            uow.collect_new_events()
        )
        assert [("lamp", 2)] == shop.committed(Item, "name", "qty")

    async def test_a_failed_commit_writes_no_message(self, shop: Shop) -> None:
        """A commit that fails on a constraint writes neither the rows nor the messages."""
        uow = shop.uow()
        async with uow:
            await uow.skus.add(Sku("a"))
            await uow.commit()
        with pytest.raises(IntegrityError):
            async with uow:
                await uow.skus.add(Sku("a"))
                uow.publish("never", 1)
                await uow.commit()
        assert [] == shop.messages()

    async def test_publish_refuses_bad_messages_and_read_only_work(self, shop: Shop) -> None:
        """A bad topic, key, headers or payload raise OutboxError; a read-only block ReadOnlyError; none is written."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.OutboxError, match="topic"):
                uow.publish("", 1)
            with pytest.raises(errors.OutboxError, match="str"):
                uow.publish("t", 1, key=7)  # type: ignore[arg-type]
            with pytest.raises(errors.OutboxError, match="headers"):
                uow.publish("t", 1, headers={"n": 1})  # type: ignore[dict-item]
            with pytest.raises(errors.OutboxError, match="cannot be serialized"):
                uow.publish("t", object())
            await uow.commit()
        with pytest.raises(errors.InactiveUnitOfWorkError):
            uow.publish("t", 1)
        reader = shop.uow(read_only=True)
        async with reader:
            with pytest.raises(errors.ReadOnlyError):
                reader.publish("t", 1)
        assert [] == shop.messages()

    async def test_a_new_transaction_inside_commits_its_messages_on_its_own(self, shop: Shop) -> None:
        """A requires_new transaction's messages are committed with it, even if the outer block rolls back."""
        uow = shop.uow()
        with pytest.raises(Boom):
            async with uow:
                uow.publish("outer", 1)
                async with uow.transaction(propagation="requires_new"):
                    uow.publish("inner", 2)
                    await uow.commit()
                raise Boom
        assert [("inner", None, 2, {})] == shop.messages()


async def handle(shop: Shop, message_id: str, name: str, *, consumer: str = "default", fail: bool = False) -> bool:
    """A consumer's handler: record the message, add an item for it unless it was handled, commit or fail."""
    uow = shop.uow()
    async with uow:
        if not await uow.receive(message_id, consumer=consumer):
            return False
        await uow.items.add(Item(name))
        if fail:
            raise Boom
        await uow.commit()
    return True


class InboxContract:
    """What receive() does, on every implementation: each message's work is done once per consumer."""

    async def test_a_message_delivered_again_is_handled_once(self, shop: Shop) -> None:
        """receive() says True the first time and False once that work committed; the work happens once."""
        assert await handle(shop, "m1", "first")
        assert not await handle(shop, "m1", "again")
        assert await handle(shop, "m2", "second")
        assert [("first",), ("second",)] == shop.committed(Item, "name")

    async def test_a_receipt_rolls_back_with_the_work(self, shop: Shop) -> None:
        """A handler that fails leaves no receipt, so the message is handled when it comes again."""
        with pytest.raises(Boom):
            await handle(shop, "m1", "failed", fail=True)
        assert await handle(shop, "m1", "retried")
        assert [("retried",)] == shop.committed(Item, "name")

    async def test_each_consumer_handles_a_message_once(self, shop: Shop) -> None:
        """Two consumers of one message each handle it once."""
        assert await handle(shop, "m1", "billing", consumer="billing")
        assert await handle(shop, "m1", "shipping", consumer="shipping")
        assert not await handle(shop, "m1", "billing again", consumer="billing")
        assert [("billing",), ("shipping",)] == shop.committed(Item, "name")

    async def test_a_receipt_in_a_savepoint_that_rolls_back_is_dropped(self, shop: Shop) -> None:
        """receive() inside a savepoint that rolls back leaves no receipt; a later receive() says True."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(Boom):
                async with uow.savepoint():
                    assert await uow.receive("m1")
                    raise Boom
            assert await uow.receive("m1")
            assert not await uow.receive("m1")  # within one transaction, too
            await uow.commit()
        assert not await handle(shop, "m1", "again")

    async def test_receive_refuses_bad_ids_read_only_work_and_no_block(self, shop: Shop) -> None:
        """An empty or overlong id or consumer raises OutboxError; a read-only block ReadOnlyError; outside one."""
        uow = shop.uow()
        async with uow:
            with pytest.raises(errors.OutboxError, match="message_id"):
                await uow.receive("")
            with pytest.raises(errors.OutboxError, match="consumer"):
                await uow.receive("m1", consumer="x" * 256)
        with pytest.raises(errors.InactiveUnitOfWorkError):
            await uow.receive("m1")
        reader = shop.uow(read_only=True)
        async with reader:
            with pytest.raises(errors.ReadOnlyError):
                await reader.receive("m1")
        assert await handle(shop, "m1", "first")
