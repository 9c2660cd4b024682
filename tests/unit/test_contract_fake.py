"""The contract suite on the in-memory fakes: no database involved."""

from __future__ import annotations

import pytest

from tests.support.contract import Contract
from tests.support.harness import Shop, fake_shop
from tests.support.models import Pair, Sku
from tests.support.outbox import InboxContract, OutboxContract
from tests.support.queries import QueryContract
from tests.support.scopes import AsyncScopeContract, ScopeContract
from tests.support.transactions import TransactionContract
from tests.support.uows import AsyncFakeShopUnitOfWork, FakeShopUnitOfWork


@pytest.fixture(name="shop", params=["sync", "async"])
def _shop(request: pytest.FixtureRequest) -> Shop:
    if request.param == "sync":
        return fake_shop(FakeShopUnitOfWork, is_async=False)
    return fake_shop(AsyncFakeShopUnitOfWork, is_async=True)


class TestFake(Contract):
    """The fakes keep the contract."""


class TestFakeTransactions(TransactionContract):
    """The fakes follow the transaction rules."""


@pytest.fixture(name="async_shop")
def _async_shop() -> Shop:
    return fake_shop(AsyncFakeShopUnitOfWork, is_async=True)


class TestFakeScopes(ScopeContract):
    """The fakes' blocks leave their own scopes, and one thread or task at a time enters them."""


class TestAsyncFakeScopes(AsyncScopeContract):
    """Timeouts work around the async fake's commit, rollback and blocks."""


class TestFakeQueries(QueryContract):
    """The fakes answer queries as the databases do."""


def test_fake_records_the_rows_a_service_locked() -> None:
    """FakeUnitOfWork.locked names each row locked with for_update=True, by class and key, with its lock."""
    fake = FakeShopUnitOfWork()
    with fake:
        fake.skus.add_all([Sku("a"), Sku("b")])
        fake.pairs.add(Pair("x", 1))
        fake.commit()
    with fake:
        fake.skus.get("a", for_update=True)
        fake.skus.list(Sku.code == "b", for_update=True, nowait=True)  # type: ignore[arg-type]
        fake.pairs.get(("x", 1), for_update=True, skip_locked=True)
        fake.skus.get("zz", for_update=True)
    assert {(Sku, "a"): "update", (Sku, "b"): "nowait", (Pair, ("x", 1)): "skip_locked"} == fake.locked


class TestFakeOutbox(OutboxContract):
    """The fakes publish what the databases would commit to the outbox."""


class TestFakeInbox(InboxContract):
    """The fakes record handled messages as the databases do."""
