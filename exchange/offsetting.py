"""Offset in one step: buy the tonnes a footprint needs and retire them for a beneficiary.

:func:`offset` buys with a fill-or-kill limit order whose price is the highest the buyer's cash
cap allows (never above the instrument's band), so the purchase either fills completely within
the cap or does not happen at all; only then does it retire the bought credits for the
beneficiary and return the retirement with its certificate code. If the market cannot fill it,
nothing is bought or retired and the error says what is missing (how many tonnes are offered
within the cap, how many are needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.errors import CarbonxError
from exchange.registry import Retirement
from exchange.service import ExchangeService
from exchange.text import fits, unsafe
from matching import events as E
from matching.core import KEPT_COID_PREFIX
from matching.engine import InstrumentRules
from matching.risk import buy_reservation
from matching.units import format_cash, format_price, format_tonnes

# An offset's purchase under an idempotency key is the order with this client_order_id prefix and
# the key; order entry refuses the prefix (api/orders.py), or an offset could take a member's own
# order for its purchase. The core keeps these client_order_ids for good.
OFFSET_COID = KEPT_COID_PREFIX


@dataclass(frozen=True)
class Offset:
    order_id: int
    quantity_kg: int
    cost_fen: int  # value plus fees actually paid
    retirement: Retirement


def lowest_limit(rules: InstrumentRules) -> int:
    """The lowest price an order may name: the band's low end up on the tick grid, or one tick."""
    band = rules.band()
    low = -(-band[0] // rules.tick) * rules.tick if band else rules.tick
    return max(low, rules.tick)


def best_limit(service: ExchangeService, symbol: str, qty: int, max_cash: int) -> int:
    """The highest tick-aligned price whose worst-case cost of `qty` fits in `max_cash`, capped at
    the top of the band (or the book's price bound without a reference price); 0 when not even
    the band's lowest price fits (a price below the band would only be refused as out of band)."""
    listing = service.core.listings[symbol]
    rules = listing.rules
    band = rules.band()
    high = band[1] if band else rules.max_price
    high -= high % rules.tick
    fee_bp = max(listing.maker_bp, listing.taker_bp)
    low, best = lowest_limit(rules), 0
    while low <= high:  # the reservation grows with the price: binary search on ticks
        mid = (low // rules.tick + high // rules.tick) // 2 * rules.tick
        if buy_reservation(mid, qty, rules.lot, fee_bp) <= max_cash:
            best, low = mid, mid + rules.tick
        else:
            high = mid - rules.tick
    return best


def offered_within(service: ExchangeService, symbol: str, limit: int) -> int:
    """kg offered in the book at or below `limit`."""
    return sum(q for p, q in service.core.engine.book(symbol).depth(E.ASK, 1 << 30) if p <= limit)


def _reused(key: str) -> CarbonxError:
    return CarbonxError("idempotency_key_reused", f"Idempotency-Key {key!r} was used for another request")


async def _bought(service: ExchangeService, account_id: int, order_id: int) -> tuple[int, int]:
    """What an order of `account_id` bought (kg) and paid for it, fees included (fen), from the history."""
    await service.caught_up(orders=True)
    row = await service.pool.fetchrow(
        "SELECT coalesce(sum(qty_kg), 0)::bigint AS kg, coalesce(sum(value_fen + fee_fen), 0)::bigint AS paid "
        "FROM fills WHERE order_id = $1 AND account_id = $2", order_id, account_id)
    return row["kg"], row["paid"]


async def offset(service: ExchangeService, *, account: str, symbol: str, quantity_kg: int, max_cash_fen: int,
                 beneficiary: str, purpose: str, request: tuple[str, bytes] | None = None) -> Offset:
    """Buy `quantity_kg` within `max_cash_fen` and retire it. With `request` (idempotency key,
    request digest), a repeat answers with what the first made and buys and retires nothing more:
    the purchase carries the client_order_id `offset:KEY` (so the core never places it twice) and
    the retirement the key (ExchangeService.retire). A repeat after a purchase whose retirement
    never happened (the process stopped between) retires what was bought."""
    if symbol not in service.core.listings:
        raise CarbonxError("unknown_instrument", f"no instrument {symbol!r}")
    # Everything the retirement would refuse is refused before the purchase: a refusal after it
    # would leave the buyer holding credits it asked to retire, and its cash spent.
    if not fits(beneficiary, 200) or not fits(purpose, 500):
        raise CarbonxError("invalid_request", "beneficiary (1–200 characters) and purpose (1–500) are needed")
    for what, text in (("beneficiary", beneficiary), ("purpose", purpose)):
        why = unsafe(text)
        if why is not None:
            raise CarbonxError("invalid_request", f"{what}: {why}")
    account_id = await service.account(account)
    coid = earlier = None
    if request is not None:
        coid = OFFSET_COID + request[0]
        found = await service.retirement_by_request(account_id, request)
        # [order_id, symbol, side, kind, price, qty] of an earlier try's purchase, if one was made
        earlier = service.core.coids.get(account_id, {}).get(coid)
        if found is not None:
            if earlier is None:  # a retirement under this key, but no offset's purchase
                raise _reused(request[0])
            return Offset(earlier[0], found.quantity_kg, (await _bought(service, account_id, earlier[0]))[1], found)
    if earlier is not None:
        # It is this request's purchase only if it bought these tonnes within this request's cap: a
        # retry may name another max_cash, and an order offset:KEY from before order entry reserved
        # the prefix may rest unfilled at any price.
        kg, paid = await _bought(service, account_id, earlier[0])
        if kg != quantity_kg or paid > max_cash_fen:
            raise _reused(request[0])
    # An earlier try's purchase is asked for again at the price it was placed at: the band, and so
    # best_limit, may have moved since (a day's roll), and the core knows a repeat by its terms.
    limit = earlier[4] if earlier is not None else best_limit(service, symbol, quantity_kg, max_cash_fen)
    if limit == 0:
        raise CarbonxError("offset_not_filled",
                           f"max_cash {format_cash(max_cash_fen)} CNY cannot pay for {format_tonnes(quantity_kg)} t "
                           f"at any price in the band: the lowest, "
                           f"{format_price(lowest_limit(service.core.listings[symbol].rules))} CNY/t, would need "
                           "more (fees included). Nothing was bought or retired.")
    place = {"op": "place", "account": account_id, "symbol": symbol, "side": E.BID, "kind": E.LIMIT,
             "price": limit, "qty": quantity_kg, "tif": E.FOK}
    out = await service.submit(place if coid is None else {**place, "coid": coid})
    if out.code == "duplicate_client_order_id":  # the key's purchase was another
        raise _reused(request[0])
    if out.code == "fok_not_fillable":
        have = offered_within(service, symbol, limit)
        raise CarbonxError("offset_not_filled",
                           f"the market offers {format_tonnes(have)} t of {symbol} at or below {format_price(limit)} "
                           f"CNY/t (the most max_cash allows); {format_tonnes(quantity_kg)} t are needed, "
                           f"{format_tonnes(max(quantity_kg - have, 0))} t are missing. Nothing was bought or retired.")
    if out.code is not None:
        raise CarbonxError(out.code, out.detail or out.code)
    if out.duplicate:  # bought by an earlier try under this key, which did not retire
        cost = (await _bought(service, account_id, out.order_id))[1]
    else:
        cost = sum(ev[10] + ev[11] for ev in out.events if ev[0] == E.EV_TRADE)
    retirement = await service.retire(account=account, quantity_kg=quantity_kg, beneficiary=beneficiary,
                                      purpose=purpose, symbol=symbol, request=request)
    return Offset(out.order_id, quantity_kg, cost, retirement)
