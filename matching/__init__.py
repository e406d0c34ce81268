"""Order model, trading rules, the matching engine and the pure-Python reference book.

Start with matching/README.md. ``matching.book.make_book`` picks the Cython book (cext/) or the
reference book (``engine=`` or CARBONX_BOOK=cython|reference); ``matching.engine.MatchingEngine``
applies per-instrument rules and routes commands to one book per instrument.
"""

from cext.accelerated import check as _check_build

_check_build()  # a compiled module of this package must be of its current source
