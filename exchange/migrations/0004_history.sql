-- Order history, fills and the public trade tape, projected from the journal by the "history"
-- consumer (exchange/history.py) so that members can read their closed orders and fills and the
-- API can serve trades and candles. The journal stays the system of record: these tables are
-- rebuilt from it and hold nothing it does not.
CREATE TABLE orders (
    order_id        bigint PRIMARY KEY,            -- the seq of the command that placed it
    account_id      bigint NOT NULL REFERENCES accounts,
    symbol          text   NOT NULL,
    side            text   NOT NULL CHECK (side IN ('buy', 'sell')),
    type            text   NOT NULL CHECK (type IN ('limit', 'market')),
    time_in_force   text   NOT NULL CHECK (time_in_force IN ('GTC', 'IOC', 'FOK', 'GTD')),
    post_only       boolean NOT NULL DEFAULT false,
    price_fen       bigint NOT NULL CHECK (price_fen >= 0),   -- 0 for a market order
    quantity_kg     bigint NOT NULL CHECK (quantity_kg >= 0), -- filled + open (after amends)
    remaining_kg    bigint NOT NULL CHECK (remaining_kg >= 0),
    filled_kg       bigint NOT NULL DEFAULT 0 CHECK (filled_kg >= 0),
    value_fen       bigint NOT NULL DEFAULT 0 CHECK (value_fen >= 0),
    fee_fen         bigint NOT NULL DEFAULT 0 CHECK (fee_fen >= 0),
    max_cash_fen    bigint,
    expire_ts       bigint,
    client_order_id text,
    status          text   NOT NULL CHECK (status IN ('new', 'partially_filled', 'filled', 'cancelled',
                                                      'expired')),
    reason          text,                          -- why it closed without filling, when it did
    created_ts      bigint NOT NULL,
    updated_ts      bigint NOT NULL,
    CHECK (filled_kg + remaining_kg <= quantity_kg)
);
CREATE INDEX orders_by_account ON orders (account_id, order_id DESC);
CREATE INDEX orders_open ON orders (account_id) WHERE status IN ('new', 'partially_filled');

CREATE TABLE fills (
    symbol      text   NOT NULL,
    trade_id    bigint NOT NULL,
    order_id    bigint NOT NULL,
    account_id  bigint NOT NULL REFERENCES accounts,
    side        text   NOT NULL CHECK (side IN ('buy', 'sell')),
    liquidity   text   NOT NULL CHECK (liquidity IN ('maker', 'taker')),
    price_fen   bigint NOT NULL,
    qty_kg      bigint NOT NULL CHECK (qty_kg > 0),
    value_fen   bigint NOT NULL,
    fee_fen     bigint NOT NULL,
    ts          bigint NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (symbol, trade_id, side)
);
CREATE INDEX fills_by_account ON fills (account_id, seq DESC);
CREATE INDEX fills_by_order ON fills (order_id);

CREATE TABLE trades (
    symbol     text   NOT NULL,
    trade_id   bigint NOT NULL,
    price_fen  bigint NOT NULL,
    qty_kg     bigint NOT NULL,
    taker_side text   NOT NULL CHECK (taker_side IN ('buy', 'sell')),
    ts         bigint NOT NULL,
    seq        bigint NOT NULL,
    PRIMARY KEY (symbol, trade_id)
);
CREATE INDEX trades_by_time ON trades (symbol, ts);
