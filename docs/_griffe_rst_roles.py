"""A Griffe extension that renders the reStructuredText roles of uow's docstrings.

uow's docstrings cross-reference with roles such as :class:`~uow.Repository`
and end a paragraph with ``::`` before a code example. Markdown has neither,
so before the API reference is rendered this extension rewrites:

* ``:role:`~uow.errors.MultipleResultsError``` into the cross-reference
  ``[`MultipleResultsError`][uow.errors.MultipleResultsError]``, and a bare
  name that ``uow`` or ``uow.errors`` exports, such as ``:class:`UnitOfWork```,
  into a cross-reference to ``uow.UnitOfWork``; any other target becomes
  inline code;
* a paragraph's closing ``::`` into ``:``.

Only the rendered text changes; the docstrings in the source stay as written.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|exc|obj|mod|data):`(~?)([\w.]+)`")
_LITERAL = re.compile(r"(\S)::\n")


class RstRoles(griffe.Extension):
    """Rewrite reStructuredText roles into Markdown in every docstring of a package."""

    def __init__(self) -> None:
        super().__init__()
        self._targets: dict[str, str] = {}

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._targets = {str(name): f"{pkg.path}.{name}" for name in pkg.exports or ()}
        errors = pkg.members.get("errors")
        if isinstance(errors, griffe.Module):
            self._targets.update({str(name): f"{errors.path}.{name}" for name in errors.exports or ()})
        self._visit(pkg, set())

    def _visit(self, obj: griffe.Object, done: set[str]) -> None:
        if obj.path in done:
            return
        done.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value)
        for member in obj.members.values():
            if isinstance(member, griffe.Object):
                self._visit(member, done)

    def _rewrite(self, text: str) -> str:
        return _LITERAL.sub(r"\1:\n", _ROLE.sub(self._replace_role, text))

    def _replace_role(self, match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        target = name if name.startswith("uow.") else self._targets.get(name)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"
