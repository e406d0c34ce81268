-- Settlement throughput (issue #5): the same ledger rule, checked in time linear in the statement.
--
-- 0002 checked, after every statement that adds postings, that each touched entry's postings sum
-- to zero by joining the statement's new postings back to the whole postings table. Without
-- statistics (a young table, or a batch larger than the planner expects from a transition table)
-- that join became a nested loop over every posting ever written for every touched entry:
-- quadratic, ~60 ms for one batch of 2,500 trades on a fresh database.
--
-- Checking the statement's own postings is the same rule: postings are append-only (no UPDATE,
-- DELETE or TRUNCATE; 0002's triggers), and every statement that ever added postings to an entry
-- was checked to add a zero sum to it, so an entry's postings sum to zero exactly when the new
-- postings of each statement do. Balances move as before.
CREATE OR REPLACE FUNCTION carbonx_postings_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    SELECT entry_id INTO bad
      FROM new_postings
     GROUP BY entry_id
    HAVING sum(amount_fen) <> 0
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

-- Referential integrity of the three tables settlement writes per trade, checked per statement.
--
-- A foreign key checks each inserted row on its own (one lookup and one row lock per row and
-- per key): ~3 us each, and a settled trade writes 12 of them (3 postings x 2, a settled_trades
-- row x 3, its transfer row x 3), most of the time a batch spends in the database. The rule
-- stays in the database and stays the same -- every key names an existing row, which cannot be
-- deleted or renumbered while referenced -- but is checked once per statement over the distinct
-- keys of its new rows (a transition table), with the referenced rows locked FOR KEY SHARE in key
-- order, as a foreign key would lock them. The three tables are append-only (0001-0003), so
-- INSERT is the only way a key gets in; ledger entries, issuances and the journal are
-- append-only too, so only an account could disappear, and accounts_referenced refuses that.
ALTER TABLE postings DROP CONSTRAINT postings_entry_id_fkey,
                     DROP CONSTRAINT postings_account_id_fkey;
ALTER TABLE transfers DROP CONSTRAINT transfers_issuance_id_fkey,
                      DROP CONSTRAINT transfers_from_account_id_fkey,
                      DROP CONSTRAINT transfers_to_account_id_fkey;
ALTER TABLE settled_trades DROP CONSTRAINT settled_trades_seq_fkey,
                           DROP CONSTRAINT settled_trades_buyer_id_fkey,
                           DROP CONSTRAINT settled_trades_seller_id_fkey;

-- Lock the rows of `tbl` whose `col` is in `keys` (FOR KEY SHARE, in key order) and raise
-- foreign_key_violation, naming `what`, when one of the keys has no row.
CREATE FUNCTION carbonx_keys_exist(tbl regclass, col text, keys bigint[], what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wanted bigint[] := ARRAY(SELECT DISTINCT k FROM unnest(keys) k WHERE k IS NOT NULL ORDER BY 1);
    found  bigint[];
BEGIN
    IF cardinality(wanted) = 0 THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT coalesce(array_agg(k ORDER BY k), ''{}'') FROM '
                   '(SELECT %2$I AS k FROM %1$s WHERE %2$I = ANY($1) ORDER BY %2$I FOR KEY SHARE) s', tbl, col)
        INTO found USING wanted;
    IF cardinality(found) <> cardinality(wanted) THEN
        RAISE EXCEPTION '% refers to % %, which does not exist', what, tbl,
            (SELECT min(k) FROM unnest(wanted) k WHERE k <> ALL (found))
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = replace(what, '.', '_') || '_fkey';
    END IF;
END $$;

CREATE FUNCTION carbonx_postings_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM carbonx_keys_exist('ledger_entries', 'id', ARRAY(SELECT entry_id FROM new_rows), 'postings.entry_id');
    PERFORM carbonx_keys_exist('accounts', 'id', ARRAY(SELECT account_id FROM new_rows), 'postings.account_id');
    RETURN NULL;
END $$;
CREATE TRIGGER postings_keys AFTER INSERT ON postings REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_postings_keys();

CREATE FUNCTION carbonx_transfers_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM carbonx_keys_exist('issuances', 'id', ARRAY(SELECT issuance_id FROM new_rows), 'transfers.issuance_id');
    PERFORM carbonx_keys_exist('accounts', 'id', ARRAY(SELECT from_account_id FROM new_rows
                                                 UNION SELECT to_account_id FROM new_rows), 'transfers.account_id');
    RETURN NULL;
END $$;
CREATE TRIGGER transfers_keys AFTER INSERT ON transfers REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_transfers_keys();

CREATE FUNCTION carbonx_settled_trades_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM carbonx_keys_exist('journal', 'seq', ARRAY(SELECT seq FROM new_rows), 'settled_trades.seq');
    PERFORM carbonx_keys_exist('accounts', 'id', ARRAY(SELECT buyer_id FROM new_rows
                                                 UNION SELECT seller_id FROM new_rows), 'settled_trades.account_id');
    RETURN NULL;
END $$;
CREATE TRIGGER settled_trades_keys AFTER INSERT ON settled_trades REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_settled_trades_keys();

-- The referenced side: an account named by a posting, a transfer or a settled trade is never
-- deleted or renumbered (the journal, ledger entries and issuances are append-only already). The
-- look-ups scan transfers and settled trades: removing an account is rare, settling is not, and
-- an index per column would cost every settled trade again.
CREATE FUNCTION carbonx_account_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM postings WHERE account_id = OLD.id)
       OR EXISTS (SELECT 1 FROM transfers WHERE from_account_id = OLD.id OR to_account_id = OLD.id)
       OR EXISTS (SELECT 1 FROM settled_trades WHERE buyer_id = OLD.id OR seller_id = OLD.id) THEN
        RAISE EXCEPTION 'account % is named by postings, transfers or settled trades: % refused', OLD.id, TG_OP
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'accounts_referenced';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_referenced BEFORE UPDATE OF id OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION carbonx_account_referenced();
