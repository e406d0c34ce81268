"""Random sequences of issue / transfer / retire / freeze / unfreeze / cancel against a unit model.

The model tracks every kilogram (unit) of every issuance: who holds it and in what state. After
every step the database must agree unit for unit, every issuance's blocks must cover exactly its
range, adjacent blocks of one holder and state must be merged, and replaying the append-only
transfer history from nothing must give the blocks as they are. Refusals must come with the code
the model predicts and change nothing. A dry run of each retirement, freeze, unfreeze and cancel,
made first, must refuse exactly what the change refuses, move on paper what it moves, and change
nothing.
"""

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from exchange import registry
from exchange.accounts import create_account
from exchange.errors import CarbonxError
from exchange.serials import format_serial
from tests.registry_helpers import cover_violations

_runs = itertools.count()
VINTAGES = (2022, 2023)
HOLDERS = 3


def test_registry_agrees_with_unit_model(conn, run):
    class RegistryMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            n = next(_runs)
            self.project = f"P{n}"
            self.accounts = [f"M{n}A{i}" for i in range(HOLDERS)]
            self.ids: dict[str, int] = {}
            self.units: dict[int, list[tuple[str, str]]] = {}  # issuance id → [(holder, state)] from serial 1
            self.first: dict[int, int] = {}
            self.vintage_of: dict[int, int] = {}

            async def go():
                for code in self.accounts:
                    acct = await create_account(conn, code, code, "enterprise")
                    self.ids[code] = acct.id
                await registry.add_project(conn, code=self.project, name="p", methodology="other",
                                           developer=self.accounts[0])
            run(go())

        # -- model helpers ----------------------------------------------------------------
        def _vintage_units(self, vintage):
            for iss in sorted(i for i, v in self.vintage_of.items() if v == vintage):
                for k, u in enumerate(self.units[iss]):
                    yield iss, k, u

        def _registry_state(self):
            return run(conn.fetchrow(
                """SELECT (SELECT coalesce(max(id), 0) FROM transfers) AS transfers,
                          (SELECT coalesce(max(id), 0) FROM retirements) AS retirements,
                          (SELECT md5(coalesce(string_agg(concat_ws(' ', id, serials, owner_account_id, state),
                                                          ',' ORDER BY id), '')) FROM blocks) AS blocks"""))

        def _expect_dry_run_then(self, call, code, moved=None):
            """`call(dry_run)` dry, then for real: the same outcome, and the dry run changes nothing."""
            before = self._registry_state()
            try:
                result = run(call(True))
            except CarbonxError as e:
                assert e.code == code, f"the dry run refused with {e}, the model expects {code}"
            else:
                assert code is None, f"the dry run went through, the model expects {code}"
                if moved is not None:
                    assert result.quantity == moved, (result, moved)
            assert self._registry_state() == before, "a dry run changed the registry"
            return self._expect(call(False), code)

        def _expect(self, call, code):
            try:
                run(call)
            except CarbonxError as e:
                assert code is not None, f"unexpected refusal {e}"
                assert e.code == code, f"expected {code}, got {e}"
                return False
            assert code is None, f"expected a refusal {code}, but it went through"
            return True

        # -- rules ----------------------------------------------------------------------------
        @rule(vintage=st.sampled_from(VINTAGES), qty=st.integers(1, 40), holder=st.integers(0, HOLDERS - 1))
        def issue(self, vintage, qty, holder):
            iss = run(registry.issue(conn, project=self.project, vintage=vintage, quantity_kg=qty,
                                     to_account=self.accounts[holder]))
            expected_lo = 1 + sum(len(self.units[i]) for i, v in self.vintage_of.items() if v == vintage)
            assert (iss.lo, iss.hi) == (expected_lo, expected_lo + qty)
            self.units[iss.id] = [(self.accounts[holder], "available")] * qty
            self.first[iss.id] = iss.lo
            self.vintage_of[iss.id] = vintage

        def _move_lowest(self, vintage, holder, qty, to_holder, to_state):
            picked = [(i, k) for i, k, u in self._vintage_units(vintage) if u == (holder, "available")][:qty]
            if not any(v == vintage for v in self.vintage_of.values()):
                return "not_found", picked
            if len(picked) < qty:
                return "insufficient_credits", picked
            return None, picked

        @rule(vintage=st.sampled_from(VINTAGES), a=st.integers(0, HOLDERS - 1), b=st.integers(0, HOLDERS - 1),
              qty=st.integers(1, 30))
        def transfer(self, vintage, a, b, qty):
            src, dst = self.accounts[a], self.accounts[b]
            code, picked = self._move_lowest(vintage, src, qty, dst, "available")
            if src == dst:
                code = "invalid_request"
            ok = self._expect(registry.transfer(conn, from_account=src, to_account=dst, quantity_kg=qty,
                                                symbol=f"{self.project}-{vintage}", cause_ref="t"), code)
            if ok:
                for i, k in picked:
                    self.units[i][k] = (dst, "available")

        @rule(vintage=st.sampled_from(VINTAGES), a=st.integers(0, HOLDERS - 1), qty=st.integers(1, 20))
        def retire(self, vintage, a, qty):
            holder = self.accounts[a]
            code, picked = self._move_lowest(vintage, holder, qty, holder, "retired")
            ok = self._expect_dry_run_then(
                lambda dry: registry.retire(conn, account=holder, quantity_kg=qty, beneficiary="b", purpose="p",
                                            symbol=f"{self.project}-{vintage}", dry_run=dry), code)
            if ok:
                for i, k in picked:
                    self.units[i][k] = (holder, "retired")

        def _range_action(self, data, action, allowed, to_state):
            if not self.units:
                return
            iss = data.draw(st.sampled_from(sorted(self.units)))
            n = len(self.units[iss])
            lo = data.draw(st.integers(0, n - 1))
            hi = data.draw(st.integers(lo + 1, n))
            units = self.units[iss][lo:hi]
            bad = next((s for _, s in units if s not in allowed), None)
            code = None if bad is None else f"credits_{bad}"
            first = self.first[iss]
            serial = format_serial("CDHF", self.project, self.vintage_of[iss], first + lo, first + hi)
            if self._expect_dry_run_then(lambda dry: action(conn, serial=serial, reason="model", dry_run=dry), code,
                                         hi - lo):
                for k in range(lo, hi):
                    self.units[iss][k] = (self.units[iss][k][0], to_state)

        @rule(data=st.data())
        def freeze(self, data):
            self._range_action(data, registry.freeze, {"available"}, "frozen")

        @rule(data=st.data())
        def unfreeze(self, data):
            self._range_action(data, registry.unfreeze, {"frozen"}, "available")

        @rule(data=st.data())
        def cancel(self, data):
            self._range_action(data, registry.cancel, {"available", "frozen"}, "cancelled")

        # -- invariants -----------------------------------------------------------------------
        @invariant()
        def database_agrees_with_model(self):
            if not self.units:
                return
            code_of = {v: k for k, v in self.ids.items()}
            rows = run(conn.fetch(
                """SELECT issuance_id, lower(serials) AS lo, upper(serials) AS hi, owner_account_id, state
                   FROM blocks WHERE issuance_id = ANY($1::bigint[]) ORDER BY issuance_id, lower(serials)""",
                list(self.units)))
            seen: dict[int, list] = {i: [] for i in self.units}
            prev = None
            for r in rows:
                seen[r["issuance_id"]].extend([(code_of[r["owner_account_id"]], r["state"])] * (r["hi"] - r["lo"]))
                if prev is not None and prev["issuance_id"] == r["issuance_id"] and prev["hi"] == r["lo"] \
                        and prev["owner_account_id"] == r["owner_account_id"] and prev["state"] == r["state"]:
                    assert r["state"] in ("retired", "cancelled"), f"unmerged neighbours {prev} {r}"
                prev = r
            assert seen == self.units
            assert not run(cover_violations(conn))

        def teardown(self):
            if not self.units:
                return
            # The transfer history alone rebuilds the registry.
            replay: dict[int, list] = {}
            rows = run(conn.fetch(
                """SELECT issuance_id, lower(serials) AS lo, upper(serials) AS hi, from_account_id, from_state,
                          to_account_id, to_state, cause
                   FROM transfers WHERE issuance_id = ANY($1::bigint[]) ORDER BY id""", list(self.units)))
            code_of = {v: k for k, v in self.ids.items()}
            for r in rows:
                base = self.first[r["issuance_id"]]
                units = replay.setdefault(r["issuance_id"], [None] * len(self.units[r["issuance_id"]]))
                for k in range(r["lo"] - base, r["hi"] - base):
                    if r["cause"] == "issuance":
                        assert units[k] is None
                    else:
                        assert units[k] == (code_of[r["from_account_id"]], r["from_state"]), "history has a gap"
                    units[k] = (code_of[r["to_account_id"]], r["to_state"])
            assert replay == self.units

    run_state_machine_as_test(
        RegistryMachine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )
