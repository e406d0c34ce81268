"""The launch scenario, run against a real database: `carbonx demo` and the tests use it.

It registers the operator, developers and buyers, the three projects and their vintages, funds the
buyers, settles the launch subscriptions (7,900 t) at the reference price, and neutralises the
launch event by retiring 1.200 t with a certificate. Every step is idempotent, so a second run
changes nothing and reports what is already there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg

from exchange import ledger, otc, registry
from exchange.accounts import create_account
from exchange.errors import CarbonxError
from matching.units import parse_cash, parse_price, parse_tonnes


def load_scenario() -> dict:
    """The launch scenario shipped with the package."""
    return json.loads(resources.files("exchange.demo").joinpath("launch.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class DemoResult:
    certificate_code: str
    retired_kg: int
    serials: tuple[str, ...]
    first_run: bool


async def _ensure_account(conn: asyncpg.Connection, spec: dict, role: str = "member") -> bool:
    try:
        await create_account(conn, spec["code"], spec["name"], spec["kind"], role)
        return True
    except CarbonxError as e:
        if e.code != "account_exists":
            raise
        return False


async def run_scenario(conn: asyncpg.Connection, say: Callable[[str], None] = print) -> DemoResult:
    """Play the launch scenario; `say` receives one line per step."""
    sc = load_scenario()
    price = parse_price(sc["reference_price_cny_per_t"])
    created = await _ensure_account(conn, sc["operator"], role="operator")
    for p in sc["projects"]:
        await _ensure_account(conn, p["developer"])
    for b in sc["buyers"]:
        await _ensure_account(conn, b)
    say(f"accounts: {'created' if created else 'already there'} "
        f"(operator, {len(sc['projects'])} developers, {len(sc['buyers'])} buyers)")

    for p in sc["projects"]:
        try:
            await registry.add_project(conn, code=p["code"], name=p["name"], methodology=p["methodology"],
                                       developer=p["developer"]["code"], region=sc["region"], scheme=sc["scheme"])
        except CarbonxError as e:
            if e.code != "project_exists":
                raise
        proj = await registry.get_project(conn, p["code"])
        existing = {i.vintage for i in await registry.list_issuances(conn, proj.id)}
        for spec in p["issuances"]:
            if spec["vintage"] in existing:
                say(f"issuance {p['code']} {spec['vintage']}: already issued")
                continue
            i = await registry.issue(conn, project=p["code"], vintage=spec["vintage"],
                                     quantity_kg=parse_tonnes(spec["tonnes"]), reference="launch verification")
            say(f"issued {spec['tonnes']} t of {p['code']} {spec['vintage']}: {i.serial}")

    for code, amount in sc["deposits_cny"].items():
        pay = await ledger.deposit(conn, account=code, amount_fen=parse_cash(amount), reference=f"launch-{code}")
        say(f"deposit {amount} CNY for {code}: {'already recorded' if pay.replayed else 'recorded'}")

    developer_of = {p["code"]: p["developer"]["code"] for p in sc["projects"]}
    purchases = [*sc["subscriptions"], {"buyer": sc["event"]["organiser"], **sc["event"]["purchase"]}]
    for s in purchases:
        code, _ = registry.split_symbol(s["symbol"])
        sub = await otc.subscribe(conn, seller=developer_of[code], buyer=s["buyer"], symbol=s["symbol"],
                                  quantity_kg=parse_tonnes(s["tonnes"]), price_fen=price,
                                  reference=f"launch-{s['buyer']}-{s['symbol']}")
        state = "already settled" if sub.replayed else "settled DvP"
        say(f"subscription {s['buyer']} {s['tonnes']} t {s['symbol']} at {sc['reference_price_cny_per_t']}: {state}")

    ev = sc["event"]
    found = await conn.fetchrow(
        """SELECT r.certificate_code FROM retirements r JOIN accounts a ON a.id = r.account_id
           WHERE a.code = $1 AND r.purpose = $2 ORDER BY r.id LIMIT 1""",
        ev["organiser"], ev["name"],
    )
    if found is None:
        ret = await registry.retire(conn, account=ev["organiser"], quantity_kg=parse_tonnes(ev["footprint_tonnes"]),
                                    beneficiary=ev["retire_for"], purpose=ev["name"],
                                    symbol=ev["purchase"]["symbol"])
        code, first = ret.certificate_code, True
    else:
        code, first = found["certificate_code"], False
    cert = await registry.retirement_by_code(conn, code)
    if await ledger.ledger_total(conn) != 0:
        raise AssertionError("the cash ledger does not sum to zero")  # the database makes this impossible
    return DemoResult(code, cert["quantity_kg"], tuple(r["serial"] for r in cert["ranges"]), first)
