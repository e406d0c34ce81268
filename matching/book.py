"""Choosing an order book implementation: the Cython book (fast) or the reference book (readable).

``make_book(engine=None, **options)`` returns a fresh book for one instrument. ``engine`` is
"cython" or "reference"; when it is None the environment variable CARBONX_BOOK decides, and when
that is unset too the Cython book is used. Both expose the interface documented in
matching/reference.py and emit identical events for identical commands.
"""

from __future__ import annotations

import os
from typing import Any

from matching.reference import ReferenceBook

ENGINES = ("cython", "reference")


def book_class(engine: str | None = None) -> type:
    """The class behind `engine` (or CARBONX_BOOK, default "cython")."""
    name = engine or os.environ.get("CARBONX_BOOK") or "cython"
    if name == "reference":
        return ReferenceBook
    if name == "cython":
        from cext.book import CythonBook

        return CythonBook
    raise ValueError(f"unknown book engine {name!r}; expected one of {ENGINES}")


def make_book(engine: str | None = None, **options: Any) -> Any:
    """A new empty book; options: max_price, lot, reduce_loses_priority (keyword only)."""
    return book_class(engine)(**options)
