"""Build script: compiles the Cython order book in cext/ and the pure-Python modules on the
order-entry path (cext/accelerated.py says which, how they are found and why they are checked);
metadata lives in pyproject.toml."""

import os
import runpy
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from Cython import __version__ as cython_version
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
ACCELERATED = runpy.run_path(str(HERE / "cext" / "accelerated.py"))
STAMPED = Path("build") / "accelerated-src"  # the copies compiled, each with its source's digest

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


def stamped_copy(module: str) -> str:
    """The source of `module` with the line that names its digest, rewritten only when it
    differs (Cython rebuilds what is newer than its C file: a content change, never a clock's)."""
    rel = Path(*module.split(".")).with_suffix(".py")
    text = ACCELERATED["stamped"]((HERE / rel).read_bytes(), BUILD)
    copy = HERE / STAMPED / rel
    if not copy.exists() or copy.read_bytes() != text:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(text)
    return str(STAMPED / rel)


# What the compiled code also depends on, written into each copy: a change recompiles.
DIRECTIVES = {"annotation_typing": False}
CFLAGS = ["-O2"]
BUILD = f"Cython {cython_version} with {DIRECTIVES} and {' '.join(CFLAGS)}"


class BuildExt(build_ext):
    """Names each compiled pure-Python module so that only cext/accelerated.py's finder loads it.

    setuptools asks for a module's file name with its dotted name (where it copies the module in
    place, what it installs) and distutils with its last part (where it links it), so both
    hooks rename; a last part alone is never renamed (cext.book and matching.book share one)."""

    def run(self) -> None:
        # A listed module compiled under Python's own name (by a build from before the tags)
        # would be imported unchecked; the finder refuses to run beside one, so take them away.
        for m in ACCELERATED["MODULES"]:
            src = HERE / Path(*m.split(".")).with_suffix(".py")
            for suffix in EXTENSION_SUFFIXES:
                src.with_name(src.stem + suffix).unlink(missing_ok=True)
        super().run()

    def get_ext_filename(self, fullname: str) -> str:
        return _tagged(super().get_ext_filename(fullname), fullname)

    def get_ext_fullpath(self, ext_name: str) -> str:
        return _tagged(super().get_ext_fullpath(ext_name), self.get_ext_fullname(ext_name))


def _tagged(path: str, fullname: str) -> str:
    if fullname not in ACCELERATED["MODULES"]:
        return path
    p = Path(path)
    last = fullname.rpartition(".")[2]
    if not p.name.startswith(last + ".") or p.name.startswith(last + ACCELERATED["TAG"]):
        return path
    return str(p.with_name(ACCELERATED["compiled_name"](fullname, p.name[len(last):])))


# Compiled as Python: annotations do not become C types (a `tuple` parameter would refuse the list
# that orjson gives for the same event), and the defaults keep Python's bounds checks, negative
# indexing and division. The module's name is its own, so classes and functions keep theirs.
accelerated = [Extension(m, [stamped_copy(m)], extra_compile_args=CFLAGS) for m in ACCELERATED["MODULES"]]
# One compiler per core this process may use; CARBONX_BUILD_JOBS overrides (each takes up to
# about 350 MB, for exchange/service.py).
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
jobs = int(os.environ.get("CARBONX_BUILD_JOBS") or cores or 1)

setup(
    cmdclass={"build_ext": BuildExt},
    options={"build_ext": {"parallel": jobs}},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ) + cythonize(
        accelerated,
        language_level=3,
        build_dir="build/cython",
        compiler_directives=DIRECTIVES,
    ),
)
