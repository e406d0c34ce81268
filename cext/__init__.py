"""C-level hot paths in Cython: the order book (book.pyx) and the replay stream parser
(streamparse.pyx). Build in place with `python setup.py build_ext --inplace`."""
