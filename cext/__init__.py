"""C-level hot paths in Cython: the order book (book.pyx) and the replay stream parser
(streamparse.pyx); and accelerated.py, which names the pure-Python modules that setup.py also
compiles and loads each only when it is of its current source. Build in place with
`pip install -e .` (or, with setuptools 77 or later installed, `python setup.py build_ext --inplace`)."""
