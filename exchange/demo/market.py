"""A small simulated market for `carbonx serve --demo`, so a newcomer sees live data at once.

After the launch scenario (exchange/demo/scenario.py) has run, :func:`open_demo_market` lists
each issued vintage (always open, reference price from the scenario, ±10 % band, T+0 so the
simulated buyers can also sell) and funds the buyers through the service. :class:`DemoMarket`
then places and cancels orders at a gentle pace, through the same service commands as any
member, from the developers (selling what they were issued) and the buyers other than the launch
event's organiser (the newcomer's account), who also resell what they bought: a random walk
around the reference price that trades now and then, for as long as the demo runs. Nothing
about it is special-cased in the exchange.
"""

from __future__ import annotations

import asyncio
import random

from exchange.demo.scenario import load_scenario
from exchange.errors import CarbonxError
from exchange.service import ExchangeService
from matching import events as E
from matching.core import O_ACCOUNT, O_SYMBOL
from matching.units import parse_price

DEMO_CASH = 50_000_000  # fen (500,000 CNY) per buyer, deposited once by reference


async def open_demo_market(service: ExchangeService) -> list[str]:
    """List the scenario's vintages and fund its buyers; idempotent. Returns the symbols."""
    sc = load_scenario()
    ref = parse_price(sc["reference_price_cny_per_t"])
    symbols = [f"{p['code']}-{i['vintage']}" for p in sc["projects"] for i in p["issuances"]]
    for symbol in symbols:
        if symbol not in service.core.listings:
            await service.list_instrument(symbol, {"rules": {"reference_price": ref, "always_open": True,
                                                             "band_bp": 1000},
                                                   "maker_bp": 5, "taker_bp": 10, "t1": False})
    for b in sc["buyers"]:
        account = await service.account(b["code"])
        cmd = {"op": "deposit", "account": account, "amount": DEMO_CASH, "ref": f"demo-cash-{b['code']}"}
        try:
            await service.prepare(cmd)
        except CarbonxError:
            continue  # funded on an earlier run
        await service.submit(cmd)
    return symbols


class DemoMarket:
    """Places and cancels orders for the demo accounts every `pace` seconds. The launch event's
    organiser is left out: its key is the one `carbonx serve --demo` hands the newcomer, whose
    account must show only what the newcomer did. Only the simulation's own participants' orders
    are tidied away, never an order someone placed through the API."""

    def __init__(self, service: ExchangeService, symbols: list[str], pace: float = 0.4, seed: int | None = None):
        self.service = service
        self.symbols = symbols
        self.pace = pace
        self.rng = random.Random(seed)
        self.task: asyncio.Task | None = None
        self.placed = 0

    async def start(self) -> None:
        sc = load_scenario()
        self.sellers = {f"{p['code']}-{i['vintage']}": await self.service.account(p["developer"]["code"])
                        for p in sc["projects"] for i in p["issuances"]}
        organiser = await self.service.account(sc["event"]["organiser"])
        self.buyers = [a for a in [await self.service.account(b["code"]) for b in sc["buyers"]] if a != organiser]
        self.sellers = {symbol: a for symbol, a in self.sellers.items() if a != organiser}
        self.traders = set(self.buyers) | set(self.sellers.values())
        self.task = asyncio.create_task(self._run(), name="carbonx-demo-market")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.pace * (0.5 + self.rng.random()))
            try:
                self.step()
            except CarbonxError:
                return  # the service stopped

    def step(self) -> None:
        rng, core = self.rng, self.service.core
        symbol = rng.choice(self.symbols)
        listing = core.listings[symbol]
        low, high = listing.rules.band()
        mid = (low + high) // 2
        # Tidy up now and then so the book stays readable.
        mine = [oid for oid, o in core.orders.items() if o[O_SYMBOL] == symbol and o[O_ACCOUNT] in self.traders]
        if len(mine) > 40 or (mine and rng.random() < 0.2):
            oid = rng.choice(mine)
            self.service.apply({"op": "cancel", "account": core.orders[oid][O_ACCOUNT], "order_id": oid})
            return
        qty = rng.choice((1, 1, 2, 3, 5, 10)) * listing.rules.lot
        spread = max(1, (high - low) // 40)
        # Whoever holds enough sells: the developer while its stock lasts, and the buyers resell
        # what they bought (T+0). With the developers alone the asks ran out, and two of the four
        # markets stood still within 40 minutes of a first start (review31).
        holders = [a for a in ([self.sellers[symbol]] if symbol in self.sellers else []) + self.buyers
                   if core.position(symbol, a)[0] >= qty]
        if rng.random() < 0.5 or not holders:
            price = min(high, max(low, mid + rng.randint(-3, 2) * spread))
            account, side = rng.choice(self.buyers), E.BID
        else:
            price = min(high, max(low, mid + rng.randint(-2, 3) * spread))
            account, side = rng.choice(holders), E.ASK
        self.service.apply({"op": "place", "account": account, "symbol": symbol, "side": side, "price": price,
                            "qty": qty})
        self.placed += 1
