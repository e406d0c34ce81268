-- The exchange core's journal: every accepted command with the events it caused, in sequence.
-- Rows are written in group-commit batches by the one running service and never change.
CREATE TABLE journal (
    seq     bigint PRIMARY KEY CHECK (seq > 0),
    ts      bigint NOT NULL,               -- UTC microseconds the core applied the command at
    command bytea  NOT NULL,               -- orjson of the command dict
    events  bytea  NOT NULL                -- orjson of the event tuples it produced
);
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();

-- Snapshots of the whole core (books, reservations, positions) at a journal position; recovery
-- loads the newest and replays the journal after it. Old snapshots may be pruned.
CREATE TABLE snapshots (
    seq          bigint PRIMARY KEY CHECK (seq >= 0),
    taken_at     timestamptz NOT NULL DEFAULT now(),
    state_digest text NOT NULL,
    state        bytea NOT NULL
);

-- How far each consumer of the journal (the projector into the registry and the ledger) has got;
-- updated in the same transaction as the consumer's effects, so each entry applies exactly once.
CREATE TABLE journal_consumers (
    name text PRIMARY KEY,
    seq  bigint NOT NULL CHECK (seq >= 0)
);

-- Every trade settled by clearing, once: the primary key is the trade's identity, so settling a
-- trade twice is impossible, not merely checked for.
CREATE TABLE settled_trades (
    symbol      text   NOT NULL,
    trade_id    bigint NOT NULL CHECK (trade_id > 0),
    seq         bigint NOT NULL REFERENCES journal (seq),
    ts          bigint NOT NULL,
    buyer_id    bigint NOT NULL REFERENCES accounts,
    seller_id   bigint NOT NULL REFERENCES accounts,
    price_fen   bigint NOT NULL CHECK (price_fen > 0),
    qty_kg      bigint NOT NULL CHECK (qty_kg > 0),
    value_fen   bigint NOT NULL CHECK (value_fen >= 0),
    buyer_fee_fen  bigint NOT NULL CHECK (buyer_fee_fen >= 0),
    seller_fee_fen bigint NOT NULL CHECK (seller_fee_fen >= 0),
    settled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, trade_id)
);
CREATE INDEX settled_trades_by_seq ON settled_trades (seq);
CREATE TRIGGER settled_trades_append_only BEFORE UPDATE OR DELETE ON settled_trades
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
