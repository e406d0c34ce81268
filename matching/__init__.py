"""Order model, trading rules, the matching engine and the pure-Python reference book.

Start with matching/README.md. ``matching.book.make_book`` picks the Cython book (cext/) or the
reference book (``engine=`` or CARBONX_BOOK=cython|reference); ``matching.engine.MatchingEngine``
applies per-instrument rules and routes commands to one book per instrument.
"""

from cext.accelerated import install as _install_compiled

_install_compiled()  # this package's listed modules run compiled when built from their current source
