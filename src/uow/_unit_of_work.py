"""The abstract units of work, sync and async, and how repositories are declared.

``_UnitOfWorkCore`` holds the state machine and does no I/O. The sync and the
async twin each add only the ``with`` / ``async with`` protocol and the
``commit()`` / ``rollback()`` methods, which call the protected hooks that an
implementation fills (``_open``, ``_commit``, ``_rollback``, ``_close``).
"""

from __future__ import annotations

import abc
import logging
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

from ._repository import AsyncRepository, Repository, _RepositoryBase
from .errors import ActiveUnitOfWorkError, ConfigurationError, InactiveUnitOfWorkError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncUnitOfWork", "UnitOfWork", "repository"]

log = logging.getLogger("uow")

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
        def __get__(self, instance: _UnitOfWorkCore, owner: type[Any]) -> R_co: ...

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
        msg = f"repository() takes a mapped class as its first argument, not {model!r}"
        raise ConfigurationError(msg)
    if repository_class is None:
        return ModelRepository(model, None)
    if not (isinstance(repository_class, type) and issubclass(repository_class, _RepositoryBase)):
        msg = (
            f"repository({model.__name__}, {repository_class!r}): the second argument must be "
            "a subclass of uow.Repository or uow.AsyncRepository"
        )
        raise ConfigurationError(msg)
    return CustomRepository(model, repository_class)


class _UnitOfWorkCore:
    """State shared by the sync and async units of work; does no I/O."""

    #: Declared repositories by attribute name, gathered from the whole MRO.
    _slots: ClassVar[dict[str, _Slot]] = {}
    #: The class that implements each declared repository, on concrete classes.
    _implementations: ClassVar[dict[str, type[Any]]] = {}
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

    def __init__(self, *, autocommit: bool = False) -> None:
        #: Commit on a clean exit from the block instead of rolling back.
        self.autocommit = autocommit
        #: Whether the current or latest block committed.
        self.committed = False
        #: Whether the latest block ended by rolling back uncommitted work.
        self.rolled_back = False
        #: Real commits over the life of this object.
        self.commits = 0
        #: Rollbacks of uncommitted work over the life of this object.
        self.rollbacks = 0
        self._active = False
        self._broken = False
        #: Whether a repository was used since the last commit or rollback.
        self._used = False
        self._repositories: dict[str, _RepositoryBase[Any]] = {}
        self._events: deque[object] = deque()

    # -- protected hooks for implementations ---------------------------------

    @abc.abstractmethod
    def _new_repository(self, repository_class: type[Any], model: type[Any]) -> _RepositoryBase[Any]:
        """Build a repository bound to the block's session."""

    # -- state machine -------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a ``with`` block of this unit of work is running."""
        return self._active

    def _start(self) -> None:
        if self._active:
            msg = (
                f"{type(self).__name__} is already active: a block cannot be entered again "
                "inside itself. Finish the outer block first, or give the inner code its own "
                "unit of work"
            )
            raise ActiveUnitOfWorkError(msg)
        self._active = True
        self._broken = False
        self._used = False
        self.committed = False
        self.rolled_back = False

    def _check_active(self, what: str) -> None:
        if not self._active:
            msg = (
                f"{what} was used outside a block: call it inside `with uow:` "
                "(or `async with uow:`), where the unit of work has a session"
            )
            raise InactiveUnitOfWorkError(msg)

    def _repository(self, name: str) -> Any:
        self._check_active(f"{type(self).__name__}.{name}")
        slot = self._slots[name]
        repo = self._new_repository(self._implementations[name], slot.model)
        repo._unit = self
        self._repositories[name] = repo
        # Later reads in this block find the repository in the instance
        # dict and skip the descriptor; _finish() removes it again.
        self.__dict__[name] = repo
        return repo

    def _committed(self) -> None:
        self._used = False
        self.commits += 1
        self.committed = True
        for repo in self._repositories.values():
            for obj in repo._seen.values():
                events = getattr(obj, "events", None)
                if events:
                    self._events.extend(events)
                    events.clear()

    def _rolled_back(self) -> None:
        self._used = False
        self.rollbacks += 1
        self.rolled_back = True
        for repo in self._repositories.values():
            for obj in repo._seen.values():
                events = getattr(obj, "events", None)
                if events:
                    events.clear()

    def _finish(self) -> None:
        for name, repo in self._repositories.items():
            repo._close()
            self.__dict__.pop(name, None)
        self._repositories.clear()
        self._active = False

    def collect_new_events(self) -> Iterator[object]:
        """Yield the domain events of committed work, each once, oldest first.

        After every successful commit, the ``events`` lists of the aggregates
        that any repository returned or was given are moved into a queue that
        this generator drains. Events raised by work that was rolled back are
        dropped. It does not need an active block.
        """
        events = self._events
        while events:
            yield events.popleft()

    def __repr__(self) -> str:
        state = "active" if self._active else "idle"
        return f"<{type(self).__name__} {state}, commits={self.commits}, rollbacks={self.rollbacks}>"


class UnitOfWork(_UnitOfWorkCore, abc.ABC):
    """The abstract unit of work that services are typed against.

    Subclass it to declare repositories with :func:`repository`, then build
    each implementation from that one declaration::

        class AllocationUnitOfWork(uow.UnitOfWork):
            batches = uow.repository(Batch)

        class SqlAlchemyAllocationUnitOfWork(uow.SqlAlchemyUnitOfWork, AllocationUnitOfWork):
            pass

        class FakeAllocationUnitOfWork(uow.FakeUnitOfWork, AllocationUnitOfWork):
            pass
    """

    _interface = Repository

    @abc.abstractmethod
    def _open(self) -> None:
        """Create the session for a new block."""

    @abc.abstractmethod
    def _commit(self) -> None:
        """Commit the session's transaction."""

    @abc.abstractmethod
    def _rollback(self) -> None:
        """Roll the session's transaction back."""

    @abc.abstractmethod
    def _close(self, *, invalidate: bool) -> None:
        """Release the session; *invalidate* means its connection is broken and must not be reused."""

    def __enter__(self) -> Self:
        self._start()
        try:
            self._open()
        except BaseException:
            self._finish()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Closing the session rolls back whatever was not committed; objects
        # stay readable because close() detaches them without expiring them.
        try:
            if exc is None and self.autocommit:
                self.commit()
            elif self._used:
                self._rolled_back()
        except BaseException:
            self._release(quiet=True)
            raise
        self._release(quiet=exc is not None)

    def _release(self, *, quiet: bool) -> None:
        try:
            self._close(invalidate=self._broken)
        except Exception:
            if not quiet:
                raise
            log.exception("uow: closing the session after an error failed")
        finally:
            self._finish()

    def commit(self) -> None:
        """Commit the work done so far in this block.

        If the commit fails, the work is rolled back and the error raised.
        """
        self._check_active("commit()")
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise
        self._committed()

    def rollback(self) -> None:
        """Discard the uncommitted work of this block now; the block goes on."""
        self._check_active("rollback()")
        self._rollback()
        self._rolled_back()

    def _discard(self) -> None:
        """Roll back after an error; log, never raise, if the rollback fails too."""
        try:
            self._rollback()
        except Exception:
            self._broken = True
            log.exception("uow: rollback after an error failed; the connection will be invalidated")
        self._rolled_back()


class AsyncUnitOfWork(_UnitOfWorkCore, abc.ABC):
    """The async twin of :class:`UnitOfWork`, used with ``async with uow:``."""

    _interface = AsyncRepository

    @abc.abstractmethod
    async def _open(self) -> None:
        """Create the session for a new block."""

    @abc.abstractmethod
    async def _commit(self) -> None:
        """Commit the session's transaction."""

    @abc.abstractmethod
    async def _rollback(self) -> None:
        """Roll the session's transaction back."""

    @abc.abstractmethod
    async def _close(self, *, invalidate: bool) -> None:
        """Release the session; *invalidate* means its connection is broken and must not be reused."""

    async def __aenter__(self) -> Self:
        self._start()
        try:
            await self._open()
        except BaseException:
            self._finish()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None and self.autocommit:
                await self.commit()
            elif self._used:
                self._rolled_back()
        except BaseException:
            await self._release(quiet=True)
            raise
        await self._release(quiet=exc is not None)

    async def _release(self, *, quiet: bool) -> None:
        try:
            await self._close(invalidate=self._broken)
        except Exception:
            if not quiet:
                raise
            log.exception("uow: closing the session after an error failed")
        finally:
            self._finish()

    async def commit(self) -> None:
        """Commit the work done so far in this block.

        If the commit fails, the work is rolled back and the error raised.
        """
        self._check_active("commit()")
        try:
            await self._commit()
        except BaseException:
            await self._discard()
            raise
        self._committed()

    async def rollback(self) -> None:
        """Discard the uncommitted work of this block now; the block goes on."""
        self._check_active("rollback()")
        await self._rollback()
        self._rolled_back()

    async def _discard(self) -> None:
        """Roll back after an error; log, never raise, if the rollback fails too."""
        try:
            await self._rollback()
        except Exception:
            self._broken = True
            log.exception("uow: rollback after an error failed; the connection will be invalidated")
        self._rolled_back()
