"""uow.Page: a value with a cursor encoded only when it is read."""

from __future__ import annotations

import uow


def test_pages_compare_and_show_as_values() -> None:
    """Two pages with the same items, total and cursor are equal, and their repr shows all three."""
    page = uow.Page(["a"], 3, "c1")
    assert page == uow.Page(["a"], 3, "c1")
    assert page != uow.Page(["a"], 3, None)
    assert page != ("a", 3, "c1")
    assert "Page(items=['a'], total=3, next='c1')" == repr(page)


def test_a_cursor_is_encoded_once_when_first_read() -> None:
    """A page built with a cursor function calls it on the first read of next, and keeps the text."""
    calls: list[int] = []

    def encode() -> str:
        calls.append(1)
        return "c2"

    page = uow.Page(["a"], 3, encode)
    assert [] == calls
    assert ("c2", "c2") == (page.next, page.next)
    assert [1] == calls
    assert page == uow.Page(["a"], 3, "c2")
