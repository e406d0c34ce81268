"""The pure-Python modules that run compiled, and the guard against running a stale build of them.

The modules on the order-entry path (the core, the order tracker, the answers and the feed, the
journal consumers' folding) are plain Python, and setup.py also compiles each of them, unchanged,
with Cython into an extension module beside its source, which Python then imports instead of the
source. Nothing about them is Cython-specific: they are typed, tested and read as Python, with
annotations ignored by the compiler (``annotation_typing=False``), so the compiled module behaves
as the source does — only faster (the websocket bench's server CPU per order: see setup.py).

A compiled module is the source as it was at the last build. When a source has changed since, the
compiled module would run the old code; :func:`check` refuses that with the command that rebuilds.
setup.py records each source's SHA-256 in ``accelerated.json`` beside this file when it compiles.
Without a compiled module (a tree nobody built) Python imports the source, and there is nothing
to check.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

MODULES = (
    "matching.core", "matching.engine", "matching.risk", "matching.units", "matching.book",
    "exchange.history", "exchange.marketdata", "exchange.service", "exchange.journal", "exchange.projector",
    "exchange.registry", "clearing.settlement",
    "api.wire", "api.orders", "api.feed", "api.auth",
)
ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).with_name("accelerated.json")
REBUILD = "pip install -e ."


class StaleBuild(ImportError):
    """A compiled module is older than its source."""


def source(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled(module: str, root: Path = ROOT) -> Path | None:
    """The extension module Python would import for `module`, if there is one."""
    src = source(module, root)
    for suffix in EXTENSION_SUFFIXES:
        candidate = src.with_name(src.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def stale(modules: tuple[str, ...] = MODULES, root: Path = ROOT, manifest: Path | None = None) -> list[str]:
    """The modules whose compiled form was built from another source than the one beside it (a
    compiled module with no record of its source counts as such)."""
    manifest = manifest or MANIFEST
    built = [m for m in modules if compiled(m, root) is not None]
    if not built:
        return []
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    return sorted(m for m in built if recorded.get(m) != digest(source(m, root)))


@functools.cache
def check() -> None:
    """Refuse to run a compiled module whose source has changed since it was built (once a
    process; the packages that hold such modules call it as they are imported)."""
    changed = stale()
    if changed:
        raise StaleBuild(
            f"{', '.join(changed)} changed since {'it was' if len(changed) == 1 else 'they were'} compiled: "
            f"rebuild with `{REBUILD}` (or delete the compiled modules beside the sources to run the sources)")
