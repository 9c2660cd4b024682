"""How a unit of work class declares its repositories, and how each implementation builds them.

``repository(Batch)`` on an abstract unit of work declares a slot; each
implementation (SQLAlchemy, the fake, sync or async) builds the declared
repository from its own repository classes, checked when the class is
defined. The slots are typed so that mypy sees ``uow.batches`` as the real
repository type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

from ._repository import _RepositoryBase
from .errors import ConfigurationError, _shown

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._async_unit_of_work import AsyncUnitOfWork
    from ._repository import AsyncRepository, Repository
    from ._unit_of_work import UnitOfWork

__all__ = ["repository"]

T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)


class _Slot:
    """A repository declared on a unit of work class; see :func:`repository`."""

    __slots__ = ("model", "name", "repository_class")

    def __init__(self, model: type[Any], repository_class: type[Any] | None) -> None:
        self.model = model
        self.repository_class = repository_class
        self.name = "<unnamed>"

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    if not TYPE_CHECKING:  # the subclasses declare the precise types

        def __get__(self, instance, owner):
            if instance is None:
                return self
            return instance._repository(self.name)

    def __repr__(self) -> str:
        shown = self.repository_class.__name__ if self.repository_class else "generic"
        return f"repository({self.model.__name__}, {shown})"


class ModelRepository(_Slot, Generic[T]):
    """A generic repository slot: ``Repository[T]`` on a sync, ``AsyncRepository[T]`` on an async unit of work."""

    __slots__ = ()

    if TYPE_CHECKING:

        @overload
        def __get__(self, instance: None, owner: type[Any]) -> Self: ...

        @overload
        def __get__(self, instance: AsyncUnitOfWork, owner: type[Any]) -> AsyncRepository[T]: ...

        @overload
        def __get__(self, instance: UnitOfWork, owner: type[Any]) -> Repository[T]: ...

        def __get__(self, instance: Any, owner: type[Any]) -> Any: ...


class CustomRepository(_Slot, Generic[R_co]):
    """A repository slot of a given repository class."""

    __slots__ = ()

    if TYPE_CHECKING:

        @overload
        def __get__(self, instance: None, owner: type[Any]) -> Self: ...

        @overload
        def __get__(self, instance: _Declarations, owner: type[Any]) -> R_co: ...

        def __get__(self, instance: Any, owner: type[Any]) -> Any: ...


@overload
def repository(model: type[T]) -> ModelRepository[T]: ...


@overload
def repository(model: type[T], repository_class: Callable[..., R_co]) -> CustomRepository[R_co]: ...


def repository(model: type[Any], repository_class: Callable[..., Any] | None = None) -> _Slot:
    """Declare a repository on a unit of work class.

    ``batches = repository(Batch)`` declares a generic repository: a
    :class:`~uow.Repository` on a sync and an :class:`~uow.AsyncRepository`
    on an async unit of work. Each implementation of the unit of work
    provides it without further code.

    ``products = repository(Product, ProductRepository)`` declares one of a
    custom repository class. On the abstract unit of work that class is
    usually an interface (a subclass of ``Repository[Product]`` with extra
    abstract query methods); each implementation names its own subclass
    with the same line, for example
    ``products = repository(Product, SqlAlchemyProductRepository)``.
    """
    if not isinstance(model, type):
        msg = f"repository() takes a mapped class as its first argument, not {_shown(model)}"
        raise ConfigurationError(msg)
    if repository_class is None:
        return ModelRepository(model, None)
    if not (isinstance(repository_class, type) and issubclass(repository_class, _RepositoryBase)):
        msg = (
            f"repository({model.__name__}, {_shown(repository_class)}): the second argument must be "
            "a subclass of uow.Repository or uow.AsyncRepository"
        )
        raise ConfigurationError(msg)
    return CustomRepository(model, repository_class)


class _Declarations:
    """The repositories a unit of work class declares, and the classes that implement them; no state."""

    #: Declared repositories by attribute name, gathered from the whole MRO.
    _slots: ClassVar[dict[str, _Slot]] = {}
    #: The class that implements each declared repository, on concrete classes.
    _implementations: ClassVar[dict[str, type[Any]]] = {}
    #: True on sync, False on async units of work.
    _sync: ClassVar[bool | None] = None
    #: Set by an implementation: repository classes it can build, and its generic one.
    _repository_base: ClassVar[type[Any] | None] = None
    _generic_repository: ClassVar[type[Any] | None] = None
    #: The interface every declared repository must implement.
    _interface: ClassVar[type[Any]] = _RepositoryBase

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        slots: dict[str, _Slot] = {}
        for klass in reversed(cls.__mro__):
            slots.update((name, value) for name, value in vars(klass).items() if isinstance(value, _Slot))
        cls._slots = slots
        for slot in slots.values():
            if slot.repository_class is not None and not issubclass(slot.repository_class, cls._interface):
                msg = (
                    f"{cls.__qualname__}.{slot.name} is a {slot.repository_class.__name__}, which is not "
                    f"a {cls._interface.__name__}: a sync unit of work takes uow.Repository "
                    "subclasses, an async one uow.AsyncRepository subclasses"
                )
                raise ConfigurationError(msg)
        if cls._repository_base is not None:
            cls._implementations = {name: cls._implementation(slot) for name, slot in slots.items()}

    @classmethod
    def _implementation(cls, slot: _Slot) -> type[Any]:
        assert cls._repository_base is not None
        assert cls._generic_repository is not None
        declared = slot.repository_class
        if declared is None or declared is cls._interface:
            return cls._generic_repository
        if issubclass(declared, cls._repository_base):
            return declared
        msg = (
            f"{cls.__qualname__}.{slot.name} is declared as {declared.__name__}, which "
            f"{cls.__qualname__} cannot build: it is not a {cls._repository_base.__name__}. "
            f"Declare the implementation on {cls.__qualname__}: "
            f"{slot.name} = repository({slot.model.__name__}, <a subclass of "
            f"{cls._repository_base.__name__} and {declared.__name__}>)"
        )
        raise ConfigurationError(msg)

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        missing = cls.__abstractmethods__  # type: ignore[attr-defined]  # every unit of work class is an ABC
        if missing:
            raise _abstract(cls, missing)
        return object.__new__(cls)

    def _models(self) -> list[type[Any]]:
        """The mapped classes of the declared repositories."""
        return [slot.model for slot in self._slots.values()]


def _abstract(cls: type[Any], missing: frozenset[str]) -> ConfigurationError:
    """The error for instantiating a unit of work class that has abstract methods left."""
    own = sorted(name for name in missing if not name.startswith("_"))
    if own:
        msg = (
            f"{cls.__qualname__} cannot be instantiated: it leaves these abstract methods without an "
            f"implementation: {', '.join(own)}"
        )
        return ConfigurationError(msg)
    real, fake = (
        ("SqlAlchemyUnitOfWork", "FakeUnitOfWork")
        if cls._sync
        else ("AsyncSqlAlchemyUnitOfWork", "AsyncFakeUnitOfWork")
    )
    name = cls.__qualname__
    msg = (
        f"{name} is abstract: it declares repositories for services to be typed against, and runs no "
        f"transaction itself. Instantiate an implementation of it: `class SqlAlchemy{name}(uow.{real}, {name}): "
        f"pass` for a database, or `class Fake{name}(uow.{fake}, {name}): pass` for unit tests"
    )
    return ConfigurationError(msg)
