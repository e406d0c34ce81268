"""The web page's files without a browser: every file the page refers to is shipped (package data
in pyproject.toml covers it, so a non-editable `pip install .` serves the page), nothing is
loaded from another site, and the routes stay out of the API's OpenAPI document."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import httpx

from api import web
from api.rest import Context, create_app

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "api" / web.STATIC_DIR


def _shipped(name: str) -> bool:
    """Whether pyproject.toml ships api/web_static/`name`: the folder is a package of its own
    (setuptools warns of a folder that is not) whose package data matches the name."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = f"api.{web.STATIC_DIR}"
    return package in config["packages"] and any(fnmatch.fnmatch(name, pattern)
                                                 for pattern in config["package-data"].get(package, []))


def test_every_referenced_file_is_shipped_and_served(run) -> None:
    files = {p.name for p in STATIC.iterdir()}
    assert all(p.is_file() for p in STATIC.iterdir()), "package data globs do not descend into folders"
    index = (STATIC / "index.html").read_text()
    referenced = set(re.findall(r'(?:src|href)="/web/([^"]+)"', index))
    for js in STATIC.glob("*.js"):
        referenced |= set(re.findall(r"from '\./([^']+)'", js.read_text()))
    assert referenced and referenced <= files, referenced - files
    assert all(_shipped(name) for name in files), [n for n in files if not _shipped(n)]
    assert set(web.load_assets()) == files

    app = create_app(Context(None, None, None, None))  # type: ignore[arg-type]

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://web") as client:
            return await client.get(path)

    page = run(get("/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in files:
        r = run(get(f"/web/{name}"))
        assert r.status_code == 200 and r.content == (STATIC / name).read_bytes(), name
    assert run(get("/web/missing.js")).status_code == 404
    assert run(get("/web/config.json")).json() == {"feed_port": None, "feed_path": "/v1/ws", "public_url": "http://web"}
    paths = run(get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/web")]


def test_nothing_comes_from_another_site() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        if path.suffix == ".svg":
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
        assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), f"{path.name} names another site"
        assert "@import" not in text and "url(" not in text, f"{path.name} loads a resource"
