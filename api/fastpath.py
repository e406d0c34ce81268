"""Order entry over REST without FastAPI's per-request machinery: ``POST /v1/orders`` from a
member with a well-formed body is answered here, in plain ASGI; every other request, and every
order request that is not plainly valid, goes on to the FastAPI app unchanged.

Why: py-spy on the REST bench (bench/bench_api.py) put two thirds of the server's time per order
in the framework — middleware layers, dependency solving, exit stacks, routing — and a tenth in
placing the order. A real exchange keeps its order-entry path short, so this one is.

It decides nothing of its own, so the two paths cannot disagree: the body is checked by the same
model (api/models.py, validated from the same parsed JSON), the key by the same :class:`Gate`,
the order placed and answered by the same :class:`~api.orders.Trading`, and the exchange's
refusals become the same problem bodies (api/rest.py's ``problem_response``). Anything this path
would have to *word* itself — a missing or unknown key, a non-member, unparsable JSON, a body the
model refuses, another content type — is handed to FastAPI with the body replayed, so every such
error comes from the one place that documents it in /openapi.json. The FastAPI route stays the
documentation of this endpoint and answers whatever this path hands on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import pydantic

from api.auth import Gate, bearer, error_headers
from api.models import OrderRequest
from api.orders import Trading
from exchange.errors import CarbonxError

log = logging.getLogger("carbonx.api")
PATH = "/v1/orders"
JSON_TYPES = (b"application/json",)


class FastOrders:
    """ASGI middleware: member orders straight to :class:`Trading`, the rest to `app`."""

    def __init__(self, app: Any, gate: Gate, trading: Trading, problem: Callable[..., Any]) -> None:
        self.app = app
        self.gate = gate
        self.trading = trading
        self.problem = problem  # (code, detail, status=None) -> a starlette Response
        self.answered = 0  # requests this path answered itself (the tests look)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        headers = dict(reversed(scope["headers"]))  # the first of repeated headers, as starlette reads them
        body = b""
        while True:  # the whole body (Guard, in front, limits its size)
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        account, req = await self._plainly_valid(headers, body)
        if req is None:
            await self.app(scope, replay(body, receive), send)
            return
        self.answered += 1
        try:
            self.gate.admit(None, bearer(headers[b"authorization"].decode("latin-1")))
            view = await self.trading.place(account.id, req)
        except CarbonxError as e:
            response = self.problem(e.code, e.message, headers=error_headers(e))
        except Exception as e:  # as api/rest.py's handler of last resort does
            log.error("unhandled error", exc_info=e)
            response = self.problem("internal_error", type(e).__name__, 500)
        else:
            body = orjson.dumps(view)
            await send({"type": "http.response.start", "status": 201,
                        "headers": [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await response(scope, receive, send)

    async def _plainly_valid(self, headers: dict[bytes, bytes], body: bytes) -> tuple[Any, OrderRequest | None]:
        """(member account, request) when both are in order, else (None, None)."""
        kind = headers.get(b"content-type")
        if kind is None or kind.split(b";")[0].strip().lower() not in JSON_TYPES:
            return None, None  # FastAPI reads such a body as bytes, and the model refuses them
        header = headers.get(b"authorization")
        key = bearer(header.decode("latin-1")) if header is not None else None
        if not key:
            return None, None
        try:
            account = await self.gate.account(key)
            if account.role != "member":
                return None, None
            return account, OrderRequest.model_validate(orjson.loads(body))
        except (CarbonxError, orjson.JSONDecodeError, pydantic.ValidationError, UnicodeDecodeError):
            return None, None


def replay(body: bytes, receive: Callable) -> Callable:
    """A receive() that gives the already-read body once, then whatever the server says next."""
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again
