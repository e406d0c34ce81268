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
the source it was compiled from (``__source_sha256__``, set first: setup.py compiles a copy with it
on the ``from __future__`` line, so the lines stay where they are). :class:`Finder`, installed by
the packages that hold such modules as they are imported, serves each listed module from its
compiled form and refuses one whose source has changed since (:class:`StaleBuild`, naming what
rebuilds) — whatever happened to the build between: a build that failed part-way, compiled
nothing or was never run; also when the old code fails before its end (an import of a name that
has gone). A compiled file under Python's own name beside a listed module (left by a build from
before the tags) is refused too, as Python would import it unchecked. A tree without compiled
modules, a module dropped from the list and a checkout of a commit from before any of this import
the sources.

A compiled module cannot be run with ``python -m`` (none of these is a program) and
``importlib.reload`` does not run its code again.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path
from sysconfig import get_config_var
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
    path = source(module, root).with_name(compiled_name(module, get_config_var("EXT_SUFFIX")))
    return path if path.exists() else None


FUTURE = b"from __future__ import annotations\n"


def stamped(text: bytes, build: str = "") -> bytes:
    """What setup.py compiles for a source: the source with its digest set on its first
    statement's line, and `build` (the compiler and its settings: a change to them changes the
    copy, so it is compiled again) in a comment at the end."""
    if FUTURE not in text:
        raise ValueError("a compiled module starts with `from __future__ import annotations`, where its digest goes")
    line = FUTURE[:-1] + f"; {STAMP} = {digest(text)!r}\n".encode()
    return text.replace(FUTURE, line, 1) + f"# compiled by {build}\n".encode()


def rebuild_advice() -> str:
    return f"rebuild with `{REBUILD}`" if (ROOT / "setup.py").exists() else "reinstall carbonx"


class _CheckedLoader(ExtensionFileLoader):
    def __init__(self, name: str, path: str, src: Path) -> None:
        super().__init__(name, path)
        self.src = src

    def exec_module(self, module: ModuleType) -> None:
        try:
            super().exec_module(module)
        except Exception as exc:
            self._check(module, exc)
            raise
        self._check(module)

    def _check(self, module: ModuleType, failure: Exception | None = None) -> None:
        try:
            current = digest(self.src.read_bytes())
        except OSError:
            raise StaleBuild(f"{self.src} is missing beside its compiled module {self.path}",
                             name=self.name) from failure
        if getattr(module, STAMP, None) != current:
            raise StaleBuild(f"{self.src} changed since it was compiled ({self.path}): {rebuild_advice()}, "
                             f"or set {PURE_ENV}=1 to run the sources", name=self.name) from failure


def _untagged(src: Path) -> Path | None:
    """A compiled module under Python's own name beside `src`, which Python would import unchecked."""
    for suffix in EXTENSION_SUFFIXES:
        candidate = src.with_name(src.stem + suffix)
        if candidate.exists():
            return candidate
    return None


class Finder(MetaPathFinder):
    """Finds the listed modules' compiled forms (see the module's docstring)."""

    def __init__(self, modules: tuple[str, ...] = MODULES, pure: bool = False) -> None:
        self.modules = frozenset(modules)
        self.pure = pure

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: object = None) -> ModuleSpec | None:
        if fullname not in self.modules or not path:
            return None
        last = fullname.rpartition(".")[2]
        tag = compiled_name(fullname, get_config_var("EXT_SUFFIX"))
        for entry in path:  # the parent package's folders, in order: the first with the module has it
            src, built = Path(entry) / f"{last}.py", Path(entry) / tag
            if src.exists():
                break
            if built.exists():
                raise StaleBuild(f"{src} is missing beside its compiled module {built}", name=fullname)
        else:
            return None
        left = _untagged(src)
        if left is not None:
            raise StaleBuild(f"{left} is a compiled {fullname} from an older build, which Python would import "
                             f"unchecked: delete it ({rebuild_advice()} for the current one)", name=fullname)
        if self.pure or not built.exists():
            return None
        return spec_from_file_location(fullname, built, loader=_CheckedLoader(fullname, str(built), src))


def install() -> None:
    """Put the finder first on the import path, once a process (serving the sources only under
    CARBONX_PURE_PYTHON)."""
    if any(isinstance(f, Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, Finder(pure=os.environ.get(PURE_ENV, "") not in ("", "0")))
