"""The compiled pure-Python modules (cext/accelerated.py): imported in place of their sources when
built, and refused when their source changed since."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from cext import accelerated
from cext.accelerated import MODULES, compiled, digest, source, stale


def _tree(tmp_path: Path, text: str = "X = 1\n") -> Path:
    """A package `pkg` with a module `mod`, its 'compiled' form beside it and a manifest."""
    (tmp_path / "pkg").mkdir()
    src = tmp_path / "pkg" / "mod.py"
    src.write_text(text)
    (tmp_path / "pkg" / f"mod{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"pkg.mod": digest(src)}))
    return tmp_path


def test_a_compiled_module_of_the_same_source_is_not_stale(tmp_path):
    root = _tree(tmp_path)
    assert stale(("pkg.mod",), root, root / "manifest.json") == []


def test_a_source_changed_since_its_build_is_stale(tmp_path):
    root = _tree(tmp_path)
    (root / "pkg" / "mod.py").write_text("X = 2\n")
    assert stale(("pkg.mod",), root, root / "manifest.json") == ["pkg.mod"]


def test_a_compiled_module_without_a_record_is_stale(tmp_path):
    root = _tree(tmp_path)
    assert stale(("pkg.mod",), root, root / "missing.json") == ["pkg.mod"]
    (root / "manifest.json").write_text("{not json")
    assert stale(("pkg.mod",), root, root / "manifest.json") == ["pkg.mod"]


def test_a_source_without_a_compiled_module_is_never_stale(tmp_path):
    root = _tree(tmp_path)
    (root / "pkg" / f"mod{EXTENSION_SUFFIXES[0]}").unlink()
    (root / "pkg" / "mod.py").write_text("X = 3\n")
    assert stale(("pkg.mod",), root, root / "missing.json") == []


def test_each_module_is_imported_compiled_when_built(tmp_path):
    """Python takes the extension module over the source beside it, and the build is current."""
    assert stale() == []
    for name in MODULES:
        built = compiled(name)
        expected = built if built is not None else source(name)
        assert Path(importlib.import_module(name).__file__).resolve() == expected.resolve(), name


@pytest.mark.skipif(not os.environ.get("CI"), reason="a local tree may run its sources (CI builds them all)")
def test_ci_runs_the_compiled_modules():
    assert [m for m in MODULES if compiled(m) is None] == []


def test_a_stale_build_stops_the_import_with_the_rebuild_command(tmp_path):
    """A fresh interpreter with a manifest that no longer matches refuses to import the packages."""
    if all(compiled(m) is None for m in MODULES):
        pytest.skip("nothing is compiled here")
    manifest = tmp_path / "accelerated.json"
    manifest.write_text(json.dumps({m: "0" * 64 for m in MODULES}))
    code = ("import cext.accelerated as a, pathlib, sys; a.MANIFEST = pathlib.Path(sys.argv[1]); "
            "import matching.core")
    r = subprocess.run([sys.executable, "-c", code, str(manifest)], capture_output=True, text=True,
                       cwd=accelerated.ROOT)
    assert r.returncode != 0
    assert "StaleBuild" in r.stderr and "changed since they were compiled" in r.stderr
    assert accelerated.REBUILD in r.stderr
