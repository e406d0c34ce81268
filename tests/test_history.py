"""The order history (orders, fills, trades) written from the service's in-memory folding equals
the history folded again from the journal; and what a member reads after an acknowledgement is
already there."""

from __future__ import annotations

import functools
import random

import asyncpg
import pytest

from exchange import history
from exchange.database import connect_consumer
from exchange.service import ExchangeService
from matching import events as E
from tests.registry_helpers import world

SYMBOL = "FOREST-2023"


async def _tables(conn: asyncpg.Connection) -> tuple:
    return (await conn.fetch("SELECT * FROM orders ORDER BY order_id"),
            await conn.fetch("SELECT * FROM fills ORDER BY symbol, trade_id, side"),
            await conn.fetch("SELECT * FROM trades ORDER BY symbol, trade_id"))


async def _random_trading(dsn: str, seed: int, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    await world(conn)
    await conn.close()
    svc = ExchangeService(dsn, flush_interval=0.0005)
    await svc.start()
    try:
        assert (await svc.list_instrument(SYMBOL, {"rules": {"always_open": True}, "maker_bp": 5,
                                                   "taker_bp": 10})).accepted
        dev, buy = await svc.account("DEV"), await svc.account("BUY")
        assert (await svc.submit({"op": "deposit", "account": buy, "amount": 10**9, "ref": "h1"})).accepted
        rng = random.Random(seed)
        pending = []
        for i in range(n):
            r = rng.random()
            open_ids = list(svc.core.orders)
            if r < 0.2 and open_ids:
                oid = rng.choice(open_ids)
                cmd = {"op": "cancel", "account": svc.core.orders[oid][1], "order_id": oid}
            elif r < 0.3 and open_ids:
                oid = rng.choice(open_ids)
                o = svc.core.orders[oid]
                cmd = {"op": "amend", "account": o[1], "order_id": oid, "price": o[4] or 3500,
                       "qty": max(1000, o[5] - 1000)}
            else:
                side = rng.choice((E.BID, E.ASK))
                kind = E.MARKET if rng.random() < 0.1 else E.LIMIT
                cmd = {"op": "place", "account": buy if side == E.BID else dev, "symbol": SYMBOL, "side": side,
                       "kind": kind, "qty": rng.randint(1, 5) * 1000, "coid": f"c{i}"}
                if kind == E.LIMIT:
                    cmd["price"] = 3500 + rng.randint(-20, 20)
                    cmd["tif"] = rng.choice((E.GTC, E.GTC, E.IOC, E.FOK))
                elif side == E.BID:
                    cmd["cash_cap"] = 500_000
            _, durable = svc.apply(cmd)
            pending.append(durable)
            if len(pending) > 50:
                for d in pending:
                    await d
                pending = []
        for d in pending:
            await d
        await svc.caught_up(orders=True)
        # Every acknowledged order is readable at once from the tracker, and from the tables.
        assert await svc.pool.fetchval("SELECT count(*) FROM orders") >= len(svc.core.orders)
    finally:
        await svc.stop()


@pytest.mark.parametrize("limit", [history.BATCH, 7])
def test_history_from_memory_equals_history_from_journal(db, run, limit):
    """Also when folded from the journal a few entries at a time, where most orders change in a
    later batch than the one that placed them (an update, not a new row)."""
    run(_random_trading(db, seed=7, n=600))

    async def compare() -> None:
        conn = await asyncpg.connect(db)
        try:
            live = await _tables(conn)
            assert len(live[2]) > 20, "the random stream should trade"
            async with conn.transaction():
                await conn.execute("DELETE FROM fills; DELETE FROM trades; DELETE FROM orders")
                await conn.execute("UPDATE journal_consumers SET seq = 0 WHERE name = $1", history.NAME)
            await history.catch_up(conn, limit=limit)
            again = await _tables(conn)
            for a, b in zip(live, again, strict=True):
                assert [dict(r) for r in a] == [dict(r) for r in b]
            # The fills of every order add up to its filled quantity, value and fee.
            bad = await conn.fetch(
                """SELECT o.order_id FROM orders o LEFT JOIN fills f ON f.order_id = o.order_id
                   GROUP BY o.order_id, o.filled_kg, o.value_fen, o.fee_fen, o.notional
                   HAVING coalesce(sum(f.qty_kg), 0) <> o.filled_kg OR coalesce(sum(f.value_fen), 0) <> o.value_fen
                       OR coalesce(sum(f.fee_fen), 0) <> o.fee_fen
                       OR coalesce(sum(f.price_fen::numeric * f.qty_kg), 0) <> o.notional""")
            assert bad == []
        finally:
            await conn.close()

    run(compare())


def test_an_orders_average_price_is_the_average_of_its_fill_prices_on_a_1_kg_lot(db, run):
    """On a 1 kg lot each trade's value rounds to the fen, so an average taken from values was
    off: one 1 kg fill at 35.00 averaged 40.00, above the buy's limit, and 61 kg at 35.04 gave
    35.08. The average is the fills' price x quantity over the quantity, half up, in the tracker
    and in the table (after a restart)."""
    async def main() -> None:
        conn = await asyncpg.connect(db)
        await world(conn)
        await conn.close()
        svc = ExchangeService(db)
        await svc.start()
        try:
            listing = {"rules": {"always_open": True, "lot": 1, "min_qty": 1}}
            assert (await svc.list_instrument(SYMBOL, listing)).accepted
            dev, buy = await svc.account("DEV"), await svc.account("BUY")
            await svc.submit({"op": "deposit", "account": buy, "amount": 10**7, "ref": "a1"})
            await svc.submit({"op": "place", "account": dev, "symbol": SYMBOL, "side": E.ASK, "price": 3500, "qty": 1})
            one = await svc.submit({"op": "place", "account": buy, "symbol": SYMBOL, "side": E.BID, "price": 3500,
                                    "qty": 1})
            await svc.submit({"op": "place", "account": dev, "symbol": SYMBOL, "side": E.ASK, "price": 3504,
                              "qty": 61})
            two = await svc.submit({"op": "place", "account": buy, "symbol": SYMBOL, "side": E.BID, "price": 3510,
                                    "qty": 61})
            await svc.submit({"op": "place", "account": dev, "symbol": SYMBOL, "side": E.ASK, "price": 3501,
                              "qty": 2})
            three = await svc.submit({"op": "place", "account": buy, "symbol": SYMBOL, "side": E.BID, "price": 3510,
                                      "qty": 3})  # 2 kg at 35.01 and rests: 35.01
            await svc.submit({"op": "place", "account": dev, "symbol": SYMBOL, "side": E.ASK, "price": 3510,
                              "qty": 1})  # and 1 kg at 35.10: (7002 + 3510) / 3 = 3504
            expect = {one.order_id: 3500, two.order_id: 3504, three.order_id: 3504}
            assert {o: history.average_price(svc.orders.get(o)) for o in expect} == expect
        finally:
            await svc.stop()
        conn = await asyncpg.connect(db)
        try:
            rows = await conn.fetch("SELECT * FROM orders WHERE order_id = ANY($1::bigint[])", list(expect))
            assert {r["order_id"]: history.average_price(history.order_from_row(r)) for r in rows} == expect
        finally:
            await conn.close()

    run(main())


def test_history_account_keys_are_checked_per_statement(conn, run):
    """0008 checks orders' and fills' account keys once per statement instead of a foreign key per
    row: a missing account is still refused (by INSERT and by COPY), an account never changes,
    and an account an order or a fill names cannot be deleted or renumbered."""

    async def body():
        await world(conn)
        dev = await conn.fetchval("SELECT id FROM accounts WHERE code = 'DEV'")
        lone = await conn.fetchval("INSERT INTO accounts (code, name, kind, role) "
                                   "VALUES ('LONE', 'Lone', 'enterprise', 'member') RETURNING id")
        order = (1, lone, SYMBOL, "sell", "limit", "GTC", False, 3500, 1000, 1000, 0, 0, 0, None, None, None,
                 "new", None, 1, 1, 0)
        fill = (SYMBOL, 1, 1, lone, "sell", "maker", 3500, 1000, 3500, 0, 1, 1)
        fill_columns = ("symbol", "trade_id", "order_id", "account_id", "side", "liquidity", "price_fen", "qty_kg",
                        "value_fen", "fee_fen", "ts", "seq")
        missing = 10**9
        for table, row, columns in (("orders", order, history._ORDER_COLUMNS), ("fills", fill, fill_columns)):
            other = {"account_id": missing, "order_id" if table == "orders" else "trade_id": 2}
            bad = tuple(other.get(c, v) for c, v in zip(columns, row, strict=True))
            with pytest.raises(asyncpg.ForeignKeyViolationError, match=f"{table}.account_id .*{missing}"):
                await conn.copy_records_to_table(table, columns=columns, records=[row, bad])
            with pytest.raises(asyncpg.ForeignKeyViolationError, match=str(missing)):
                await conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                   f"({', '.join(f'${i + 1}' for i in range(len(columns)))})", *bad)
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            await conn.copy_records_to_table(table, columns=columns, records=[row])
            with pytest.raises(asyncpg.ForeignKeyViolationError, match="never changes"):
                await conn.execute(f"UPDATE {table} SET account_id = $1", dev)
            await conn.execute(f"UPDATE {table} SET account_id = account_id, ts = ts" if table == "fills"
                               else "UPDATE orders SET status = 'cancelled', remaining_kg = 0")
            for change in ("DELETE FROM accounts WHERE id = $1", "UPDATE accounts SET id = DEFAULT WHERE id = $1"):
                with pytest.raises(asyncpg.ForeignKeyViolationError, match="orders or fills"):
                    await conn.execute(change, lone)
            await conn.execute(f"DELETE FROM {table}")
        # A snapshot older than a reference committed meanwhile would miss it: not under READ COMMITTED.
        for isolation in ("repeatable_read", "serializable"):
            with pytest.raises(asyncpg.ForeignKeyViolationError, match="READ COMMITTED"):
                async with conn.transaction(isolation=isolation):
                    await conn.execute("DELETE FROM accounts WHERE id = $1", lone)
        await conn.execute("DELETE FROM accounts WHERE id = $1", lone)  # named by nothing now

    run(body())


def test_consumer_connections_plan_each_batch_for_its_arguments(db, run):
    """The history writer's statements run once per batch on a table that grows by a batch each
    time: on a consumer connection they are planned for their arguments every time, never by a
    cached generic plan made while the table was nearly empty (on a plain connection the same
    run settles on generic plans)."""
    run(_random_trading(db, seed=3, n=300))

    async def replay(connect) -> tuple[int, int]:
        conn = await connect(db)
        try:
            async with conn.transaction():
                await conn.execute("DELETE FROM fills; DELETE FROM trades; DELETE FROM orders")
                await conn.execute("UPDATE journal_consumers SET seq = 0 WHERE name = $1", history.NAME)
            await history.catch_up(conn, limit=5)
            return tuple(await conn.fetchrow(  # the statements with arguments (the rest have one plan)
                "SELECT sum(generic_plans), sum(custom_plans) FROM pg_prepared_statements "
                "WHERE cardinality(parameter_types) > 0"))
        finally:
            await conn.close()

    generic, custom = run(replay(functools.partial(connect_consumer, name="history")))
    assert generic == 0 and custom > 50
    generic, _ = run(replay(asyncpg.connect))
    assert generic > 0, "a plain connection should have cached generic plans (else this test shows nothing)"


@pytest.mark.parametrize("watched", [(), (1,)])
def test_a_commit_is_folded_so_each_command_is_answered_as_it_left_the_order(watched):
    """One commit: the seller places 5 t, two buyers take 1 t each, the seller amends the rest,
    then cancels. Each command's answer (as_of its seq) is the order as that command left it; a
    trade by someone else changes the order in place unless the seller watches its private feed,
    whose per-entry states must then stay apart too."""
    from matching.core import ExchangeCore
    from tests.test_core import T0, amend, buy, cancel, make_core, ok, sell

    core: ExchangeCore = make_core("cython", cash=((2, 1_000_000), (3, 1_000_000)))
    cmds = [sell(1, 3500, 5000), buy(2, 3500, 1000), buy(3, 3500, 1000)]
    entries = []
    for cmd in cmds:
        out = ok(core, cmd)
        entries.append((out.seq, T0, cmd, out.events))
    ask = entries[0][3]
    oid = next(ev[2] for ev in ask if ev[0] == E.EV_ACCEPTED)
    for cmd in (amend(1, oid, 3500, 2000), cancel(1, oid)):
        out = ok(core, cmd)
        entries.append((out.seq, T0, cmd, out.events))
    tracker = history.OrderTracker()
    tracker.watched = watched
    folded = tracker.apply_commit(entries)
    seqs = [e[0] for e in entries]

    def state(o):
        return (o.status, o.remaining, o.filled, len(o.fills))
    assert state(tracker.as_of(seqs[0], oid)) == ("new", 5000, 0, 0)  # the place's answer
    assert state(tracker.as_of(seqs[3], oid)) == ("partially_filled", 2000, 2000, 2)  # the amend's
    assert state(tracker.as_of(seqs[4], oid)) == ("cancelled", 0, 2000, 2)  # the cancel's
    assert state(tracker.get(oid)) == ("cancelled", 0, 2000, 2)
    per_entry = [state(f.orders[oid]) for f in folded]
    if watched:
        assert per_entry == [("new", 5000, 0, 0), ("partially_filled", 4000, 1000, 1),
                             ("partially_filled", 3000, 2000, 2), ("partially_filled", 2000, 2000, 2),
                             ("cancelled", 0, 2000, 2)]
    else:  # the first trade copied the placed order; the second changed that copy in place
        assert per_entry[0] == ("new", 5000, 0, 0)
        assert folded[1].orders[oid] is folded[2].orders[oid] is folded[3].orders[oid] is not folded[0].orders[oid]
        assert per_entry[1] == per_entry[2] == per_entry[3] == ("partially_filled", 2000, 2000, 2)


def test_the_tracker_keeps_an_orders_newest_fills_only():
    """A maker's order filled thousands of times: the tracker keeps its newest fills (what a view
    shows), not all; copies made for a watched owner copy those only. Copying them all made each
    trade of a commit cost more with the order's history (review14: 176 MB and 279 ms for a
    commit of 1,000 trades against an order with 20,000 earlier fills)."""
    from matching.core import ExchangeCore
    from tests.test_core import T0, buy, make_core, ok, sell

    core: ExchangeCore = make_core("cython", cash=((2, 10**12),), lot=1, min_qty=1,
                                   holdings=((1, 10**9),))
    ask = ok(core, sell(1, 3500, 10**8))
    tracker = history.OrderTracker()
    tracker.watched = (1,)
    oid = ask.order_id
    tracker.apply_commit([(ask.seq, T0, sell(1, 3500, 10**8), ask.events)])
    for _ in range(5):
        entries = []
        for _ in range(1000):
            cmd = buy(2, 3500, 1)
            out = core.apply(cmd, T0)  # not ok(): its invariant check per command would take minutes
            assert out.code is None, out
            entries.append((out.seq, T0, cmd, out.events))
        folded = tracker.apply_commit(entries)
        assert all(len(f.orders[oid].fills) < 2 * history.VIEW_FILLS for f in folded)
    o = tracker.get(oid)
    assert o.filled == 5000 and history.VIEW_FILLS <= len(o.fills) < 2 * history.VIEW_FILLS
    assert [f.seq for f in o.fills] == sorted(f.seq for f in o.fills) and o.fills[-1].seq == core.seq
    assert history.fills_known(o)


def _state(o: history.OrderState) -> tuple:
    """What a view of the order shows (its fills by trade id)."""
    return (o.status, o.reason, o.price, o.quantity, o.remaining, o.filled, o.value, o.fee, o.notional,
            o.updated_ts, tuple((f.symbol, f.trade_id) for f in o.fills[-history.VIEW_FILLS:]))


@pytest.mark.parametrize("watch_all", [False, True])
def test_commits_of_any_size_answer_each_command_as_folding_one_by_one_would(watch_all):
    """Random command streams (tests/test_core.py's Stream: orders, trades, amends, cancels,
    expiries, day closes over two instruments) cut into commits at random: each owner's command
    is answered (as_of) with the order as folding the entries one at a time left it, and for
    watched accounts every entry's Folded shows each order as that entry left it."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from matching.core import ExchangeCore
    from tests.test_core import SETTINGS, Stream, steps

    @settings(max_examples=60, **SETTINGS)
    @given(seeds=steps, cuts=st.lists(st.integers(1, 40), min_size=1, max_size=60))
    def check(seeds, cuts):
        stream = Stream([ExchangeCore("cython")])
        for seed in seeds:
            stream.step(seed)
        entries = [(out.seq, ts, cmd, out.events) for cmd, ts, out in stream.log]
        one = history.OrderTracker()  # the truth: an entry per commit
        truth: list[dict[int, tuple]] = []
        for entry in entries:
            (folded,) = one.apply_commit([entry])
            truth.append({oid: _state(o) for oid, o in folded.orders.items()})
        batched = history.OrderTracker()
        if watch_all:
            batched.watched = range(1, 100)
        at, i = 0, 0
        while at < len(entries):
            commit = entries[at:at + cuts[i % len(cuts)]]
            folded = batched.apply_commit(commit)
            for k, (entry, f) in enumerate(zip(commit, folded, strict=True)):
                seq, _, cmd, _ = entry
                expected = truth[at + k]
                for oid, o in f.orders.items():
                    if watch_all or o.account == cmd.get("account"):
                        assert _state(batched.as_of(seq, oid)) == expected[oid], (seq, cmd, oid)
                    if watch_all:
                        assert _state(o) == expected[oid], (seq, cmd, oid)
            at += len(commit)
            i += 1
        assert {oid: _state(o) for oid, o in batched.open.items()} == \
            {oid: _state(o) for oid, o in one.open.items()}

    check()


def test_each_instruments_traded_total_follows_its_trades(conn, run):
    """instrument_volume (migration 0013) is kept by the database as trades are written, whoever
    writes them and however (COPY in batches, INSERT), so a project page reads totals instead of
    summing every trade; a trade is never changed."""
    async def main():
        async def totals() -> dict[str, int]:
            return dict(await conn.fetch("SELECT symbol, traded_kg FROM instrument_volume"))

        async def sums() -> dict[str, int]:
            return dict(await conn.fetch("SELECT symbol, sum(qty_kg)::bigint FROM trades GROUP BY symbol"))
        rng = random.Random(13)
        rows = [(rng.choice(["A-2023", "B-2024"]), i, 3500, rng.randint(1, 9_000), "buy", i, i) for i in range(1, 400)]
        columns = ("symbol", "trade_id", "price_fen", "qty_kg", "taker_side", "ts", "seq")
        await conn.copy_records_to_table("trades", columns=columns, records=rows[:300])
        await conn.executemany("INSERT INTO trades VALUES ($1, $2, $3, $4, $5, $6, $7)", rows[300:])
        assert await totals() == await sums() and set(await totals()) == {"A-2023", "B-2024"}
        await conn.execute("DELETE FROM trades WHERE trade_id % 3 = 0")
        assert await totals() == {**dict.fromkeys(await totals(), 0), **await sums()}
        with pytest.raises(asyncpg.RaiseError, match="not changed"):
            await conn.execute("UPDATE trades SET qty_kg = qty_kg + 1 WHERE trade_id = 1")

    run(main())
