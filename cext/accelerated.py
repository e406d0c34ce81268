"""The pure-Python modules that run compiled, and the import hook that runs them only when they
are of the source beside them.

The modules on the order-entry path (the core, the order tracker, the answers and the feed, the
journal consumers' folding) are plain Python, and setup.py also compiles each of them, unchanged,
with Cython. Nothing about them is Cython-specific: they are typed, tested and read as Python,
with annotations ignored by the compiler (``annotation_typing=False``) and Python's own bounds
checks and division kept, so a compiled module computes what its source does. It differs where
Python looks at code rather than running it: tracebacks name the build's copy of the source
(same lines), logging attributes a compiled function's records to its caller, and profilers,
debuggers and ``inspect.getsource`` do not see inside. Set ``CARBONX_PURE_PYTHON=1`` to run the
sources for those.

A compiled module sits beside its source under a name Python's own import never picks up
(``core.carbonx.cpython-311-x86_64-linux-gnu.so`` beside ``core.py``), and carries the SHA-256 of
the source it was compiled from (``__source_sha256__``: setup.py compiles a copy with that line
added). :class:`Finder`, installed by the packages that hold such modules as they are imported,
serves each listed module from its compiled form and refuses one whose source has changed since
(:class:`StaleBuild`, naming the command that rebuilds) — whatever happened to the build between:
a build that failed part-way, compiled nothing or was never run. A tree without compiled modules,
a module dropped from the list and a checkout of a commit from before any of this import the
sources.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ExtensionFileLoader, ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path
from types import ModuleType

MODULES = (
    "matching.core", "matching.engine", "matching.risk", "matching.units", "matching.book",
    "exchange.history", "exchange.marketdata", "exchange.service", "exchange.journal", "exchange.projector",
    "exchange.registry", "clearing.settlement",
    "api.wire", "api.orders", "api.feed", "api.auth",
)
ROOT = Path(__file__).resolve().parent.parent
TAG = ".carbonx"  # between a compiled module's name and the interpreter's extension suffix
STAMP = "__source_sha256__"
REBUILD = "pip install -e ."
PURE_ENV = "CARBONX_PURE_PYTHON"


class StaleBuild(ImportError):
    """A compiled module is not of the source beside it."""


def source(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compiled_name(module: str, ext_suffix: str) -> str:
    """The compiled module's file name beside its source, e.g. ``core.carbonx.cpython-311-….so``."""
    return module.rpartition(".")[2] + TAG + ext_suffix


def compiled(module: str, root: Path = ROOT) -> Path | None:
    """The compiled form of `module` for this interpreter, if it was built."""
    from sysconfig import get_config_var
    path = source(module, root).with_name(compiled_name(module, get_config_var("EXT_SUFFIX")))
    return path if path.exists() else None


def stamped(text: bytes) -> bytes:
    """What setup.py compiles for a source: the source, then the line that names it."""
    return text + f"\n{STAMP} = {digest(text)!r}\n".encode()


class _CheckedLoader(ExtensionFileLoader):
    def __init__(self, name: str, path: str, src: Path) -> None:
        super().__init__(name, path)
        self.src = src

    def exec_module(self, module: ModuleType) -> None:
        super().exec_module(module)
        try:
            current = digest(self.src.read_bytes())
        except OSError:
            raise StaleBuild(f"{self.src} is missing beside its compiled module {self.path}", name=self.name) from None
        if getattr(module, STAMP, None) != current:
            raise StaleBuild(f"{self.src} changed since it was compiled ({self.path}): rebuild with `{REBUILD}`, "
                             f"or set {PURE_ENV}=1 to run the sources", name=self.name)


class Finder(MetaPathFinder):
    """Finds the listed modules' compiled forms (see the module's docstring)."""

    def __init__(self, modules: tuple[str, ...] = MODULES, root: Path = ROOT) -> None:
        self.modules = frozenset(modules)
        self.root = root

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname not in self.modules:
            return None
        built = compiled(fullname, self.root)
        if built is None:
            return None
        loader = _CheckedLoader(fullname, str(built), source(fullname, self.root))
        return spec_from_file_location(fullname, built, loader=loader)


def install() -> None:
    """Put the finder first on the import path, once a process (unless CARBONX_PURE_PYTHON)."""
    if os.environ.get(PURE_ENV, "") not in ("", "0") or any(isinstance(f, Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, Finder())
