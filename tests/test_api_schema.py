"""Schemathesis against the live server's /openapi.json: every operation of the REST API, called
with generated requests on a server that holds real data, must answer without a server error,
with a documented status code and content type, and with a body that conforms to the schema.

The server (api.server.Exchange on loopback, real PostgreSQL) runs once for this module, with a
world built through REST (tests/api_helpers.build_world) plus resting orders, a trade and a
retirement, so that identifiers in paths can name things that exist. Each operation is its own
test item (so that a bug found in one operation is marked there and nowhere else), run in up to
three modes:

- ``positive``: schema-valid requests, everything generated;
- ``negative``: schema-violating requests (the API must refuse them with a documented 4xx);
- ``real``: schema-valid requests whose path parameters are pinned to existing entities (the
  listed symbol, its project, issuance, an order of the member, a certificate, a serial), so the
  handlers' success paths are exercised and not only their 404s. Only for operations with path
  parameters.

Operations in the ``operator`` tag are called with the operator's key, all others with a
member's (BUY). Nothing is excluded: the operation list is taken from the app and checked
against the live document.

Deterministic and bounded: hypothesis derandomized (the seed comes from each test's name), no
example database, MAX_EXAMPLES per operation and mode; the module runs in well under a minute.
The rate limits are raised for this server (generated requests come fast from one key).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.auth import Limits
from api.rest import PROBLEM, Context, create_app
from tests.api_helpers import SYMBOL, ServerThread, build_world, ok, own_server

MAX_EXAMPLES = int(os.environ.get("CARBONX_SCHEMA_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FAST = Limits(key_rate=1e6, key_burst=1e6, address_rate=1e6, address_burst=1e6)

# The operations, read from the app itself at collection time (no server needed to list them);
# test_every_operation_is_tested checks that the live /openapi.json has exactly these.
_APP = create_app(Context(None, None, None, None))  # type: ignore[arg-type]
_DOC = _APP.openapi()
OPERATIONS = [(method.upper(), path, "operator" in op.get("tags", ()),
               any(p.get("in") == "path" for p in op.get("parameters", ())),
               bool(op.get("parameters") or op.get("requestBody")))
              for path, methods in _DOC["paths"].items() for method, op in methods.items()]

# Product bugs schemathesis finds, per (document, method, path, mode), are marked xfail(strict=True)
# here so that the test starts failing (XPASS) the day the bug is fixed. (The first run found that
# every JSON success response was documented as a string: fixed in api/rest.py.)
BUGS: dict[tuple[str, str, str, str], str] = {}


def _params() -> list[Any]:
    out = []
    for method, path, _is_operator, has_path, has_input in OPERATIONS:
        # Negative data needs something to break: operations without parameters or body get none.
        modes = ["positive"] + ["negative"] * has_input + ["real"] * has_path
        for doc in ("live",):
            for mode in modes:
                marks = []
                reason = BUGS.get((doc, method, path, mode))
                if reason:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                out.append(pytest.param(doc, method, path, mode, id=f"{doc}: {method} {path} [{mode}]", marks=marks))
    return out


class Live:
    """The running server, its keys, real identifiers, and the schema loaded from it."""

    def __init__(self, server: ServerThread, keys: dict[str, str], real: dict[str, Any]) -> None:
        self.server = server
        self.keys = keys
        self.real = real
        self.doc = requests.get(f"{server.http}/openapi.json", timeout=30).json()
        self.schemas = {"live": schemathesis.openapi.from_url(f"{server.http}/openapi.json")}
        self.session = requests.Session()


@pytest.fixture(scope="module")
def live(pg_server: str, template_db: str, run) -> Iterator[Live]:
    with own_server(pg_server, template_db, run, "test_schema", limits=FAST) as server:
        w = build_world(server.http, server.ops_key)
        with w.as_("DEV") as dev, w.as_("BUY") as buy:
            # A resting sell, a trade against it, a resting buy of BUY's, and a retirement.
            ok(dev.post("/v1/orders", json={"symbol": SYMBOL, "side": "sell", "price": "36.00",
                                            "quantity": "50.000"}), 201)
            ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "36.00",
                                            "quantity": "10.000"}), 201)
            resting = ok(buy.post("/v1/orders", json={"symbol": SYMBOL, "side": "buy", "price": "34.00",
                                                      "quantity": "5.000", "client_order_id": "rest-1"}), 201)
            ret = ok(buy.post("/v1/retirements", json={"symbol": SYMBOL, "quantity": "1.000",
                                                       "beneficiary": "Schema test", "purpose": "neutrality"}),
                     201)
            project = SYMBOL.rsplit("-", 1)[0]
            issuance_id = ok(buy.get(f"/v1/registry/projects/{project}"))["issuances"][0]["id"]
            real = {"symbol": SYMBOL, "code": ret["certificate_code"], "issuance_id": issuance_id,
                    "order_id": int(resting["order_id"]), "serial": ret["serials"][0]}
        live = Live(server, w.keys, real)
        yield live
        live.session.close()


def _path_values(live: Live, path: str) -> dict[str, Any]:
    """Existing entities for the path parameters of `path` (`code` is a project's code in
    /registry/projects and an account's in /accounts, a certificate's elsewhere)."""
    real = dict(live.real)
    if path.startswith("/v1/registry/projects/"):
        real["code"] = SYMBOL.rsplit("-", 1)[0]
    elif path.startswith("/v1/accounts/"):
        real["code"] = "BUY2"
    names = [seg[1:-1] for seg in path.replace(".", "/").split("/") if seg.startswith("{")]
    return {n: real[n] for n in names}


def test_every_operation_is_tested(live: Live) -> None:
    """The live document lists exactly the operations parametrized here: none skipped."""
    doc = live.doc
    assert doc == _DOC
    assert sorted((m, p) for m, p, *_ in OPERATIONS) == sorted(
        (m.upper(), p) for p, ms in doc["paths"].items() for m in ms)


@pytest.mark.parametrize(("doc", "method", "path", "mode"), _params())
def test_operation_conforms(live: Live, doc: str, method: str, path: str, mode: str) -> None:
    """Generated requests of one operation, checked against the live document ("live") or
    against it with the success schemas the routes declare ("declared")."""
    is_operator = next(o for m, p, o, *_ in OPERATIONS if (m, p) == (method, path))
    key = live.keys["OPS" if is_operator else "BUY"]
    operation = live.schemas[doc][path][method]
    options: dict[str, Any] = {}
    if mode == "real":
        options["path_parameters"] = _path_values(live, path)
    strategy = operation.as_strategy(GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE,
                                     **options)
    headers = {"Authorization": f"Bearer {key}"}
    seen: list[int] = []

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=live.server.http, session=live.session, headers=headers,
                                          checks=CHECKS, timeout=30)
        seen.append(response.status_code)

    check()
    assert seen, "no request was made"


def test_documented_errors_are_the_ones_sent(live: Live) -> None:
    """API.md: every documented response is the one sent. review13: FastAPI added its default 422
    (HTTPValidationError, {"detail": [...]}) to GET /api/v3/depth, which answers an invalid query
    with Binance's 400 {"code", "msg"}; and every problem response was documented under
    application/json as well, while problems are only sent as application/problem+json. (Schemathesis
    checks that what is sent is documented, not that what is documented is ever sent.)"""
    doc, problem_ref = live.doc, {"$ref": "#/components/schemas/Problem"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                where = f"{method.upper()} {path} {status}"
                assert "HTTPValidationError" not in str(response), where
                content = response.get("content", {})
                assert content.get("application/json", {}).get("schema") != problem_ref, where
                if PROBLEM in content:
                    assert content[PROBLEM]["schema"] == problem_ref, where
    assert "Problem" in doc["components"]["schemas"]
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])
    # A 422 stays where the server sends one (a problem), and the depth route documents its 400s.
    assert set(doc["paths"]["/v1/orders"]["post"]["responses"]["422"]["content"]) == {PROBLEM}
    depth = doc["paths"]["/api/v3/depth"]["get"]["responses"]
    assert set(depth) == {"200", "400", "413", "429"}, sorted(depth)
    assert set(depth["400"]["content"]) == {"application/json", PROBLEM}
    # What the server sends for the requests FastAPI calls invalid, and for a problem.
    for params in ({"symbol": SYMBOL, "limit": "x"}, {"symbol": SYMBOL, "limit": "0"}, {}):
        r = live.session.get(f"{live.server.http}/api/v3/depth", params=params, timeout=30)
        assert (r.status_code, r.headers["content-type"], set(r.json())) == (400, "application/json",
                                                                              {"code", "msg"}), r.text
    r = live.session.get(f"{live.server.http}/v1/instruments/NO-SUCH", timeout=30)
    assert (r.status_code, r.headers["content-type"]) == (404, PROBLEM), r.text
