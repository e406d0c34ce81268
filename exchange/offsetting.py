"""Offset in one step: buy the tonnes a footprint needs and retire them for a beneficiary.

:func:`offset` works out from the book what the cheapest offers of the tonnes cost, fees
included, and buys them with a fill-or-kill limit order at the price of the dearest of them
(never above the instrument's band), so the purchase either fills completely within the buyer's
cash cap or does not happen at all; only then does it retire the bought credits for the
beneficiary and return the retirement with its certificate code. If the market cannot fill it,
nothing is bought or retired and the error says why: how many tonnes are offered and how many
are needed, or what they cost against the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.errors import CarbonxError
from exchange.registry import Retirement
from exchange.service import ExchangeService
from exchange.text import fits, unsafe
from matching import events as E
from matching.core import KEPT_COID_PREFIX
from matching.risk import buyer_cost
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


def cheapest_fills(service: ExchangeService, symbol: str, account: int, qty: int) -> list[tuple[int, int]]:
    """The (price, kg) fills a fill-or-kill buy of `qty` by `account` takes from the book as it
    stands, cheapest first, within the band (possibly fewer kg than `qty`): ExchangeCore.taker_fills."""
    core = service.core
    rules = core.listings[symbol].rules
    band = rules.band()
    return core.taker_fills(symbol, account, band[1] if band else rules.max_price, qty, max(service.clock(), core.ts))


def _limit_within(service: ExchangeService, symbol: str, account: int, qty: int, max_cash: int) -> int:
    """The limit price of a fill-or-kill buy that takes the cheapest `qty` kg offered, refused
    (offset_not_filled, saying why) when the book does not hold them within the band or they cost
    more than `max_cash`. Sized from what the fills cost, not from the reservation's worst case,
    which on a 1 kg lot allows 2 fen a kilogram for rounding and asked for 2.4 times the cost
    (review31). Nothing is awaited between this and the order, so the order meets this book."""
    listing = service.core.listings[symbol]
    fills = cheapest_fills(service, symbol, account, qty)
    have = sum(kg for _, kg in fills)
    if have < qty:
        band = listing.rules.band()
        within = f" at or below {format_price(band[1])} CNY/t (the top of the band)" if band else ""
        raise CarbonxError("offset_not_filled",
                           f"the market offers {format_tonnes(have)} t of {symbol}{within}, not counting the "
                           f"buyer's own offers; {format_tonnes(qty)} t are needed, {format_tonnes(qty - have)} t "
                           "are missing. Nothing was bought or retired.")
    cost = buyer_cost(fills, listing.taker_bp)
    if cost > max_cash:
        raise CarbonxError("offset_not_filled",
                           f"{format_tonnes(qty)} t of {symbol} cost {format_cash(cost)} CNY now (fees included, at "
                           f"up to {format_price(fills[-1][0])} CNY/t), more than max_cash {format_cash(max_cash)} "
                           "CNY. Nothing was bought or retired.")
    band = listing.rules.band()
    return max(fills[-1][0], band[0]) if band else fills[-1][0]  # (an ask left below the band by a close)


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
    # An earlier try's purchase is asked for again at the price it was placed at: the band may have
    # moved since (a day's roll), and the core knows a repeat by its terms.
    limit = earlier[4] if earlier is not None else _limit_within(service, symbol, account_id, quantity_kg,
                                                                  max_cash_fen)
    place = {"op": "place", "account": account_id, "symbol": symbol, "side": E.BID, "kind": E.LIMIT,
             "price": limit, "qty": quantity_kg, "tif": E.FOK}
    out = await service.submit(place if coid is None else {**place, "coid": coid})
    if out.code == "duplicate_client_order_id":  # the key's purchase was another
        raise _reused(request[0])
    if out.code == "fok_not_fillable":  # an earlier try's price, or an expiry due just now
        have = sum(kg for price, kg in cheapest_fills(service, symbol, account_id, quantity_kg) if price <= limit)
        raise CarbonxError("offset_not_filled",
                           f"the market offers {format_tonnes(have)} t of {symbol} at or below {format_price(limit)} "
                           f"CNY/t; {format_tonnes(quantity_kg)} t are needed, "
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
