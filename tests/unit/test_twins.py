"""The sync and async twins stay in step: the same members, the same parameters, coroutines where they await."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import uow
from uow._async_unit_of_work import AsyncBlock
from uow._sqlalchemy_async import AsyncSqlAlchemyUnitOfWork
from uow._unit_of_work import Block

#: Names that classes get from Python, typing or abc, not from uow's code.
_BOOKKEEPING = {
    "__abstractmethods__",
    "__annotations__",
    "__dict__",
    "__doc__",
    "__firstlineno__",
    "__module__",
    "__orig_bases__",
    "__parameters__",
    "__qualname__",
    "__slots__",
    "__static_attributes__",
    "__weakref__",
    "_abc_impl",
    "_unit",
}

#: The sync name of each async protocol method, and the other way round: the traps that refuse the wrong
#: protocol sit where the other twin has its real methods.
_SWAPPED = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__enter__": "__aenter__", "__exit__": "__aexit__"}

TWINS = [
    (uow.UnitOfWork, uow.AsyncUnitOfWork),
    (Block, AsyncBlock),
    (uow.SqlAlchemyUnitOfWork, AsyncSqlAlchemyUnitOfWork),
    (uow.FakeUnitOfWork, uow.AsyncFakeUnitOfWork),
    (uow.Repository, uow.AsyncRepository),
    (uow.SqlAlchemyRepository, uow.AsyncSqlAlchemyRepository),
    (uow.InMemoryRepository, uow.AsyncInMemoryRepository),
]


def members(cls: type[Any], *, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """What *cls* itself defines, by name (renamed by *rename*), without Python's bookkeeping."""
    rename = rename or {}
    return {rename.get(name, name): value for name, value in vars(cls).items() if name not in _BOOKKEEPING}


def function_of(member: Any) -> Any:
    """The function behind a method, property, classmethod or staticmethod; None for plain data."""
    if isinstance(member, property):
        return member.fget
    if isinstance(member, (classmethod, staticmethod)):
        return member.__func__
    return member if callable(member) else None


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=lambda cls: cls.__name__)
def test_twins_define_the_same_members(sync: type[Any], async_: type[Any]) -> None:
    """The async twin defines exactly the members the sync one does, protocol methods matched by role."""
    assert sorted(members(sync)) == sorted(members(async_, rename=_SWAPPED))


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=lambda cls: cls.__name__)
def test_twins_take_the_same_parameters(sync: type[Any], async_: type[Any]) -> None:
    """Each method of a twin takes the same parameters, in the same order, as its counterpart."""
    theirs = members(async_, rename=_SWAPPED)
    for name, member in members(sync).items():
        if name in ("_here", "_here_fast"):
            continue  # where code runs: a thread (and task) on one side, a task on the other, by design
        mine, other = function_of(member), function_of(theirs[name])
        if mine is None or other is None:
            assert (mine is None) == (other is None), name
            continue
        assert list(inspect.signature(mine).parameters) == list(inspect.signature(other).parameters), name


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=lambda cls: cls.__name__)
def test_async_twin_awaits_where_the_sync_one_does_io(sync: type[Any], async_: type[Any]) -> None:
    """A method is a coroutine in the async twin exactly where it is a plain function in the sync one, or both plain."""
    theirs = members(async_, rename=_SWAPPED)
    for name, member in members(sync).items():
        mine, other = function_of(member), function_of(theirs[name])
        if mine is None or name in _SWAPPED:
            continue
        assert not inspect.iscoroutinefunction(mine), name
        if inspect.iscoroutinefunction(other):
            continue
        # Not awaited in the async twin either: then it must be the same kind of thing, doing no I/O.
        assert type(member) is type(theirs[name]), name
