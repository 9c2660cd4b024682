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

__all__ = [
    "ActiveUnitOfWorkError",
    "ConfigurationError",
    "InactiveUnitOfWorkError",
    "ModelTypeError",
    "MultipleResultsError",
    "NotInRepositoryError",
    "UnknownFieldError",
    "UowError",
]


class UowError(Exception):
    """Base class of every error that uow raises on purpose."""


class ConfigurationError(UowError, TypeError):
    """A unit of work or repository was declared or built wrongly.

    Raised as early as possible: when a class is defined or an object built,
    not on first use.
    """


class InactiveUnitOfWorkError(UowError, RuntimeError):
    """A repository, the session or ``commit()`` was used outside ``with uow:``."""


class ActiveUnitOfWorkError(UowError, RuntimeError):
    """A unit of work was entered again while it is already active."""


class UnknownFieldError(UowError, TypeError):
    """A repository filter named something that is not a column attribute."""


class ModelTypeError(UowError, TypeError):
    """An object of the wrong class was given to a repository."""


class MultipleResultsError(UowError, LookupError):
    """``get_by()`` matched more than one object."""


class NotInRepositoryError(UowError, LookupError):
    """``remove()`` was given an object that this unit of work does not hold."""
