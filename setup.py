"""Build script: compiles the Cython order book in cext/ (metadata lives in pyproject.toml)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "cext.book",
        ["cext/book.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "cext.streamparse",
        ["cext/streamparse.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
