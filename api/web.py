"""The exchange's web page: a single-page app served by `carbonx serve` on the REST port.

``GET /`` is the page; ``GET /web/{name}`` its assets (plain HTML, CSS and ES modules shipped in
``api/web_static/`` as package data: no build step and nothing loaded from anywhere else, which
the page's Content-Security-Policy also enforces); ``GET /web/config.json`` tells the page where
the websocket feed listens (its own port). Everything else the page shows comes from the public
REST API and the feed, exactly as any other client would get it; member actions (the
neutrality wizard's offset) send the member's API key, which the page keeps in sessionStorage.

None of these routes is part of the API: they are left out of /openapi.json.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

STATIC_PACKAGE = "api"
STATIC_DIR = "web_static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
# Only this server's own origin for scripts, styles and images; websockets to any host because the
# feed listens on another port (and possibly another name) than the page.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file of the web app, read once: name -> (bytes, media type)."""
    out: dict[str, tuple[bytes, str]] = {}
    folder = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if item.is_file() and suffix in MEDIA_TYPES:
            out[item.name] = (item.read_bytes(), MEDIA_TYPES[suffix])
    if "index.html" not in out:
        raise FileNotFoundError(f"the web page is missing: no index.html in {STATIC_PACKAGE}/{STATIC_DIR}")
    return out


def install(app: FastAPI, ctx: Any) -> None:
    """Add the page, its assets and its configuration to `app` (outside the OpenAPI document).

    `ctx` is api.rest.Context; its `feed` (when the websocket feed runs alongside) is read at
    request time, because the feed's port is known only once it listens.
    """
    assets = load_assets()
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    def asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            return Response(b"no such file\n", status_code=404, media_type="text/plain; charset=utf-8")
        body, media = found
        extra = {"Content-Security-Policy": CSP} if name == "index.html" else {}
        return Response(body, media_type=media, headers={**headers, **extra})

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return asset("index.html")

    @app.get("/web/config.json", include_in_schema=False)
    async def config(request: Request) -> Response:
        feed = getattr(ctx, "feed", None)
        # The page builds ws://<its own host name>:<port>/v1/ws: the server may listen on 0.0.0.0,
        # which is no address a browser can connect to.
        port = feed.port if feed is not None and getattr(feed, "server", None) is not None else None
        return JSONResponse({"feed_port": port, "feed_path": "/v1/ws", "public_url": ctx.public_base(request)},
                            headers=headers)

    @app.get("/web/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return asset(name)
