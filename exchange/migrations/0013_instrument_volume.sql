-- Each instrument's traded total, kept as trades are written.
--
-- GET /v1/registry/projects/{code} is public and shows what a project's instruments traded; it
-- summed their trades on every request: 80 ms for an instrument with a million trades (review16).
-- A statement-level trigger keeps the total with every batch of trades, whoever writes it (the
-- history writer copies a batch at a time), in the same transaction.
CREATE TABLE instrument_volume (
    symbol    text   PRIMARY KEY,
    traded_kg bigint NOT NULL CHECK (traded_kg >= 0)
);

INSERT INTO instrument_volume (symbol, traded_kg)
SELECT symbol, sum(qty_kg)::bigint FROM trades GROUP BY symbol;

CREATE FUNCTION instrument_volume_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO instrument_volume (symbol, traded_kg)
    SELECT symbol, sum(qty_kg)::bigint FROM added GROUP BY symbol
    ON CONFLICT (symbol) DO UPDATE SET traded_kg = instrument_volume.traded_kg + EXCLUDED.traded_kg;
    RETURN NULL;
END $$;

CREATE FUNCTION instrument_volume_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE instrument_volume v SET traded_kg = v.traded_kg - r.kg
    FROM (SELECT symbol, sum(qty_kg)::bigint AS kg FROM removed GROUP BY symbol) r WHERE v.symbol = r.symbol;
    RETURN NULL;
END $$;

CREATE TRIGGER trades_volume_add AFTER INSERT ON trades
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION instrument_volume_add();
CREATE TRIGGER trades_volume_remove AFTER DELETE ON trades
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION instrument_volume_remove();
-- Trades are written once and never changed: an update would leave the total behind.
CREATE FUNCTION trades_unchanged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'trades are not changed once written';
END $$;
CREATE TRIGGER trades_no_update BEFORE UPDATE ON trades FOR EACH ROW EXECUTE FUNCTION trades_unchanged();
