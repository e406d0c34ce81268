-- Order-history throughput (issue #6): the history tables' account keys checked per statement.
--
-- The history consumer writes an order row per placed order and a fill row per side of every
-- trade. As foreign keys, orders.account_id and fills.account_id looked up and locked their
-- account FOR KEY SHARE once per row: a heap page dirtied and a WAL record each time, for a
-- handful of distinct accounts per batch. The rule stays in the database and stays the same --
-- every account_id names an existing account, which cannot be deleted or renumbered while named
-- -- but is checked once per statement over the distinct accounts of its new rows, with those
-- rows locked FOR KEY SHARE in key order (carbonx_keys_exist, 0005), as settlement's tables are.
--
-- An order's or a fill's account never changes (the history writer updates an order's progress
-- only), so a changed account_id is refused outright rather than checked; and an account named
-- by an order or a fill joins those that accounts_referenced keeps from being deleted or
-- renumbered, looked up through orders_by_account and fills_by_account. accounts_referenced also
-- refuses to run under REPEATABLE READ or SERIALIZABLE, where its look-ups could miss a reference
-- committed after the transaction's snapshot (found in review; 0005's tables had the same hole).
--
-- Measured on the 40,002-entry journal of 20,000 trades that bench_clearing builds, written with
-- history.catch_up 500 entries at a time (database CPU per entry from the backend's /proc stat,
-- two alternating runs): 19.5-21.0 us before, 14.0-14.7 us with this migration and placed orders
-- written with COPY (exchange/history.py).
ALTER TABLE orders DROP CONSTRAINT orders_account_id_fkey;
ALTER TABLE fills DROP CONSTRAINT fills_account_id_fkey;

-- One function for both tables: their triggers name the new rows alike.
CREATE FUNCTION carbonx_history_account_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM carbonx_keys_exist('accounts', 'id', ARRAY(SELECT account_id FROM new_rows), TG_TABLE_NAME || '.account_id');
    RETURN NULL;
END $$;
CREATE TRIGGER orders_keys AFTER INSERT ON orders REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_history_account_keys();
CREATE TRIGGER fills_keys AFTER INSERT ON fills REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_history_account_keys();

CREATE FUNCTION carbonx_account_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.account_id never changes (% to %)', TG_TABLE_NAME, OLD.account_id, NEW.account_id
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = TG_TABLE_NAME || '_account_fixed';
END $$;
CREATE TRIGGER orders_account_fixed BEFORE UPDATE OF account_id ON orders
    FOR EACH ROW WHEN (NEW.account_id IS DISTINCT FROM OLD.account_id) EXECUTE FUNCTION carbonx_account_fixed();
CREATE TRIGGER fills_account_fixed BEFORE UPDATE OF account_id ON fills
    FOR EACH ROW WHEN (NEW.account_id IS DISTINCT FROM OLD.account_id) EXECUTE FUNCTION carbonx_account_fixed();

CREATE OR REPLACE FUNCTION carbonx_account_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    -- A foreign key looks for references with a snapshot taken now; these look-ups use the
    -- statement's. Under REPEATABLE READ or SERIALIZABLE that snapshot can be older than a
    -- reference committed meanwhile (its writer's lock on the account is only FOR KEY SHARE), so
    -- such a transaction may not delete or renumber an account at all.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'account %: % needs READ COMMITTED isolation (references are checked against the latest rows)',
            OLD.id, TG_OP
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'accounts_referenced';
    END IF;
    IF EXISTS (SELECT 1 FROM postings WHERE account_id = OLD.id)
       OR EXISTS (SELECT 1 FROM transfers WHERE from_account_id = OLD.id OR to_account_id = OLD.id)
       OR EXISTS (SELECT 1 FROM settled_trades WHERE buyer_id = OLD.id OR seller_id = OLD.id)
       OR EXISTS (SELECT 1 FROM orders WHERE account_id = OLD.id)
       OR EXISTS (SELECT 1 FROM fills WHERE account_id = OLD.id) THEN
        RAISE EXCEPTION 'account % is named by postings, transfers, settled trades, orders or fills: % refused',
            OLD.id, TG_OP
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'accounts_referenced';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
