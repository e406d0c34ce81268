"""Build script: compiles the Cython order book in cext/ and the pure-Python modules on the
order-entry path (cext/accelerated.py says which, and why); metadata lives in pyproject.toml."""

import hashlib
import json
import os
import runpy
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
ACCELERATED = runpy.run_path(str(HERE / "cext" / "accelerated.py"))

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

# The Python modules compile as Python: annotations do not become C types (a `tuple` parameter
# would refuse the list that orjson gives for the same event), and the defaults keep Python's
# bounds checks, negative indexing and division.
accelerated = [Extension(m, [f"{m.replace('.', '/')}.py"], extra_compile_args=["-O2"])
               for m in ACCELERATED["MODULES"]]
(HERE / "cext" / "accelerated.json").write_text(json.dumps(
    {m: hashlib.sha256((HERE / f"{m.replace('.', '/')}.py").read_bytes()).hexdigest() for m in ACCELERATED["MODULES"]},
    indent=1, sort_keys=True) + "\n", encoding="utf-8")

setup(
    options={"build_ext": {"parallel": os.cpu_count() or 1}},  # the modules compile one per core
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ) + cythonize(
        accelerated,
        language_level=3,
        build_dir="build/cython",
        compiler_directives={"annotation_typing": False},
    ),
)
