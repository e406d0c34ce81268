"""The demo's simulated market (exchange/demo/market.py) against a real service on the launch
scenario: it trades, and it leaves the newcomer's account (the launch event's organiser, whose
key `carbonx serve --demo` prints) and anyone else's orders alone."""

from __future__ import annotations

import asyncpg
import orjson

from exchange.demo.market import DemoMarket, open_demo_market
from exchange.demo.scenario import load_scenario, run_scenario
from exchange.service import ExchangeService
from matching import events as E
from matching.core import O_ACCOUNT


async def _demo(db: str) -> tuple[ExchangeService, list[str]]:
    """A started service on the launch scenario with the demo's instruments listed: it and them."""
    conn = await asyncpg.connect(db)
    try:
        await run_scenario(conn, say=lambda line: None)
    finally:
        await conn.close()
    svc = ExchangeService(db)
    await svc.start()
    return svc, await open_demo_market(svc)


def test_demo_market_trades_but_never_for_or_against_the_newcomers_orders(db, run) -> None:
    async def main() -> None:
        svc, symbols = await _demo(db)
        try:
            organiser = await svc.account(load_scenario()["event"]["organiser"])
            market = DemoMarket(svc, symbols, seed=7)
            await market.start()
            await market.stop()  # stepped by hand below, deterministically
            # The newcomer rests a bid at the bottom of each band, where the walk never trades.
            mine = []
            for symbol in symbols:
                low, _ = svc.core.listings[symbol].rules.band()
                out = await svc.submit({"op": "place", "account": organiser, "symbol": symbol, "side": E.BID,
                                        "price": low, "qty": svc.core.listings[symbol].rules.lot})
                assert out.accepted, out
                mine.append(out.order_id)
            seq0 = svc.core.seq
            for _ in range(600):
                market.step()
            await svc.submit({"op": "deposit", "account": organiser, "amount": 1, "ref": "demo-test-flush"})
            assert market.placed > 100 and svc.core.seq - seq0 > 400  # it did place and cancel
            assert all(oid in svc.core.orders for oid in mine), "the simulated market cancelled a newcomer's order"
            others = {o[O_ACCOUNT] for o in svc.core.orders.values()} - {organiser}
            assert others and others <= market.traders
            rows = await svc.pool.fetch("SELECT command, events FROM journal WHERE seq > $1", seq0)
            commands = [orjson.loads(r["command"]) for r in rows]
            assert not [c for c in commands if c.get("account") == organiser and c["op"] in ("place", "cancel")]
            assert any(ev[0] == E.EV_TRADE for r in rows for ev in orjson.loads(r["events"]))
            assert svc.core.check_invariants() == []
        finally:
            await svc.stop()

    run(main())


def test_demo_market_goes_on_trading_once_the_developers_have_sold_out(db, run) -> None:
    """The developers' stock gone (retired here), the simulated buyers resell what they hold and
    every market goes on trading; asks came only from the developers, and two of the four markets
    stood still within 40 minutes of a first start (review31)."""
    async def main() -> None:
        svc, symbols = await _demo(db)
        try:
            market = DemoMarket(svc, symbols, seed=11)
            await market.start()
            await market.stop()
            developers = {r["id"]: r["code"] for r in await svc.pool.fetch(
                "SELECT id, code FROM accounts WHERE id = ANY($1::bigint[])", list(market.sellers.values()))}
            for symbol, dev in market.sellers.items():
                kg = svc.core.position(symbol, dev)[0]
                if kg:
                    await svc.retire(account=developers[dev], quantity_kg=kg, beneficiary="Demo",
                                     purpose="the developer's stock out of the demo market", symbol=symbol)
                assert svc.core.position(symbol, dev) == (0, 0, 0)
            seq0 = svc.core.seq
            for _ in range(1500):
                market.step()
            await svc.caught_up()
            rows = await svc.pool.fetch("SELECT events FROM journal WHERE seq > $1", seq0)
            traded = {ev[1] for r in rows for ev in orjson.loads(r["events"]) if ev[0] == E.EV_TRADE}
            assert traded == set(symbols), (traded, symbols)
            assert svc.core.check_invariants() == []
        finally:
            await svc.stop()

    run(main())
