"""The compiled pure-Python modules (cext/accelerated.py): each listed module runs from its
compiled form when that was built from the source beside it, is refused when the source changed
since, and is never picked up by Python's own import (an older checkout, a module dropped from
the list) or under CARBONX_PURE_PYTHON."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

from cext.accelerated import MODULES, PURE_ENV, REBUILD, ROOT, STAMP, compiled, digest, source

BUILT = [m for m in MODULES if compiled(m) is not None]
needs_build = pytest.mark.skipif(not BUILT, reason="nothing is compiled in this tree")


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports from `cwd` (a copy of the tree, or the tree)."""
    clean = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(cwd), **env})


def _copy(tmp_path: Path) -> Path:
    """The matching and cext packages, sources and compiled forms, in a tree of their own."""
    for pkg in ("matching", "cext"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    shutil.copy(ROOT / "setup.py", tmp_path)  # a source tree: StaleBuild names the command that rebuilds
    return tmp_path


def _units_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tree (see _copy) and its compiled matching.units; skips where it is not built."""
    root = _copy(tmp_path)
    built = compiled("matching.units", root)
    if built is None:
        pytest.skip("matching.units is not compiled here")
    return root, built


def test_each_module_is_imported_compiled_when_built():
    for name in MODULES:
        module = importlib.import_module(name)
        built = compiled(name)
        if built is None:
            assert Path(module.__file__) == source(name), name
        else:
            assert Path(module.__file__) == built, name
            assert getattr(module, STAMP) == digest(source(name).read_bytes()), name


@pytest.mark.skipif(not os.environ.get("CI"), reason="a local tree may run its sources (CI builds them all)")
def test_ci_runs_the_compiled_modules():
    assert [m for m in MODULES if compiled(m) is None] == []


@needs_build
def test_a_source_changed_since_its_build_stops_its_import_with_the_rebuild_command(tmp_path):
    root, _ = _units_copy(tmp_path)
    ok = _python("import matching.units as u; print(u.__file__)", root)
    assert ok.returncode == 0 and ".carbonx." in ok.stdout, ok.stderr
    src = root / "matching" / "units.py"
    src.write_bytes(src.read_bytes() + b"\n# edited\n")
    r = _python("import matching.units", root)
    assert r.returncode != 0
    assert "StaleBuild" in r.stderr and "changed since it was compiled" in r.stderr and REBUILD in r.stderr
    # The sources themselves still run, on request.
    pure = _python("import matching.units as u; print(u.__file__)", root, **{PURE_ENV: "1"})
    assert pure.returncode == 0 and pure.stdout.strip().endswith("units.py"), pure.stderr


@needs_build
def test_stale_code_that_fails_before_its_end_is_still_named_stale(tmp_path):
    """The old compiled book imports a name the current reference book no longer has: the error
    says the build is stale, not that the name is missing."""
    if "matching.book" not in BUILT:
        pytest.skip("matching.book is not compiled here")
    root = _copy(tmp_path)
    ref = root / "matching" / "reference.py"
    ref.write_text(ref.read_text().replace("class ReferenceBook", "class RenamedBook"))
    current = _python("import matching.book", root)  # compiled from the current source: its own error
    assert current.returncode != 0 and "ImportError" in current.stderr and "StaleBuild" not in current.stderr
    book = root / "matching" / "book.py"
    book.write_bytes(book.read_bytes() + b"\n# edited\n")
    stale = _python("import matching.book", root)
    assert stale.returncode != 0 and "StaleBuild" in stale.stderr and "changed since it was compiled" in stale.stderr


@needs_build
def test_a_compiled_file_under_pythons_own_name_is_refused(tmp_path):
    """A build from before the tags left core.cpython-311-….so: Python would import it unchecked."""
    root, built = _units_copy(tmp_path)
    shutil.copy(built, built.with_name(built.name.replace(".carbonx", "", 1)))
    for env in ({}, {PURE_ENV: "1"}):
        r = _python("import matching.units", root, **env)
        assert r.returncode != 0 and "StaleBuild" in r.stderr and "older build" in r.stderr, (env, r.stderr)


@needs_build
def test_a_compiled_module_without_its_source_is_refused(tmp_path):
    root, _ = _units_copy(tmp_path)
    (root / "matching" / "units.py").unlink()
    r = _python("import matching.units", root)
    assert r.returncode != 0 and "StaleBuild" in r.stderr and "missing" in r.stderr


@needs_build
def test_python_alone_never_imports_a_compiled_module():
    """What an older checkout sees (no finder): the sources, though the compiled files lie beside them."""
    for name in BUILT:
        spec = PathFinder.find_spec(name, [str(ROOT / name.rpartition(".")[0])])
        assert spec is not None and Path(spec.origin) == source(name), name


@needs_build
def test_a_compiled_file_of_a_module_off_the_list_is_ignored(tmp_path):
    root, built = _units_copy(tmp_path)
    shutil.copy(built, built.with_name(built.name.replace("units", "workloads", 1)))
    r = _python("import matching.workloads as w; print(w.__file__)", root)
    assert r.returncode == 0 and r.stdout.strip().endswith("workloads.py"), r.stderr


def test_pure_python_runs_every_source(tmp_path):
    code = "import importlib, sys; print('\\n'.join(importlib.import_module(m).__file__ for m in sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, PURE_ENV: "1"})
    assert r.returncode == 0, r.stderr
    assert [Path(p) for p in r.stdout.split()] == [source(m) for m in MODULES]
