"""The `carbonx` command line as a user runs it: real subprocesses, real PostgreSQL."""

import asyncio
import os
import re
import subprocess
import sys

import orjson
import pytest

from exchange.errors import CarbonxError


def carbonx(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARBONX_DATA_DIR")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, env=full_env,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"carbonx {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_demo_on_embedded_postgres_twice(tmp_path):
    data = tmp_path / "data"
    first = carbonx("demo", "--data-dir", str(data))
    assert "retired 1.200 t for the launch event" in first.stdout
    code = re.search(r"certificate code: (CX-[A-Z0-9-]+)", first.stdout).group(1)
    serials = re.findall(r"^  (CDHF-\S+)$", first.stdout, re.M)
    assert serials and all(s.startswith("CDHF-LQS-FS-2023-") for s in serials)
    # The server under the data dir was stopped when the command ended, and starts again now.
    second = carbonx("demo", "--data-dir", str(data))
    assert "already retired 1.200 t" in second.stdout
    assert f"certificate code: {code}" in second.stdout
    assert re.findall(r"^  (CDHF-\S+)$", second.stdout, re.M) == serials
    history = carbonx("registry", "serial", serials[0], "--data-dir", str(data))
    assert "retirement" in history.stdout and "EVENT-ORG/retired" in history.stdout


@pytest.fixture
def url_env(db):
    return {"DATABASE_URL": db}


def test_commands_against_database_url(url_env):
    out = carbonx("accounts", "create", "KILN-DEV", "--kind", "project_developer", env=url_env).stdout
    assert re.match(r"^cx_[A-Za-z0-9_-]{20,}$", out.strip().splitlines()[-1]), "the API key is the last line"
    carbonx("accounts", "create", "HOTEL", "--kind", "scenic_area", env=url_env)
    # Keys: another, the earlier ones revoked with it; then every one revoked (review33).
    out = carbonx("accounts", "new-key", "KILN-DEV", "--revoke-others", env=url_env).stdout
    assert "1 earlier key(s) revoked" in out and re.match(r"^cx_[A-Za-z0-9_-]{20,}$", out.strip().splitlines()[-1])
    assert "1 API key(s) of KILN-DEV revoked" in carbonx("accounts", "revoke-keys", "KILN-DEV", env=url_env).stdout
    carbonx("registry", "project", "add", "KILN", "--name", "Kiln", "--methodology", "energy_substitution",
            "--developer", "KILN-DEV", env=url_env)
    out = carbonx("registry", "issue", "KILN", "2023", "3600.000", env=url_env).stdout
    assert "CDHF-KILN-2023-0000000001-0003600000" in out
    out = carbonx("registry", "transfer", "KILN-DEV", "HOTEL", "10.5", "--symbol", "KILN-2023",
                  "--reference", "otc-1", env=url_env).stdout
    assert "CDHF-KILN-2023-0000000001-0000010500" in out
    out = carbonx("registry", "retire", "HOTEL", "1.2", "--symbol", "KILN-2023", "--beneficiary", "Hotel",
                  "--purpose", "Zero-carbon weekend", env=url_env).stdout
    assert re.search(r"certificate: CX-", out)
    carbonx("registry", "freeze", "CDHF-KILN-2023-0000010501-0000020000", "--reason", "audit", env=url_env)
    carbonx("registry", "unfreeze", "CDHF-KILN-2023-0000010501-0000015000", "--reason", "cleared", env=url_env)
    carbonx("registry", "cancel", "CDHF-KILN-2023-0000015001-0000020000", "--reason", "reversal", env=url_env)
    out = carbonx("registry", "show", "KILN-2023", env=url_env).stdout
    assert "cancelled" in out and "retired" in out
    out = carbonx("cash", "deposit", "HOTEL", "1000.50", "--reference", "bank-9", env=url_env).stdout
    assert "balance 1000.50 CNY" in out
    out = carbonx("cash", "deposit", "HOTEL", "1000.50", "--reference", "bank-9", env=url_env).stdout
    assert "already recorded" in out and "balance 1000.50 CNY" in out
    status = carbonx("db", "status", env=url_env).stdout
    assert "0002_cash_ledger: applied" in status


@pytest.mark.parametrize(("args", "code"), [
    (["registry", "issue", "KILN", "2023", "1.2345"], "too_many_decimals"),
    (["registry", "issue", "KILN", "2023", "0"], "invalid_quantity"),
    (["registry", "issue", "NOPE", "2023", "1"], "not_found"),
    (["registry", "transfer", "A", "B", "1", "--symbol", "KILN-2023", "--reference", "r"], "not_found"),
    (["cash", "deposit", "NOBODY", "1.001", "--reference", "r"], "too_many_decimals"),
    (["registry", "serial", "nonsense"], "invalid_serial"),
    (["registry", "show", "99999999999999999999"], "invalid_request"),
    (["registry", "project", "add", "P9", "--name", "x", "--methodology", "other", "--developer", "KILN-DEV",
      "--scheme", "bad scheme"], "invalid_project"),
])
def test_bad_input_exits_1_with_a_clear_message(url_env, args, code):
    proc = carbonx(*args, env=url_env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and f"[{code}]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_reads_well():
    out = carbonx("--help").stdout
    for word in ("demo", "registry", "accounts", "cash", "db", "replay"):
        assert word in out


def test_ctrl_c_stops_serve_cleanly_without_alarm(url_env):
    """Ctrl-C in a terminal signals the whole foreground process group. The journal consumers'
    process takes its orders from the server (stop, or the end of its input), not from the
    terminal: the server stops cleanly and does not report its consumers as having died."""
    import signal

    from tests.api_helpers import said_until_ready

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARBONX_DATA_DIR")}
    env.update(url_env)
    proc = subprocess.Popen([sys.executable, "-m", "api", "serve", "--http-port", "0", "--ws-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # a group of its own, as a shell gives a job
    try:
        said = said_until_ready(proc.stdout, "carbonx serve", timeout=60)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = said + "\n" + out
    assert "stopped cleanly" in text, text
    assert "consumers process ended" not in text, text
    assert proc.returncode in (0, 130), (proc.returncode, text)


def kiln_and_hotel(env: dict) -> None:
    """Through the command line: KILN-DEV's project KILN with 100 t of 2023 issued, and HOTEL
    with 1,000 CNY deposited (reference bank-1)."""
    carbonx("accounts", "create", "KILN-DEV", "--kind", "project_developer", env=env)
    carbonx("accounts", "create", "HOTEL", "--kind", "scenic_area", env=env)
    carbonx("registry", "project", "add", "KILN", "--name", "Kiln", "--methodology", "energy_substitution",
            "--developer", "KILN-DEV", env=env)
    carbonx("registry", "issue", "KILN", "2023", "100", env=env)
    carbonx("cash", "deposit", "HOTEL", "1000", "--reference", "bank-1", env=env)


def test_member_changes_wait_for_the_journal_to_be_settled(url_env, db, run):
    """After a stop that left journal entries unsettled (here: a service that did not project, as
    a crash would leave it), a change to member cash or credits is refused until `clearing settle`
    ran: the journal may have promised them to an order or a trade, and the next start could not
    settle it (a withdrawal paid the buyer's trade out again and the exchange could not start)."""
    import asyncpg

    from exchange.service import ExchangeService
    from matching import events as E

    kiln_and_hotel(url_env)

    async def trade_unsettled() -> None:
        await (await _started(ExchangeService(db))).stop()  # takes in the deposit made while stopped
        svc = await _started(ExchangeService(db, project=False))
        try:
            await svc.list_instrument("KILN-2023", {"rules": {"always_open": True}})
            dev, hotel = await svc.account("KILN-DEV"), await svc.account("HOTEL")
            await svc.submit({"op": "place", "account": dev, "symbol": "KILN-2023", "side": E.ASK, "price": 3500,
                              "qty": 10_000})
            await svc.submit({"op": "place", "account": hotel, "symbol": "KILN-2023", "side": E.BID,
                              "price": 3500, "qty": 10_000})
        finally:
            await svc.stop()
    run(trade_unsettled())

    for args in (["cash", "withdraw", "HOTEL", "1000", "--reference", "out-1"],
                 ["registry", "freeze", "KILN-2023", "--reason", "audit"]):
        proc = carbonx(*args, env=url_env, check=False)
        assert proc.returncode == 1 and "[unsettled_journal]" in proc.stderr, proc.stderr
        assert "clearing settle" in proc.stderr
    carbonx("clearing", "settle", env=url_env)
    out = carbonx("cash", "withdraw", "HOTEL", "100", "--reference", "out-2", env=url_env).stdout
    assert "balance 550.00 CNY" in out, out  # 1,000 - 350 for the 10 t - 100 withdrawn (no fees)

    async def balance() -> int:
        conn = await asyncpg.connect(db)
        try:
            return await conn.fetchval("SELECT balance_fen FROM cash_balances b JOIN accounts a ON a.id = "
                                       "b.account_id WHERE a.code = 'HOTEL'")
        finally:
            await conn.close()
    assert run(balance()) == 55_000
    assert carbonx("reconcile", env=url_env).returncode == 0


def test_a_withdrawal_while_stopped_leaves_what_open_buys_reserve(url_env, db, run):
    """A resting buy reserves 876.13 CNY of HOTEL's 1,000: a withdrawal while the exchange is stopped
    may take the rest, not that. It used to take it all; the next start let the buy trade with cash
    that had left, the settlement could not be posted, and the exchange never started again. A
    payout made by hand anyway is refused at start, naming the account, until it is made good."""
    import asyncpg

    from exchange import ledger
    from exchange.errors import CarbonxError
    from exchange.service import ExchangeService
    from matching import events as E

    kiln_and_hotel(url_env)

    async def resting_buy() -> int:
        svc = await _started(ExchangeService(db))
        try:
            await svc.list_instrument("KILN-2023", {"rules": {"always_open": True}, "taker_bp": 10})
            hotel = await svc.account("HOTEL")
            out = await svc.submit({"op": "place", "account": hotel, "symbol": "KILN-2023", "side": E.BID,
                                    "price": 3500, "qty": 25_000})
            assert out.accepted, out
            return svc.core.cash[hotel][1]
        finally:
            await svc.stop()
    reserved = run(resting_buy())
    assert 87_500 < reserved < 100_000, reserved

    proc = carbonx("cash", "withdraw", "HOTEL", "1000.00", "--reference", "out-1", env=url_env, check=False)
    assert proc.returncode == 1 and "[insufficient_funds]" in proc.stderr and "reserve" in proc.stderr, proc.stderr
    free = f"{(100_000 - reserved) // 100}.{(100_000 - reserved) % 100:02d}"
    proc = carbonx("cash", "withdraw", "HOTEL", free, "--reference", "out-2", env=url_env, check=False)
    left = f"balance {reserved // 100}.{reserved % 100:02d} CNY"
    assert proc.returncode == 0 and left in proc.stdout, (proc.stdout, proc.stderr)
    assert carbonx("reconcile", env=url_env).returncode == 0

    async def by_hand_then_start() -> None:
        conn = await asyncpg.connect(db)
        try:
            await ledger.withdraw(conn, account="HOTEL", amount_fen=reserved, reference="by-hand")  # no check
            svc = ExchangeService(db)
            with pytest.raises(CarbonxError) as err:
                await svc.start()
            assert err.value.code == "reserved_cash_withdrawn" and "HOTEL" in err.value.message, err.value
            assert "deposit" in err.value.message
            await ledger.deposit(conn, account="HOTEL", amount_fen=reserved, reference="made-good")
        finally:
            await conn.close()
        svc = await _started(ExchangeService(db))  # nothing was journaled by the refused start
        try:
            dev = await svc.account("KILN-DEV")
            sold = await svc.submit({"op": "place", "account": dev, "symbol": "KILN-2023", "side": E.ASK,
                                     "price": 3500, "qty": 25_000})
            assert sold.accepted and svc.core.check_invariants() == []
            assert await svc.reconcile() == []
        finally:
            await svc.stop()
        assert svc.failure is None
    run(by_hand_then_start())


def test_cash_an_expired_gtd_buy_reserved_may_be_paid_out_while_stopped(url_env, db, run):
    """A GTD buy that expired while the exchange was stopped reserves nothing: the next start
    expires it first. The payout check and the start counted its reserve all the same (review14)."""
    import time

    from exchange.service import ExchangeService, now_us
    from matching import events as E

    kiln_and_hotel(url_env)

    async def gtd_buy() -> tuple[int, int]:
        svc = await _started(ExchangeService(db))
        try:
            await svc.list_instrument("KILN-2023", {"rules": {"always_open": True}})
            hotel = await svc.account("HOTEL")
            expires = now_us() + 1_000_000
            out = await svc.submit({"op": "place", "account": hotel, "symbol": "KILN-2023", "side": E.BID,
                                    "price": 3500, "qty": 25_000, "tif": E.GTD, "expire_ts": expires})
            assert out.accepted and svc.core.cash[hotel][1] > 0, out
            return out.order_id, expires
        finally:
            await svc.stop(snapshot=False)  # stopped before it expired
    order_id, expires = run(gtd_buy())
    time.sleep(max(0.0, (expires - now_us()) / 1e6) + 0.2)

    out = carbonx("cash", "withdraw", "HOTEL", "1000.00", "--reference", "out-1", env=url_env).stdout
    assert "balance 0.00 CNY" in out, out

    async def start() -> None:
        svc = await _started(ExchangeService(db))  # not reserved_cash_withdrawn
        try:
            assert order_id not in svc.core.orders and svc.core.cash[await svc.account("HOTEL")] == [0, 0]
            assert await svc.reconcile() == []
        finally:
            await svc.stop()
    run(start())


async def _started(svc):
    await svc.start()
    return svc


def test_a_command_line_change_keeps_the_exchange_from_starting_until_it_has_finished(url_env, db, run,
                                                                                      monkeypatch):
    """A withdrawal checks that no service runs and then works (a journal replay first): a service
    started meanwhile read the member's cash before the payout, let it buy with it, and could then
    neither settle the trade nor start again (review27, F1). The command holds the service off
    for its whole run now, and the refused start says why."""
    from exchange.cli.common import run_db
    from exchange.service import ExchangeService

    kiln_and_hotel(url_env)
    monkeypatch.setenv("DATABASE_URL", db)
    refused: list[CarbonxError] = []

    async def body(conn) -> None:
        with pytest.raises(CarbonxError) as err:
            await _started(ExchangeService(db))
        refused.append(err.value)

    run_db(None, body, member_assets=True)
    assert refused[0].code == "service_running" and "command-line change" in refused[0].message
    run(_stopped_after_start(db))


def test_clearing_settle_and_member_changes_are_refused_while_the_exchange_runs(url_env, db, run):
    """`clearing settle` is for a stopped exchange: a running one settles by itself and holds its
    projector back around registry changes, which a second projector would pass (review27, F6)."""
    from exchange.service import ExchangeService

    kiln_and_hotel(url_env)

    async def beside_a_service() -> list:
        svc = await _started(ExchangeService(db))
        try:
            return [await asyncio.to_thread(carbonx, *args, env=url_env, check=False)
                    for args in (["clearing", "settle"], ["cash", "deposit", "HOTEL", "1", "--reference", "b-2"])]
        finally:
            await svc.stop()
    for proc in run(beside_a_service()):
        assert proc.returncode == 1 and "[service_running]" in proc.stderr, proc.stderr
    assert "settled" in carbonx("clearing", "settle", env=url_env).stdout


async def _stopped_after_start(db: str) -> None:
    from exchange.service import ExchangeService

    await (await _started(ExchangeService(db))).stop()


def test_serve_stdio_reads_commands_from_a_file(url_env, tmp_path):
    """`serve --stdio < commands.jsonl`: a regular file cannot be watched by the event loop; its
    lines are answered all the same, and the end of the file stops the exchange cleanly. It used
    to answer nothing and spin a core until killed (review27, F5)."""
    commands = tmp_path / "commands.jsonl"
    commands.write_text("".join(orjson.dumps({"id": i, "op": "digest"}).decode() + "\n" for i in range(3)))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARBONX_DATA_DIR")} | url_env
    with commands.open("rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "exchange", "serve", "--stdio"], stdin=stdin,
                              capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(orjson.loads(line)["id"] for line in proc.stdout.splitlines()) == [0, 1, 2]
    assert "stopped cleanly" in proc.stderr


def test_serve_stdio_with_a_null_stdin_stops_at_its_end(url_env):
    """/dev/null (systemd's StandardInput=null, nohup) passed the pipe check, could not be watched
    and was waited on for ever (review28)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARBONX_DATA_DIR")} | url_env
    proc = subprocess.run([sys.executable, "-m", "exchange", "serve", "--stdio"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "stopped cleanly" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_start_that_cannot_settle_says_why_in_one_line(url_env, db, run):
    """A journaled entry the database refuses at the start's settlement (here a deposit to an
    account that does not exist, as no real path journals) stops the start with one line that
    says what the database refused, not a page of traceback (review27, F4)."""
    from exchange.service import ExchangeService

    async def journal_unsettleable() -> None:
        svc = await _started(ExchangeService(db, project=False))
        try:
            _, durable = svc.apply({"op": "deposit", "account": 987_654, "amount": 100, "ref": "nobody"})
            await durable
        finally:
            await svc.stop()
    run(journal_unsettleable())
    for command in (["-m", "exchange", "serve", "--stdio"], ["-m", "api", "serve", "--http-port", "0",
                                                             "--ws-port", "0"]):
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARBONX_DATA_DIR")} | url_env
        proc = subprocess.run([sys.executable, *command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=env, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("error: ") and "account" in lines[-1], proc.stderr


@pytest.mark.parametrize("url", ["postgresql://u:s3cret-pw@127.0.0.1:notaport/x", "mysql://u:s3cret-pw@h/x",
                                 "postgresql://u:s3cret/pw@127.0.0.1:5432/x", "postgresql://u:s3cret#pw@127.0.0.1/x"])
def test_a_malformed_database_url_is_one_clear_line(url):
    """It used to be a 70-line traceback (review27, F11); the password is never echoed, also when
    a bare '/' or '#' in it makes asyncpg read it as the port (review28)."""
    proc = carbonx("db", "status", env={"DATABASE_URL": url}, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "[invalid_database_url]" in proc.stderr and "s3cret" not in proc.stderr


def test_a_data_dir_with_a_space_works(tmp_path):
    """macOS's default data directory is ~/Library/Application Support/carbonx: embedded-postgres
    gave pg_ctl its socket directory unquoted and the server did not start (review27, F7)."""
    data = tmp_path / "Application Support" / "carbonx"
    for _ in range(2):  # a fresh server, then the same data directory again
        out = carbonx("db", "status", "--data-dir", str(data)).stdout
        assert "issuances: 0 rows" in out, out


def test_file_commands_refuse_in_one_line(tmp_path, url_env):
    """Files that cannot be written are the file's problem, said in one line, exit 1 (review27,
    F10): they were tracebacks, or blamed on the database. A stream that is not one is a refusal
    like any other (exit 1, not Click's usage error 2), and a negative count is refused."""
    missing = tmp_path / "no" / "such"
    stream = tmp_path / "s.txt"
    carbonx("replay-gen", str(stream), "--commands", "10")
    (bad := tmp_path / "bad.txt").write_text("hello\n")
    for args in (["replay-gen", str(missing / "s.txt"), "--commands", "10"],
                 ["replay", str(stream), "--fills", str(missing / "f.txt")],
                 ["clearing", "report", "--date", "2026-11-22", "--out", str(missing / "x.csv")],
                 ["replay", str(bad)]):
        proc = carbonx(*args, env=url_env, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (
            args, proc.stderr)
        assert "database" not in proc.stderr, proc.stderr
    assert carbonx("replay-gen", str(stream), "--commands", "-5", check=False).returncode == 2


def test_refusals_speak_tonnes_and_cny_as_the_commands_do(url_env):
    """The command line takes tonnes and CNY; its refusals said kilograms and fen (review27, F9)."""
    kiln_and_hotel(url_env)
    proc = carbonx("cash", "withdraw", "HOTEL", "2000", "--reference", "w-1", env=url_env, check=False)
    assert proc.returncode == 1 and "withdrawal of 2000.00 CNY is refused (at most 1000.00)" in proc.stderr, proc.stderr
    proc = carbonx("registry", "transfer", "KILN-DEV", "HOTEL", "1000", "--symbol", "KILN-2023", "--reference", "t1",
                   env=url_env, check=False)
    assert proc.returncode == 1 and "1000.000 t asked for, but only 100.000 t are held" in proc.stderr, proc.stderr


def test_a_database_url_naming_no_database_says_to_create_it(pg_server):
    """`db init` with DATABASE_URL naming a database the server lacks said only 'does not
    exist' (review27, F12): the operator creates it, carbonx its tables."""
    from exchange.database import with_database

    missing = with_database(pg_server, "carbonx_never_created")
    proc = carbonx("db", "init", env={"DATABASE_URL": missing}, check=False)
    assert proc.returncode == 1 and "create it first" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_the_recovery_progress_line_ends_when_recovery_does(capsys):
    """The start logs more before the progress closes; it used to run on after '(100%, …)' (review27)."""
    from exchange.cli.serve import _Progress

    progress = _Progress()
    progress(25_000, 50_000)
    progress(50_000, 50_000)
    sys.stderr.write("carbonx exchange: took in changes\n")
    progress.close()
    err = capsys.readouterr().err
    assert "/s)\ncarbonx exchange: took in changes\n" in err and err.count("\n") == 2, repr(err)


def test_the_socket_directory_for_a_spaced_data_dir_must_be_private(tmp_path):
    """Its name under the temporary directory is predictable, and the embedded server trusts its
    socket's callers: one made beforehand by anyone else, or open to others, is refused (review28)."""
    from exchange.database import _socket_dir_without_spaces
    from exchange.errors import CarbonxError

    pgdata = tmp_path / "Application Support" / "pg"
    choose = _socket_dir_without_spaces(lambda data, runtime: data)
    mine = choose(pgdata, tmp_path)
    assert " " not in str(mine) and (mine.stat().st_mode & 0o777) == 0o700
    assert choose(pgdata, tmp_path) == mine  # the same directory every start
    if os.getuid() == 0:  # root's server runs as another user: embedded-postgres opens the mode itself
        os.chown(mine, 54321, -1)
    else:
        mine.chmod(0o777)
    try:
        with pytest.raises(CarbonxError) as err:
            choose(pgdata, tmp_path)
        assert err.value.code == "invalid_data_dir"
    finally:
        mine.rmdir()


def test_serve_refuses_a_public_url_certificates_cannot_link_to(url_env):
    """--public-url is printed on every certificate as its verification link: a URL that is not
    absolute http(s), or that carries a query or credentials, is refused before anything starts."""
    for bad in ("ftp://registry.example.cn", "registry.example.cn", "https://registry.example.cn/?a=1",
                "http://registry.example.cn:port", "https://user:pw@registry.example.cn"):
        proc = subprocess.run([sys.executable, "-m", "api", "serve", "--public-url", bad], capture_output=True,
                              text=True, env={**os.environ, **url_env}, timeout=60)
        assert proc.returncode == 1 and "--public-url" in proc.stderr and "invalid_option" in proc.stderr, (bad, proc)
