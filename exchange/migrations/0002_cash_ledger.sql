-- The cash ledger, double entry from the start. Amounts are integer fen.
--   * an entry's postings sum to zero (checked after every statement that adds postings);
--   * postings and entries are append-only;
--   * balances are maintained from postings by trigger, so they can always be re-derived, and a
--     member's balance can never go below zero (CHECK), which makes overdrafts impossible even
--     under concurrency;
--   * deposits and withdrawals are idempotent by their payment reference (UNIQUE).
-- Sign convention: a member's balance is what the exchange owes it; the system account
-- CX-CUSTODY holds the opposite of all member cash (what sits at the settlement bank), so the
-- sum over all accounts is zero.

INSERT INTO accounts (code, name, kind, role) VALUES
    ('CX-CUSTODY', 'Cash held at the settlement bank for participants', 'system', 'system'),
    ('CX-FEES', 'Exchange fee income', 'system', 'system');

CREATE TABLE ledger_entries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'trade', 'fee', 'adjustment')),
    ref         text NOT NULL CHECK (length(btrim(ref)) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, ref)
);

CREATE TABLE postings (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_id    bigint NOT NULL REFERENCES ledger_entries,
    account_id  bigint NOT NULL REFERENCES accounts,
    amount_fen  bigint NOT NULL CHECK (amount_fen <> 0)
);
CREATE INDEX postings_by_entry ON postings (entry_id);
CREATE INDEX postings_by_account ON postings (account_id, id);

CREATE TABLE cash_balances (
    account_id     bigint PRIMARY KEY REFERENCES accounts,
    balance_fen    bigint NOT NULL DEFAULT 0,
    may_go_negative boolean NOT NULL DEFAULT false,
    CONSTRAINT cash_balances_not_negative CHECK (may_go_negative OR balance_fen >= 0)
);
INSERT INTO cash_balances (account_id, may_go_negative)
    SELECT id, true FROM accounts WHERE code = 'CX-CUSTODY';
INSERT INTO cash_balances (account_id, may_go_negative)
    SELECT id, false FROM accounts WHERE code = 'CX-FEES';

CREATE TABLE payments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts,
    direction   text NOT NULL CHECK (direction IN ('deposit', 'withdrawal')),
    amount_fen  bigint NOT NULL CHECK (amount_fen > 0),
    reference   text NOT NULL UNIQUE CHECK (length(btrim(reference)) BETWEEN 1 AND 100),
    entry_id    bigint NOT NULL UNIQUE REFERENCES ledger_entries,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER payments_append_only BEFORE UPDATE OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();

-- After each statement that adds postings: every touched entry balances, and the balances move.
CREATE FUNCTION carbonx_postings_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    SELECT p.entry_id INTO bad
      FROM postings p
     WHERE p.entry_id IN (SELECT DISTINCT entry_id FROM new_postings)
     GROUP BY p.entry_id
    HAVING sum(p.amount_fen) <> 0
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entry % does not balance: its postings must sum to zero', bad
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_entry_balanced';
    END IF;
    -- Rows first (a new row starts at zero), then lock them in account order so concurrent
    -- postings cannot deadlock, then move the balances. The CHECK on cash_balances refuses any
    -- member balance below zero.
    INSERT INTO cash_balances (account_id)
        SELECT DISTINCT account_id FROM new_postings ORDER BY 1
    ON CONFLICT (account_id) DO NOTHING;
    PERFORM 1 FROM cash_balances WHERE account_id IN (SELECT account_id FROM new_postings)
        ORDER BY account_id FOR UPDATE;
    UPDATE cash_balances b SET balance_fen = b.balance_fen + s.total
      FROM (SELECT account_id, sum(amount_fen) AS total FROM new_postings GROUP BY account_id) s
     WHERE b.account_id = s.account_id;
    RETURN NULL;
END $$;
CREATE TRIGGER postings_added AFTER INSERT ON postings
    REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_postings_added();
