"""Exceptions raised by uow.

Every exception uow raises on purpose derives from :class:`UowError`. Where a
built-in exception type describes the mistake as well (a wrong argument is a
``TypeError``, a missing object a ``LookupError``), the uow exception derives
from both, so existing ``except`` clauses keep working.

Errors raised by the database itself (``sqlalchemy.exc.IntegrityError`` and
friends) are not wrapped: code that catches them keeps working unchanged, and
the in-memory fake raises the same SQLAlchemy types where the database would.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url
from sqlalchemy.orm import exc as orm_exc

__all__ = [
    "ActiveUnitOfWorkError",
    "ConcurrencyError",
    "ConfigurationError",
    "FakeDatabaseError",
    "InactiveUnitOfWorkError",
    "JoinedScopeError",
    "ModelTypeError",
    "MultipleResultsError",
    "NotInRepositoryError",
    "OutboxError",
    "OwnershipError",
    "QueryError",
    "ReadOnlyError",
    "RollbackOnlyError",
    "UnknownFieldError",
    "UowError",
    "is_retryable",
]


class UowError(Exception):
    """Base class of every error that uow raises on purpose."""


class ConfigurationError(UowError, TypeError):
    """A unit of work or repository was declared or built wrongly.

    Raised as early as possible: when a class is defined or an object built,
    not on first use.
    """


class InactiveUnitOfWorkError(UowError, RuntimeError):
    """No unit of work is active where one is needed.

    A repository, the session or ``commit()`` was used outside ``with uow:``;
    ``uow.current()`` found none; or ``propagation="mandatory"`` found none
    to join.
    """


class ActiveUnitOfWorkError(UowError, RuntimeError):
    """``propagation="never"`` found a unit of work already active."""


class OwnershipError(UowError, RuntimeError):
    """A unit of work was used from a thread or task other than the one that entered it.

    Sessions are not thread-safe nor task-safe: give every thread and task
    its own unit of work.
    """


class JoinedScopeError(UowError, RuntimeError):
    """A joined scope tried something only the owner of the transaction may do.

    For example ``session.commit()``, ``session.close()`` or ``rollback()``,
    or asking for another isolation level, or for read-write access inside
    a read-only transaction.
    """


class RollbackOnlyError(UowError, RuntimeError):
    """The transaction can only be rolled back, so it was.

    A joined scope raised, and the caller went on, or ``set_rollback_only()``
    was called and then ``commit()``. The original exception, if any, is the
    ``__cause__``.
    """


class ReadOnlyError(UowError, RuntimeError):
    """A read-only unit of work was asked to write or to commit."""


class UnknownFieldError(UowError, TypeError):
    """A repository filter named something that is not a column attribute."""


class ConcurrencyError(UowError, orm_exc.StaleDataError):
    """Another transaction changed or deleted a row that this one read and then wrote: an optimistic-lock conflict.

    Raised where SQLAlchemy raises ``StaleDataError`` (a version counter that
    moved, an UPDATE or DELETE that matched no row), with that error as its
    ``__cause__``; it is a ``StaleDataError`` too, so handlers of either
    catch it. ``@transactional(retries=...)`` runs the unit of work again.
    """


def _concurrency_error(error: BaseException) -> ConcurrencyError:
    """The :class:`ConcurrencyError` that stands for SQLAlchemy's *error*; raise it ``from error``."""
    found = str(error).rstrip(".")
    msg = (
        f"another transaction changed or deleted a row that this one read and then wrote: {found}. Run the unit "
        "of work again from the start (@transactional(retries=...) does), or lock the row when reading it"
    )
    return ConcurrencyError(msg)


class QueryError(UowError, TypeError):
    """A repository query used something that the repositories cannot answer alike on every implementation."""


class OutboxError(UowError, TypeError):
    """A message cannot go to the outbox: none is declared, or its topic, key, headers or payload are wrong."""


class ModelTypeError(UowError, TypeError):
    """An object of the wrong class was given to a repository."""


class MultipleResultsError(UowError, LookupError):
    """``get_by()`` matched more than one object."""


class NotInRepositoryError(UowError, LookupError):
    """``remove()`` was given an object that this unit of work does not hold."""


class FakeDatabaseError(UowError):
    """What a database driver's error is to the fake: the ``orig`` of the SQLAlchemy error it raises.

    The fake raises ``sqlalchemy.exc.IntegrityError`` where a database refuses
    a write, as a driver's error wrapped by SQLAlchemy; this is the error it
    wraps, with a message in PostgreSQL's words that names the constraint.
    """


_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_RETRYABLE_MYSQL_CODES = frozenset({1213, 1205})  # deadlock, lock wait timeout


def is_retryable(exc: BaseException) -> bool:
    """Whether *exc* means that running the whole unit of work again may succeed.

    True for a serialization failure or deadlock reported by the database
    (SQLSTATE 40001 and 40P01 on PostgreSQL, error 1213 and 1205 on MySQL and
    MariaDB) and for ``StaleDataError`` from a version counter, found on
    *exc* or along its ``__cause__`` chain. It is the default predicate of
    ``@transactional(retries=...)``; a custom one can call it and add cases.
    A ``BaseException`` that is not an ``Exception`` (a cancellation) is never
    retryable.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not isinstance(current, Exception):
            return False
        if isinstance(current, orm_exc.StaleDataError):
            return True
        if isinstance(current, sa_exc.DBAPIError) and _retryable_dbapi_error(current.orig):
            return True
        current = current.__cause__
    return False


def _retryable_dbapi_error(orig: object) -> bool:
    for attribute in ("sqlstate", "pgcode"):
        if getattr(orig, attribute, None) in _RETRYABLE_SQLSTATES:
            return True
    args: tuple[object, ...] = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in _RETRYABLE_MYSQL_CODES


def _shown(value: object) -> str:
    """*value* as an error message shows what it was given: its repr, with any password hidden.

    A database URL passed where an engine or a factory belongs must not put its
    password into an error message, a log line or a traceback.
    """
    if isinstance(value, (str, bytes)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if "://" in text or "@" in text:
            try:
                shown = make_url(text).render_as_string(hide_password=True)
            except Exception:  # not a URL after all: show no part of it
                return f"a {type(value).__name__} of {len(value)} characters"
            return f"the {type(value).__name__} {shown!r}"
    return repr(value)
