# cython: language_level=3
"""The Cython order book (filled in by the matching issue; this file makes the build real)."""

BOOK_ABI = 1
