"""The imperative mapping of the allocation domain."""

from __future__ import annotations

from sqlalchemy import inspect

from allocation import orm
from allocation.domain import Batch, OrderLine, Product
from allocation.unit_of_work import FakeAllocationUnitOfWork


def test_start_mappers_is_idempotent() -> None:
    """Calling start_mappers() again keeps the one mapper of each domain class."""
    orm.start_mappers()
    mappers = [inspect(cls) for cls in (Product, Batch, OrderLine)]

    orm.start_mappers()

    assert mappers == [inspect(cls) for cls in (Product, Batch, OrderLine)]
    assert 4 == len({mapper.class_ for mapper in orm.mapper_registry.mappers})  # with the read model's view


def test_product_version_number_is_the_version_counter_kept_by_the_domain() -> None:
    """Product is mapped with version_number as its version column and no generator of SQLAlchemy's."""
    orm.start_mappers()
    mapper = inspect(Product)

    assert orm.products.c.version_number is mapper.version_id_col
    assert mapper.version_id_generator is False


def test_products_loaded_by_the_fake_have_events() -> None:
    """A product read back in a later block has an empty events list of its own."""
    uow = FakeAllocationUnitOfWork()
    with uow:
        uow.products.add(Product("SKU", [Batch("b1", "SKU", 10, None)]))
        uow.commit()

    with uow:
        product = uow.products.get_by_batchref("b1")
        assert product is not None
        assert [] == product.events
        assert uow.products.get_by_batchref("b2") is None
