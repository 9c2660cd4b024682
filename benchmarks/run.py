"""Benchmarks: what uow costs on top of SQLAlchemy, next to the usual alternatives.

Run from the repository root::

    python benchmarks/run.py            # full run, a few minutes
    python benchmarks/run.py --quick    # under a minute, rougher numbers
    python benchmarks/run.py --profile  # also profile uow against raw SQLAlchemy on SQLite in memory

A *service call* gets a product by primary key, decrements its stock, adds an
order line and commits. Every variant runs that call in the same process, in
interleaved rounds (each round times a batch of every variant, in a rotating
order), and the table reports the median microseconds per call and the ratio
to raw SQLAlchemy (``sessionmaker.begin()``) on the same backend. See
README.md next to this file for what each variant is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import importlib.metadata
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, create_engine, func, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, registry, sessionmaker
from sqlalchemy.pool import StaticPool

import uow

POSTGRESQL_URL = os.environ.get("UOW_BENCH_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ASYNCPG_URL = os.environ.get("UOW_BENCH_ASYNCPG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PRODUCTS = 100
INITIAL_STOCK = 10**9


# --- The model, mapped imperatively -------------------------------------------------------------


@attrs.define(eq=False, slots=False)
class Product:
    name: str
    stock: int
    id: int | None = None


@attrs.define(eq=False, slots=False)
class OrderLine:
    product_id: int
    qty: int
    id: int | None = None


metadata = MetaData()
products_table = Table(
    "products",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
    Column("stock", Integer, nullable=False),
)
order_lines_table = Table(
    "order_lines",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("product_id", ForeignKey("products.id"), nullable=False),
    Column("qty", Integer, nullable=False),
)
mapper_registry = registry(metadata=metadata)
mapper_registry.map_imperatively(Product, products_table)
mapper_registry.map_imperatively(OrderLine, order_lines_table)


@attrs.define(eq=False, slots=False)
class Entry:
    """A row of the catalog that the page benchmark lists."""

    name: str
    price: int
    id: int | None = None


entries_table = Table(
    "catalog_entries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
    Column("price", Integer, nullable=False),
)
mapper_registry.map_imperatively(Entry, entries_table)


class ShopUnitOfWork(uow.UnitOfWork):
    products = uow.repository(Product)
    order_lines = uow.repository(OrderLine)


class SqlAlchemyShopUnitOfWork(uow.SqlAlchemyUnitOfWork, ShopUnitOfWork):
    pass


class FakeShopUnitOfWork(uow.FakeUnitOfWork, ShopUnitOfWork):
    pass


class CatalogUnitOfWork(uow.SqlAlchemyUnitOfWork):
    entries = uow.repository(Entry)


class AsyncShopUnitOfWork(uow.AsyncUnitOfWork):
    products = uow.repository(Product)
    order_lines = uow.repository(OrderLine)


class AsyncSqlAlchemyShopUnitOfWork(uow.AsyncSqlAlchemyUnitOfWork, AsyncShopUnitOfWork):
    pass


# --- The service, once per variant --------------------------------------------------------------


def place_order(unit: ShopUnitOfWork, product_id: int) -> None:
    """The service as a uow user writes it."""
    with unit:
        product = unit.products.get(product_id)
        product.stock -= 1
        unit.order_lines.add(OrderLine(product_id, 1))
        unit.commit()


async def place_order_async(unit: AsyncShopUnitOfWork, product_id: int) -> None:
    async with unit:
        product = await unit.products.get(product_id)
        product.stock -= 1
        await unit.order_lines.add(OrderLine(product_id, 1))
        await unit.commit()


class CosmicUnitOfWork:
    """A hand-rolled unit of work in the style of *Architecture Patterns with Python*."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def __enter__(self) -> CosmicUnitOfWork:
        self.session = self.session_factory()
        self.products = CosmicRepository(self.session, Product)
        self.order_lines = CosmicRepository(self.session, OrderLine)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.rollback()
        self.session.close()

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()


class CosmicRepository:
    def __init__(self, session: Session, model: type[Any]) -> None:
        self.session = session
        self.model = model

    def add(self, obj: Any) -> None:
        self.session.add(obj)

    def get(self, key: Any) -> Any:
        return self.session.get(self.model, key)


def provide_session(func: Callable[..., Any]) -> Callable[..., Any]:
    """An Airflow-style decorator: inject a session when none is given, commit and close it after."""

    @functools.wraps(func)
    def wrapper(*args: Any, session: Session | None = None, **kwargs: Any) -> Any:
        if session is not None:
            return func(*args, session=session, **kwargs)
        session = wrapper.session_factory()  # type: ignore[attr-defined]
        try:
            result = func(*args, session=session, **kwargs)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
        return result

    return wrapper


SELECT_STOCK = text("SELECT stock FROM products WHERE id = :id")
UPDATE_STOCK = text("UPDATE products SET stock = :stock WHERE id = :id")
INSERT_LINE = text("INSERT INTO order_lines (product_id, qty) VALUES (:product_id, :qty)")


def sync_variants(engine: Engine) -> dict[str, Callable[[int], None]]:
    """The sync variants, each a function of a product id that runs one service call."""
    factory = sessionmaker(engine, expire_on_commit=False)
    shared = SqlAlchemyShopUnitOfWork(factory)

    def uow_repository(product_id: int) -> None:
        place_order(shared, product_id)

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(factory))
    def uow_decorator(product_id: int, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        product = uow.products.get(product_id)
        product.stock -= 1
        uow.order_lines.add(OrderLine(product_id, 1))

    def raw(product_id: int) -> None:
        with factory.begin() as session:
            product = session.get(Product, product_id)
            product.stock -= 1
            session.add(OrderLine(product_id, 1))

    cosmic = CosmicUnitOfWork(factory)

    def cosmic_uow(product_id: int) -> None:
        with cosmic:
            product = cosmic.products.get(product_id)
            product.stock -= 1
            cosmic.order_lines.add(OrderLine(product_id, 1))
            cosmic.commit()

    @provide_session
    def airflow(product_id: int, session: Session) -> None:
        product = session.get(Product, product_id)
        product.stock -= 1
        session.add(OrderLine(product_id, 1))

    airflow.session_factory = factory  # type: ignore[attr-defined]

    def core_text(product_id: int) -> None:
        with engine.begin() as connection:
            stock = connection.execute(SELECT_STOCK, {"id": product_id}).scalar_one()
            connection.execute(UPDATE_STOCK, {"stock": stock - 1, "id": product_id})
            connection.execute(INSERT_LINE, {"product_id": product_id, "qty": 1})

    variants = {
        "uow (repository)": uow_repository,
        "uow (@transactional)": uow_decorator,
        "raw SQLAlchemy": raw,
        "cosmicpython UoW": cosmic_uow,
        "provide_session": airflow,
    }
    advanced = advanced_alchemy_variant(factory)
    if advanced is not None:
        variants["advanced-alchemy"] = advanced
    variants["core text()"] = core_text
    return variants


def advanced_alchemy_variant(factory: sessionmaker[Session]) -> Callable[[int], None] | None:
    """advanced-alchemy's repository, when it is installed (a benchmark-only dependency)."""
    try:
        from advanced_alchemy.repository import SQLAlchemySyncRepository
    except ImportError:
        return None

    class ProductRepository(SQLAlchemySyncRepository[Product]):  # type: ignore[type-var]
        model_type = Product

    class OrderLineRepository(SQLAlchemySyncRepository[OrderLine]):  # type: ignore[type-var]
        model_type = OrderLine

    def advanced(product_id: int) -> None:
        with factory.begin() as session:
            products = ProductRepository(session=session, auto_expunge=False, auto_commit=False)
            lines = OrderLineRepository(session=session, auto_expunge=False, auto_commit=False)
            product = products.get(product_id)
            product.stock -= 1
            lines.add(OrderLine(product_id, 1), auto_refresh=False)

    return advanced


def async_variants(engine: AsyncEngine) -> dict[str, Callable[[int], Awaitable[None]]]:
    factory = async_sessionmaker(engine, expire_on_commit=False)
    shared = AsyncSqlAlchemyShopUnitOfWork(factory)

    async def uow_repository(product_id: int) -> None:
        await place_order_async(shared, product_id)

    async def raw(product_id: int) -> None:
        async with factory.begin() as session:
            product = await session.get(Product, product_id)
            product.stock -= 1
            session.add(OrderLine(product_id, 1))

    async def core_text(product_id: int) -> None:
        async with engine.begin() as connection:
            stock = (await connection.execute(SELECT_STOCK, {"id": product_id})).scalar_one()
            await connection.execute(UPDATE_STOCK, {"stock": stock - 1, "id": product_id})
            await connection.execute(INSERT_LINE, {"product_id": product_id, "qty": 1})

    return {"uow (repository)": uow_repository, "raw SQLAlchemy": raw, "core text()": core_text}


# --- Timing -------------------------------------------------------------------------------------


@attrs.define
class Plan:
    rounds: int
    batch_seconds: float


def _ids() -> Iterator[int]:
    while True:
        yield from range(1, PRODUCTS + 1)


def interleaved(names: list[str], rounds: int) -> Iterator[str]:
    """Each name once per round, each round starting one further along, so that no variant always runs first."""
    for round_ in range(rounds):
        yield from names[round_ % len(names) :] + names[: round_ % len(names)]


def calibrate(call: Callable[[int], None], plan: Plan, ids: Iterator[int]) -> int:
    """Calls per batch, so that one batch of *call* takes about ``plan.batch_seconds``."""
    n, elapsed = 1, 0.0
    while elapsed < plan.batch_seconds / 4:
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            call(next(ids))
        elapsed = time.perf_counter() - start
    return max(1, int(n * plan.batch_seconds / elapsed))


def measure(variants: dict[str, Callable[[int], None]], plan: Plan, reference: str) -> dict[str, float]:
    """Median microseconds per call of each variant, over interleaved rounds."""
    return {name: statistics.median(values) for name, values in sample(variants, plan, reference).items()}


def sample(variants: dict[str, Callable[[int], None]], plan: Plan, reference: str) -> dict[str, list[float]]:
    """Microseconds per call of each variant in each of the interleaved rounds, in round order."""
    ids = _ids()
    for call in variants.values():  # warm up: caches, compiled statements, the pool
        for _ in range(20):
            call(next(ids))
    n = calibrate(variants[reference], plan, ids)
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in interleaved(names, plan.rounds):
        call = variants[name]
        start = time.perf_counter()
        for _ in range(n):
            call(next(ids))
        samples[name].append((time.perf_counter() - start) / n * 1e6)
    return samples


async def measure_async(
    variants: dict[str, Callable[[int], Awaitable[None]]], plan: Plan, reference: str
) -> dict[str, float]:
    ids = _ids()
    for call in variants.values():
        for _ in range(20):
            await call(next(ids))
    n, elapsed = 1, 0.0
    while elapsed < plan.batch_seconds / 4:
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            await variants[reference](next(ids))
        elapsed = time.perf_counter() - start
    n = max(1, int(n * plan.batch_seconds / elapsed))
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in interleaved(names, plan.rounds):
        call = variants[name]
        start = time.perf_counter()
        for _ in range(n):
            await call(next(ids))
        samples[name].append((time.perf_counter() - start) / n * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


# --- Backends: a fresh schema for each run ------------------------------------------------------


def seed(engine: Engine) -> None:
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            products_table.insert(), [{"name": f"p{i}", "stock": INITIAL_STOCK} for i in range(1, PRODUCTS + 1)]
        )


@contextlib.contextmanager
def sqlite_memory() -> Iterator[Engine]:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    seed(engine)
    yield engine
    engine.dispose()


@contextlib.contextmanager
def sqlite_file() -> Iterator[Engine]:
    with tempfile.TemporaryDirectory() as directory:
        engine = create_engine(f"sqlite:///{directory}/bench.db")
        seed(engine)
        yield engine
        engine.dispose()


@contextlib.contextmanager
def postgresql_schema(url: str) -> Iterator[str]:
    """A schema created for this run, dropped at its end; yields its name."""
    name = f"uow_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield name
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def postgresql(schema: str) -> Iterator[Engine]:
    engine = create_engine(POSTGRESQL_URL, connect_args={"options": f"-csearch_path={schema}"})
    seed(engine)
    yield engine
    engine.dispose()


def unreachable(url: str) -> str | None:
    """Why *url* cannot be used, or None."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


async def run_async(url: str, plan: Plan, connect_args: dict[str, Any] | None = None) -> dict[str, float]:
    kwargs: dict[str, Any] = {"connect_args": connect_args or {}}
    if url.startswith("sqlite"):
        kwargs["poolclass"] = StaticPool
    engine = create_async_engine(url, **kwargs)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.execute(
            products_table.insert(), [{"name": f"p{i}", "stock": INITIAL_STOCK} for i in range(1, PRODUCTS + 1)]
        )
    try:
        return await measure_async(async_variants(engine), plan, "raw SQLAlchemy")
    finally:
        await engine.dispose()


# --- The targets that are not a table row -------------------------------------------------------


def measure_join(plan: Plan) -> tuple[float, float, float]:
    """Per-call µs of a plain no-op, a @transactional no-op joining the active unit of work
    (found, not passed) and one that is passed the unit of work."""

    def plain(uow: Any = None) -> None:
        return None

    @uow.transactional
    def decorated(uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        return None

    unit = FakeShopUnitOfWork()
    n = 20_000 if plan.rounds < 10 else 100_000
    samples: dict[str, list[float]] = {"plain": [], "found": [], "passed": []}
    with unit:
        for _ in range(plan.rounds):
            for name, call in (
                ("plain", lambda: plain(uow=unit)),
                ("found", decorated),
                ("passed", lambda: decorated(uow=unit)),
            ):
                start = time.perf_counter()
                for _ in range(n):
                    call()
                samples[name].append((time.perf_counter() - start) / n * 1e6)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return medians["plain"], medians["found"], medians["passed"]


def measure_otel(plan: Plan) -> dict[str, float]:
    """Per-call µs of the service call on SQLite in memory: raw, uow, and uow with OpenTelemetry on.

    OpenTelemetry is on for the batches of the last variant only: the SDK's tracer provider with a batch
    processor and an exporter that drops the spans, and a meter provider with a reader, as an application
    that exports would have them.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        from uow.otel import UowInstrumentor
    except ImportError:
        return {}

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Dropped()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = UowInstrumentor()
    with sqlite_memory() as engine:
        variants = sync_variants(engine)
        repository, raw = variants["uow (repository)"], variants["raw SQLAlchemy"]

        state = {"on": False}

        def switched(on: bool, call: Callable[[int], None]) -> Callable[[int], None]:
            def run_one(product_id: int) -> None:
                if on is not state["on"]:  # switched once per batch: the batches of a round alternate
                    if on:
                        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
                    else:
                        instrumentor.uninstrument()
                    state["on"] = on
                call(product_id)

            return run_one

        try:
            medians = measure(
                {
                    "raw SQLAlchemy": switched(False, raw),
                    "uow, OpenTelemetry off": switched(False, repository),
                    "uow, OpenTelemetry on": switched(True, repository),
                },
                plan,
                "raw SQLAlchemy",
            )
        finally:
            if state["on"]:
                instrumentor.uninstrument()
            tracer_provider.shutdown()
            meter_provider.shutdown()
    return medians


def fake_unit_test() -> None:
    """A unit test of the service on the fake: a fresh unit of work, one product, one call, one check."""
    fake = FakeShopUnitOfWork()
    with fake:
        fake.products.add(Product("lamp", 10, id=1))
        fake.commit()
    place_order(fake, 1)
    with fake:
        assert fake.products.get(1).stock == 9


def sqlite_unit_test() -> None:
    """The same test on SQLite in memory: a fresh database, as a per-test fixture builds it."""
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    real = SqlAlchemyShopUnitOfWork(engine)
    with real:
        real.products.add(Product("lamp", 10, id=1))
        real.commit()
    place_order(real, 1)
    with real:
        assert real.products.get(1).stock == 9
    engine.dispose()


def measure_fake(plan: Plan) -> tuple[float, float]:
    """Per-test µs of the same unit test on FakeUnitOfWork and on uow over SQLite in memory."""
    medians = measure({"fake": lambda _: fake_unit_test(), "sqlite": lambda _: sqlite_unit_test()}, plan, "sqlite")
    return medians["fake"], medians["sqlite"]


#: The rows a fake holds in the two runs of the size measurement.
FAKE_SIZES = (10, 10_000)


def measure_fake_size(plan: Plan) -> dict[int, float]:
    """Per-call µs of the service call on a fake that holds 10 products and on one that holds 10,000."""

    def filled(size: int) -> FakeShopUnitOfWork:
        fake = FakeShopUnitOfWork()
        with fake:
            fake.products.add_all([Product(f"p{n}", INITIAL_STOCK, id=n) for n in range(1, size + 1)])
            fake.commit()
        return fake

    fakes = {size: filled(size) for size in FAKE_SIZES}
    medians = measure(
        {f"{size} rows": functools.partial(_call_on, fakes[size]) for size in FAKE_SIZES}, plan, f"{FAKE_SIZES[0]} rows"
    )
    return {size: medians[f"{size} rows"] for size in FAKE_SIZES}


def _call_on(fake: FakeShopUnitOfWork, product_id: int) -> None:
    place_order(fake, product_id % FAKE_SIZES[0] + 1)


def profile_sqlite_memory(calls: int) -> None:
    """Print where uow spends time that raw SQLAlchemy does not, on SQLite in memory."""
    with sqlite_memory() as engine:
        variants = sync_variants(engine)
        for name in ("raw SQLAlchemy", "uow (repository)"):
            call = variants[name]
            for pid in range(1, 101):
                call(pid)
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(calls):
                call(i % PRODUCTS + 1)
            profiler.disable()
            stats = pstats.Stats(profiler)
            total = stats.total_tt  # type: ignore[attr-defined]
            print(f"\n{name}: {total / calls * 1e6:.1f} µs per call under the profiler")
            if name.startswith("uow"):
                rows = [
                    (tt, nc, func)
                    for func, (_, nc, tt, _, _) in stats.stats.items()  # type: ignore[attr-defined]
                    if f"{os.sep}uow{os.sep}" in func[0]
                ]
                rows.sort(reverse=True)
                own = sum(tt for tt, _, _ in rows)
                print(f"  time in uow's own functions: {own / calls * 1e6:.1f} µs per call ({own / total:.1%})")
                print("  top uow functions by tottime (µs per service call, calls per service call):")
                for tt, nc, (filename, line, function) in rows[:12]:
                    where = f"uow/{os.path.basename(filename)}:{line}"
                    print(f"    {tt / calls * 1e6:7.2f} µs  {nc / calls:5.1f}x  {function}  ({where})")


# --- The bulk path and threads on PostgreSQL -------------------------------------------------------

BULK_ROWS = 10_000


def measure_bulk(engine: Engine, plan: Plan) -> dict[str, float]:
    """Median milliseconds to insert and commit BULK_ROWS order lines, each way, in interleaved rounds.

    Each way starts from its natural input, built before the clock starts: a
    list of dicts for SQL statements, a list of mapped objects for the
    repository and the session.
    """
    factory = sessionmaker(engine, expire_on_commit=False)
    unit = SqlAlchemyShopUnitOfWork(factory)

    def dicts() -> list[dict[str, int]]:
        return [{"product_id": i % PRODUCTS + 1, "qty": i % 7 + 1} for i in range(BULK_ROWS)]

    def objects() -> list[OrderLine]:
        return [OrderLine(i % PRODUCTS + 1, i % 7 + 1) for i in range(BULK_ROWS)]

    def core(rows: Any) -> None:
        with engine.begin() as connection:
            connection.execute(order_lines_table.insert(), rows)

    def uow_bulk(objs: Any) -> None:
        with unit:
            unit.order_lines.add_all(objs, bulk=True)
            unit.commit()

    def uow_add_all(objs: Any) -> None:
        with unit:
            unit.order_lines.add_all(objs)
            unit.commit()

    def orm_insert(rows: Any) -> None:
        with factory.begin() as session:
            session.execute(insert(OrderLine), rows)

    def orm_add_all(objs: Any) -> None:
        with factory.begin() as session:
            session.add_all(objs)

    variants: dict[str, tuple[Callable[[Any], None], Callable[[], Any]]] = {
        "core insert() executemany": (core, dicts),
        "uow add_all(bulk=True)": (uow_bulk, objects),
        "ORM insert(Model), dicts": (orm_insert, dicts),
        "uow add_all()": (uow_add_all, objects),
        "ORM add_all() + flush": (orm_add_all, objects),
    }
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for call, make in variants.values():
        call(make())
    for name in interleaved(names, max(3, plan.rounds // 3)):
        call, make = variants[name]
        with engine.begin() as connection:
            connection.execute(order_lines_table.delete())
        given = make()
        start = time.perf_counter()
        call(given)
        samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


THREADS = (1, 2, 4, 8)


def measure_threads(engine: Engine, plan: Plan) -> dict[int, dict[str, float]]:
    """Service calls per second with 1, 2, 4 and 8 threads, uow and raw, each thread on its own products."""
    variants = sync_variants(engine)
    seconds = plan.batch_seconds * 1.2  # many short, interleaved samples: the median resists a passing disturbance

    def run(call: Callable[[int], None], threads: int) -> float:
        barrier = threading.Barrier(threads + 1)
        done = [0] * threads
        stop = threading.Event()

        def worker(n: int) -> None:
            ids = [pid for pid in range(1, PRODUCTS + 1) if pid % threads == n]
            barrier.wait()
            count = 0
            while not stop.is_set():
                call(ids[count % len(ids)])
                count += 1
            done[n] = count

        pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for thread in pool:
            thread.join()
        return sum(done) / (time.perf_counter() - start)

    results: dict[int, dict[str, float]] = {}
    names = ["raw SQLAlchemy", "uow (repository)", "uow (@transactional)"]
    for threads in THREADS:
        samples: dict[str, list[float]] = {name: [] for name in names}
        for name in interleaved(names, plan.rounds):
            call = variants[name]
            if name == "uow (repository)":  # one unit of work per thread, as a worker holds its own
                local = threading.local()

                def call(pid: int, local: threading.local = local) -> None:
                    unit = getattr(local, "unit", None)
                    if unit is None:
                        unit = local.unit = SqlAlchemyShopUnitOfWork(sessionmaker(engine, expire_on_commit=False))
                    place_order(unit, pid)

            samples[name].append(run(call, threads))
        results[threads] = {name: statistics.median(values) for name, values in samples.items()}
    return results


# --- Output -------------------------------------------------------------------------------------


def print_table(results: dict[str, dict[str, float]]) -> None:
    print(f"\n{'backend':<18} {'variant':<22} {'µs/call':>10} {'x raw':>7}")
    for backend, medians in results.items():
        raw = medians["raw SQLAlchemy"]
        for variant, value in medians.items():
            print(f"{backend:<18} {variant:<22} {value:>10.1f} {value / raw:>7.3f}")
        print()


#: The rows of the catalog, and the size and start of the page the page benchmark lists.
PAGE_ROWS, PAGE_SIZE, PAGE_OFFSET = 10_000, 20, 200


def measure_page(engine: Engine, plan: Plan) -> dict[str, float]:
    """Per-call µs of a 20-row page with its total over 10,000 rows: uow's page() against select() plus count().

    ``"ratio"`` is the median of the rounds' ratios, each of a page() batch to the select() + count() batch
    beside it: the server's speed drifts by more than the difference over a run, and a round's two batches
    share its moment. The rounds are twice the plan's, since this is one figure with a target of its own.
    """
    with engine.begin() as connection:
        connection.execute(entries_table.delete())
        connection.execute(
            entries_table.insert(), [{"name": f"entry {i:05}", "price": i % 97} for i in range(PAGE_ROWS)]
        )
        connection.execute(text("ANALYZE catalog_entries"))
    factory = sessionmaker(engine)
    unit = CatalogUnitOfWork(engine)

    def raw(_: int) -> None:
        # As a hand-written repository method does it: the statements are built in the call, from its arguments.
        with factory() as session:
            cheap = entries_table.c.price < 50
            stmt = select(Entry).where(cheap).order_by(entries_table.c.name, entries_table.c.id)
            items = session.scalars(stmt.limit(PAGE_SIZE).offset(PAGE_OFFSET)).all()
            total = session.scalar(select(func.count()).select_from(Entry).where(cheap))
        assert len(items) == PAGE_SIZE
        assert total

    def paged(_: int) -> None:
        with unit:
            cheap = entries_table.c.price < 50
            page = unit.entries.page(cheap, order_by=entries_table.c.name, limit=PAGE_SIZE, offset=PAGE_OFFSET)
        assert len(page.items) == PAGE_SIZE
        assert page.total

    rounds = sample(
        {"select() + count()": raw, "uow page()": paged},
        Plan(plan.rounds * 2, plan.batch_seconds),
        "select() + count()",
    )
    reference, value = rounds["select() + count()"], rounds["uow page()"]
    return {
        "select() + count()": statistics.median(reference),
        "uow page()": statistics.median(value),
        "ratio": statistics.median(ours / theirs for ours, theirs in zip(value, reference, strict=True)),
    }


def print_postgresql_extras(bulk: dict[str, float], threads: dict[int, dict[str, float]]) -> None:
    """The bulk-insert table and the thread-scaling table, with their targets."""
    if bulk:
        core = bulk["core insert() executemany"]
        print(f"\n{BULK_ROWS:,} rows on PostgreSQL       {'ms':>8} {'x core':>7}")
        for variant, value in bulk.items():
            print(f"{variant:<28} {value:>8.1f} {value / core:>7.2f}")
        ratio = bulk["uow add_all(bulk=True)"] / core
        print(f"  target: bulk ≤ 1.2x core insert(): {ratio:.2f}x  {verdict(ratio <= 1.2)}")
    if threads:
        header = ("threads", "raw calls/s", "uow calls/s", "x raw", "@transactional", "x raw")
        print("\n{:<8} {:>12} {:>12} {:>6} {:>15} {:>6}".format(*header))
        worst = 1e9
        for count, rates in threads.items():
            raw, unit = rates["raw SQLAlchemy"], rates["uow (repository)"]
            decorated = rates["uow (@transactional)"]
            worst = min(worst, unit / raw, decorated / raw)
            row = (count, raw, unit, unit / raw, decorated, decorated / raw)
            print("{:<8} {:>12.0f} {:>12.0f} {:>6.3f} {:>15.0f} {:>6.3f}".format(*row))
        print(f"  target: throughput ≥ 0.95x raw at 1-8 threads: worst {worst:.3f}x  {verdict(worst >= 0.95)}")


def print_outbox(
    cost: dict[str, float], rates: dict[tuple[str, int], float], missing: dict[str, str], latency: dict[str, float]
) -> None:
    """The outbox's figures on PostgreSQL, with their targets."""
    if cost:
        print(
            f"\nservice call with one event through the outbox: {cost['with one event']:.0f} µs, without "
            f"{cost['without']:.0f} µs\n  target: ≤ 1.10x (median of the rounds' ratios): {cost['ratio']:.3f}x  "
            f"{verdict(cost['ratio'] <= 1.10)}"
        )
    if rates:
        print("\nrelay throughput, messages/s (5,000 messages over 100 keys, PostgreSQL outbox)")
        print(f"{'broker':<22} {'1 relay':>10} {'4 relays':>10}  target")
        for name in dict.fromkeys(broker for broker, _ in rates):
            one, four = rates.get((name, 1), 0.0), rates.get((name, 4), 0.0)
            target = 2000 if name.startswith("RabbitMQ") else 5000
            print(f"{name:<22} {one:>10.0f} {four:>10.0f}  ≥ {target:,}/s: {verdict(min(one, four) >= target)}")
    for name, reason in missing.items():
        print(f"  {name}: not measured ({reason})")
    if latency:
        notify = "on" if latency["listening"] else "off"
        print(
            f"\ncommit to Redis at a steady 200 messages/s, PostgreSQL NOTIFY {notify}: "
            f"p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms, {latency['lost']:.0f} not delivered\n"
            f"  target: p99 ≤ 50 ms: {verdict(latency['p99'] <= 50 and not latency['lost'])}"
        )


def print_markdown(
    results: dict[str, dict[str, float]], bulk: dict[str, float], threads: dict[int, dict[str, float]]
) -> None:
    """The same tables as Markdown, for the docs' Performance page."""
    backends = list(results)
    variants = list(dict.fromkeys(v for medians in results.values() for v in medians))
    print("\n| Variant | " + " | ".join(backends) + " |")
    print("| --- |" + " ---: |" * len(backends))
    for variant in variants:
        cells = []
        for backend in backends:
            medians = results[backend]
            value = medians.get(variant)
            cells.append("" if value is None else f"{value:.0f} µs ({value / medians['raw SQLAlchemy']:.3f}x)")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    if bulk:
        core = bulk["core insert() executemany"]
        print(f"\n| {BULK_ROWS:,} rows | ms | x core |\n| --- | ---: | ---: |")
        for variant, value in bulk.items():
            print(f"| {variant} | {value:.1f} | {value / core:.2f} |")
    if threads:
        print("\n| Threads | raw SQLAlchemy | uow (repository) | uow (@transactional) |\n| ---: | ---: | ---: | ---: |")
        for count, rates in threads.items():
            raw = rates["raw SQLAlchemy"]
            unit, decorated = rates["uow (repository)"], rates["uow (@transactional)"]
            shown = (f"{unit:.0f}/s ({unit / raw:.3f}x)", f"{decorated:.0f}/s ({decorated / raw:.3f}x)")
            print(f"| {count} | {raw:.0f}/s | {shown[0]} | {shown[1]} |")


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def write_chart(
    results: dict[str, dict[str, float]], bulk: dict[str, float], threads: dict[int, dict[str, float]], path: str
) -> None:
    """A PNG of the ratios: the service call per backend, the bulk insert, and throughput per thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart skipped: matplotlib not installed (bash scripts/bench.sh installs it)")
        return
    extras = bool(bulk) + bool(threads)
    fig = plt.figure(figsize=(12, 9 if extras else 5))
    grid = fig.add_gridspec(2 if extras else 1, max(extras, 1))
    ax = fig.add_subplot(grid[0, :])
    variants = list(dict.fromkeys(v for medians in results.values() for v in medians))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, medians in enumerate(results.values()):
            if variant in medians:
                xs.append(j + i * width)
                ys.append(medians[variant] / medians["raw SQLAlchemy"])
        ax.bar(xs, ys, width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], list(results))
    ax.set_ylabel("time per call / raw SQLAlchemy")
    ax.set_title("Service call: get, decrement, add a line, commit (lower is better)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    column = 0
    if bulk:
        ax = fig.add_subplot(grid[1, column])
        column += 1
        core = bulk["core insert() executemany"]
        names = list(bulk)
        ax.barh(names[::-1], [bulk[name] / core for name in names[::-1]], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.2, color="tab:red", linewidth=0.8, linestyle="--", label="target 1.2x")
        ax.set_xlabel("time / core insert()")
        ax.set_title(f"{BULK_ROWS:,} rows, PostgreSQL (lower is better)")
        ax.legend(fontsize="small")
    if threads:
        ax = fig.add_subplot(grid[1, column])
        counts = list(threads)
        for name in ("uow (repository)", "uow (@transactional)"):
            ax.plot(counts, [threads[n][name] / threads[n]["raw SQLAlchemy"] for n in counts], marker="o", label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.95, color="tab:red", linewidth=0.8, linestyle="--", label="target 0.95x")
        ax.set_xticks(counts)
        ax.set_ylim(0.8, 1.2)
        ax.set_xlabel("threads")
        ax.set_ylabel("calls per second / raw SQLAlchemy")
        ax.set_title("Threads, PostgreSQL (higher is better)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart written to {path}")


def describe_machine() -> str:
    """What the numbers were measured on: the CPU, Python, SQLAlchemy and the drivers."""
    import platform

    import sqlalchemy

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        if names:
            cpu = names[0]
    versions = [f"Python {platform.python_version()}", f"SQLAlchemy {sqlalchemy.__version__}"]
    for distribution in ("psycopg", "asyncpg", "aiosqlite", "advanced-alchemy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{distribution} {importlib.metadata.version(distribution)}")
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; " + ", ".join(versions)


def postgresql_version(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar_one())
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds: under a minute")
    parser.add_argument("--profile", action="store_true", help="profile uow against raw SQLAlchemy on SQLite in memory")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument("--chart", default=os.path.join(os.path.dirname(__file__), "ratios.png"), help="PNG to write")
    args = parser.parse_args(argv)
    plan = Plan(rounds=5, batch_seconds=0.05) if args.quick else Plan(rounds=15, batch_seconds=0.25)
    began = time.perf_counter()
    print(f"machine: {describe_machine()}")

    results: dict[str, dict[str, float]] = {}
    bulk: dict[str, float] = {}
    paging: dict[str, float] = {}
    publish_cost: dict[str, float] = {}
    relay_rates: dict[tuple[str, int], float] = {}
    relay_missing: dict[str, str] = {}
    latency: dict[str, float] = {}
    threads: dict[int, dict[str, float]] = {}
    for backend, make in (("SQLite memory", sqlite_memory), ("SQLite file", sqlite_file)):
        with make() as engine:
            results[backend] = measure(sync_variants(engine), plan, "raw SQLAlchemy")
        print(f"{backend}: done", file=sys.stderr)

    reason = unreachable(POSTGRESQL_URL)
    if reason is None:
        print(f"PostgreSQL {postgresql_version(POSTGRESQL_URL)}")
        with postgresql_schema(POSTGRESQL_URL) as schema:
            with postgresql(schema) as engine:
                results["PostgreSQL"] = measure(sync_variants(engine), plan, "raw SQLAlchemy")
                print("PostgreSQL: done", file=sys.stderr)
                bulk = measure_bulk(engine, plan)
                print("PostgreSQL bulk: done", file=sys.stderr)
                threads = measure_threads(engine, plan)
                print("PostgreSQL threads: done", file=sys.stderr)
                paging = measure_page(engine, plan)
                print("PostgreSQL page: done", file=sys.stderr)
                import outbox as outbox_bench  # beside this file; imports this module as `run`

                publish_cost = outbox_bench.measure_publish_cost(engine, plan)
                print("PostgreSQL outbox: done", file=sys.stderr)
                relay_rates, relay_missing, latency = outbox_bench.measure_relay(engine, schema)
                print("relay: done", file=sys.stderr)
            results["async aiosqlite"] = asyncio.run(run_async("sqlite+aiosqlite://", plan))
            print("async aiosqlite: done", file=sys.stderr)
            results["async asyncpg"] = asyncio.run(
                run_async(ASYNCPG_URL, plan, {"server_settings": {"search_path": schema}})
            )
            print("async asyncpg: done", file=sys.stderr)
    else:
        print(f"PostgreSQL skipped: {reason}")
        results["async aiosqlite"] = asyncio.run(run_async("sqlite+aiosqlite://", plan))

    plain, found, passed = measure_join(plan)
    otel = measure_otel(plan)
    fake, sqlite = measure_fake(plan)
    sizes = measure_fake_size(plan)

    print_table(results)
    if "advanced-alchemy" not in results["SQLite memory"]:
        print("advanced-alchemy: not measured (not installed)\n")
    memory = results["SQLite memory"]
    ratio = memory["uow (repository)"] / memory["raw SQLAlchemy"]
    print("targets:")
    print(f"  uow ≤ 1.03x raw on SQLite memory:      {ratio:.3f}x  {'met' if ratio <= 1.03 else 'missed'}")
    for backend in ("async aiosqlite", "async asyncpg"):
        if backend in results:
            r = results[backend]["uow (repository)"] / results[backend]["raw SQLAlchemy"]
            print(f"  uow ≤ 1.05x raw, {backend:<20} {r:.3f}x  {'met' if r <= 1.05 else 'missed'}")
    for label, value in (("found", found), ("passed", passed)):
        extra = value - plain
        print(
            f"  join ≤ 1 µs ({label:<6}):                 +{extra:.2f} µs "
            f"({value:.2f} vs {plain:.2f} plain)  {'met' if extra <= 1 else 'missed'}"
        )
    speedup = sqlite / fake
    print(
        f"  fake ≥ 50x faster than SQLite memory (one unit test):  {speedup:.1f}x "
        f"({fake:.1f} vs {sqlite:.1f} µs)  {'met' if speedup >= 50 else 'missed'}"
    )
    small, large = sizes[FAKE_SIZES[0]], sizes[FAKE_SIZES[-1]]
    growth = large / small
    print(
        f"  fake with {FAKE_SIZES[-1]:,} rows ≤ 1.5x fake with {FAKE_SIZES[0]} (one service call):  {growth:.2f}x "
        f"({large:.1f} vs {small:.1f} µs)  {'met' if growth <= 1.5 else 'missed'}"
    )
    if otel:
        raw, off, on = otel["raw SQLAlchemy"], otel["uow, OpenTelemetry off"], otel["uow, OpenTelemetry on"]
        print(
            f"  OpenTelemetry on SQLite memory: uow/raw {off / raw:.3f}x off, {on / raw:.3f}x on; "
            f"+{on - off:.1f} µs per transaction on ({raw:.1f} µs raw)"
        )
    else:
        print("  OpenTelemetry: not measured (the SDK is not installed)")
    print_postgresql_extras(bulk, threads)
    if paging:
        reference, value, ratio = paging["select() + count()"], paging["uow page()"], paging["ratio"]
        print(
            f"\n{PAGE_SIZE}-row page with its total over {PAGE_ROWS:,} rows on PostgreSQL: uow page() {value:.0f} µs, "
            f"select() + count() {reference:.0f} µs\n  target: page() ≤ 1.05x (median of the rounds' ratios): "
            f"{ratio:.3f}x  {verdict(ratio <= 1.05)}"
        )
    print_outbox(publish_cost, relay_rates, relay_missing, latency)
    if args.markdown:
        print_markdown(results, bulk, threads)
    write_chart(results, bulk, threads, args.chart)
    if args.profile:
        profile_sqlite_memory(500 if args.quick else 3000)
    print(f"\ntotal time: {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
