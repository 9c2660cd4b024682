"""Declaring units of work and repositories: what is accepted and what is refused early."""

from __future__ import annotations

import abc

import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import uow
from tests.support.models import Item, Sku
from tests.support.uows import (
    AsyncFakeShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    FakeShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import errors


class SkuRepository(uow.Repository[Sku]):
    @abc.abstractmethod
    def in_stock(self) -> list[Sku]: ...


class InMemorySkuRepository(uow.InMemoryRepository[Sku], SkuRepository):
    def in_stock(self) -> list[Sku]:
        return [sku for sku in self.list() if sku.stock > 0]


class CatalogueUnitOfWork(uow.UnitOfWork):
    skus = uow.repository(Sku, SkuRepository)


def test_public_names_are_exported() -> None:
    """uow.__all__ lists exactly the public names, sorted, and each exists; integration modules load on demand."""
    integrations = {"brokers", "fastapi", "flask", "litestar", "otel", "pytest_plugin", "relay", "starlette"}
    public = sorted(
        # "@py_..." names: pytest rewrites the asserts of uow's modules, since uow ships a pytest plugin.
        name
        for name in dir(uow)
        if not name.startswith(("_", "@")) and name not in {"annotations", *integrations}
    )
    assert sorted(uow.__all__) == uow.__all__
    assert public == uow.__all__


def test_every_error_derives_from_the_base() -> None:
    """Every exception in uow.errors derives from UowError."""
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type):
            assert issubclass(value, errors.UowError)
        else:
            assert "is_retryable" == name


def test_abstract_unit_of_work_cannot_be_built() -> None:
    """The declaration alone is abstract: it has no session to open."""
    with pytest.raises(TypeError, match="abstract"):
        ShopUnitOfWork()  # type: ignore[abstract]


def test_custom_interface_needs_an_implementation() -> None:
    """A variant that cannot build a declared custom repository fails at class definition."""
    with pytest.raises(errors.ConfigurationError, match=r"skus = repository\(Sku, <a subclass of InMemoryRepository"):

        class Broken(uow.FakeUnitOfWork, CatalogueUnitOfWork):
            pass


def test_custom_repository_is_used_by_its_variant() -> None:
    """A variant naming its implementation gets that class, with the extra query."""

    class FakeCatalogue(uow.FakeUnitOfWork, CatalogueUnitOfWork):
        skus = uow.repository(Sku, InMemorySkuRepository)

    fake = FakeCatalogue()
    with fake:
        fake.skus.add_all([Sku("a", stock=0), Sku("b", stock=2)])
        assert ["b"] == [sku.code for sku in fake.skus.in_stock()]
        assert isinstance(fake.skus, InMemorySkuRepository)


def test_the_interface_itself_means_the_generic_repository() -> None:
    """Declaring uow.Repository as the class is the same as the generic form."""

    class Plain(uow.FakeUnitOfWork):
        items = uow.repository(Item, uow.Repository)

    plain = Plain()
    with plain:
        assert type(plain.items) is uow.InMemoryRepository


def test_repository_class_must_be_a_repository() -> None:
    """repository() refuses a second argument that is not a repository class."""
    with pytest.raises(errors.ConfigurationError, match="must be a subclass of uow.Repository"):
        uow.repository(Sku, dict)


def test_repository_model_must_be_a_class() -> None:
    """repository() refuses a model that is not a class."""
    with pytest.raises(errors.ConfigurationError, match="mapped class"):
        uow.repository("Sku")  # type: ignore[call-overload]


def test_async_repository_on_a_sync_uow_is_refused() -> None:
    """A sync unit of work cannot declare an async repository class, and the reverse."""
    with pytest.raises(errors.ConfigurationError, match="sync unit of work takes uow.Repository"):

        class Mixed(uow.UnitOfWork):
            skus = uow.repository(Sku, uow.AsyncInMemoryRepository)

    with pytest.raises(errors.ConfigurationError, match="async one uow.AsyncRepository"):

        class MixedAsync(uow.AsyncUnitOfWork):
            skus = uow.repository(Sku, uow.InMemoryRepository)


def test_unmapped_model_is_refused_on_first_use() -> None:
    """A repository for a class that is not mapped raises ConfigurationError when first used."""

    class NotMapped:
        pass

    class Odd(uow.FakeUnitOfWork):
        things = uow.repository(NotMapped)

    odd = Odd()
    with odd, pytest.raises(errors.ConfigurationError, match="not a mapped class"):
        odd.things
    assert not odd.active


def test_sync_uow_refuses_async_factories() -> None:
    """SqlAlchemyUnitOfWork refuses an AsyncEngine or async_sessionmaker, and non-callables."""
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        with pytest.raises(errors.ConfigurationError, match="use AsyncSqlAlchemyUnitOfWork"):
            SqlAlchemyShopUnitOfWork(engine)  # type: ignore[arg-type]
        with pytest.raises(errors.ConfigurationError, match="use AsyncSqlAlchemyUnitOfWork"):
            SqlAlchemyShopUnitOfWork(async_sessionmaker(engine))  # type: ignore[arg-type]
    finally:
        engine.sync_engine.dispose()
    with pytest.raises(errors.ConfigurationError, match="takes an Engine or a session factory"):
        SqlAlchemyShopUnitOfWork("sqlite://")  # type: ignore[arg-type]


def test_async_uow_refuses_sync_factories() -> None:
    """AsyncSqlAlchemyUnitOfWork refuses a sync Engine or sessionmaker, and non-callables."""
    engine = create_engine("sqlite://")
    try:
        with pytest.raises(errors.ConfigurationError, match="use SqlAlchemyUnitOfWork"):
            AsyncSqlAlchemyShopUnitOfWork(engine)  # type: ignore[arg-type]
        with pytest.raises(errors.ConfigurationError, match="use SqlAlchemyUnitOfWork"):
            AsyncSqlAlchemyShopUnitOfWork(sessionmaker(engine))  # type: ignore[arg-type]
    finally:
        engine.dispose()
    with pytest.raises(errors.ConfigurationError, match="takes an AsyncEngine"):
        AsyncSqlAlchemyShopUnitOfWork(42)  # type: ignore[arg-type]


def test_factory_must_return_a_session() -> None:
    """A factory returning something else than a Session raises ConfigurationError on entry."""
    unit = SqlAlchemyShopUnitOfWork(lambda: "not a session")  # type: ignore[arg-type,return-value]
    with pytest.raises(errors.ConfigurationError, match="not a sqlalchemy.orm.Session"), unit:
        pass  # pragma: no cover
    assert not unit.active


async def test_async_factory_must_return_an_async_session() -> None:
    """An async factory returning something else than an AsyncSession raises on entry."""
    unit = AsyncSqlAlchemyShopUnitOfWork(lambda: "nope")  # type: ignore[arg-type,return-value]
    with pytest.raises(errors.ConfigurationError, match="not a sqlalchemy.ext.asyncio.AsyncSession"):
        async with unit:
            pass  # pragma: no cover


def test_slot_and_repository_reprs() -> None:
    """Declarations and repositories describe themselves."""
    assert "repository(Sku, SkuRepository)" == repr(CatalogueUnitOfWork.skus)
    assert "repository(Item, generic)" == repr(ShopUnitOfWork.items)
    fake = FakeShopUnitOfWork()
    with fake:
        repo = fake.items
        assert "<InMemoryRepository of Item, open>" == repr(repo)
    assert "<InMemoryRepository of Item, closed>" == repr(repo)


def test_fakes_share_nothing_between_instances() -> None:
    """Two fake units of work have separate in-memory databases."""
    first, second = FakeShopUnitOfWork(), AsyncFakeShopUnitOfWork()
    with first:
        first.skus.add(Sku("a"))
        first.commit()
    assert first.database is not second.database
    assert [] == second.database.rows(Sku)


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("postgresql://app:hunter2@db/shop", "'postgresql://app:***@db/shop'"),
        ("app:hunter2@db", "a str of 14 characters"),
        (b"mysql://app:hunter2@db/shop", "'mysql://app:***@db/shop'"),
    ],
)
def test_a_url_given_instead_of_an_engine_is_shown_without_its_password(given: object, shown: str) -> None:
    """A URL (or URL-like string) passed where an engine belongs appears in the error with no password."""
    with pytest.raises(errors.ConfigurationError) as raised:
        SqlAlchemyShopUnitOfWork(given)  # type: ignore[arg-type]
    assert "hunter2" not in str(raised.value)
    assert shown in str(raised.value)
