-- The registry: accounts, projects, issuances, serial blocks, transfers and retirements.
-- The invariants live here, in the database, so that no code path (or raw SQL) can break them:
--   * the blocks of one issuance never overlap (EXCLUDE USING gist on int8range);
--   * the blocks of an issuance cover exactly its issued range at every commit (deferred check);
--   * quantities are positive (non-empty ranges);
--   * a retired or cancelled block never changes again;
--   * issuances, retirements and transfers are append-only, and every transfer names its cause.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code        text NOT NULL UNIQUE CHECK (code ~ '^[A-Z0-9][A-Z0-9_-]{0,39}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind        text NOT NULL CHECK (kind IN ('operator', 'project_developer', 'enterprise',
                                              'scenic_area', 'event_organiser', 'individual',
                                              'system')),
    role        text NOT NULL CHECK (role IN ('operator', 'member', 'system')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'system') = (role = 'system'))
);

CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts,
    key_hash    bytea NOT NULL UNIQUE,          -- sha256 of the key; the key itself is never stored
    key_prefix  text NOT NULL,                  -- the first characters, to tell keys apart
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE projects (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scheme       text NOT NULL CHECK (scheme ~ '^[A-Z][A-Z0-9]{1,15}$'),
    code         text NOT NULL UNIQUE CHECK (code ~ '^[A-Z0-9]+(-[A-Z0-9]+)*$' AND length(code) <= 32),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    methodology  text NOT NULL CHECK (methodology IN (
                     'forest_carbon_sink', 'grassland_carbon_sink', 'wetland_carbon_sink',
                     'energy_substitution', 'renewable_energy', 'energy_efficiency',
                     'methane_recovery', 'low_carbon_transport', 'other')),
    region       text NOT NULL DEFAULT '' CHECK (length(region) <= 100),
    developer_account_id bigint NOT NULL REFERENCES accounts,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'closed')),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Serial numbers count kilograms within one project vintage, from 1, across all its issuances.
CREATE TABLE issuances (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id   bigint NOT NULL REFERENCES projects,
    vintage      integer NOT NULL CHECK (vintage BETWEEN 1990 AND 2100),
    serials      int8range NOT NULL CHECK (NOT isempty(serials) AND lower(serials) >= 1
                                           AND upper(serials) <= 10000000000),
    quantity_kg  bigint GENERATED ALWAYS AS (upper(serials) - lower(serials)) STORED,
    issued_to_account_id bigint NOT NULL REFERENCES accounts,
    reference    text NOT NULL DEFAULT '' CHECK (length(reference) <= 200),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT issuances_no_overlap EXCLUDE USING gist (project_id WITH =, vintage WITH =, serials WITH &&)
);
CREATE INDEX issuances_project ON issuances (project_id, vintage);

CREATE TABLE retirements (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       bigint NOT NULL REFERENCES accounts,
    quantity_kg      bigint NOT NULL CHECK (quantity_kg > 0),
    beneficiary      text NOT NULL CHECK (length(btrim(beneficiary)) BETWEEN 1 AND 200),
    purpose          text NOT NULL CHECK (length(btrim(purpose)) BETWEEN 1 AND 500),
    certificate_code text NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE blocks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    issuance_id      bigint NOT NULL REFERENCES issuances,
    serials          int8range NOT NULL CHECK (NOT isempty(serials)),
    owner_account_id bigint NOT NULL REFERENCES accounts,
    state            text NOT NULL CHECK (state IN ('available', 'encumbered', 'retired',
                                                    'cancelled', 'frozen')),
    retirement_id    bigint REFERENCES retirements,
    CHECK ((state = 'retired') = (retirement_id IS NOT NULL)),
    -- Deferrable so one transaction can rewrite many blocks in any order; checked by commit.
    CONSTRAINT blocks_no_overlap EXCLUDE USING gist (issuance_id WITH =, serials WITH &&)
        DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX blocks_holdings ON blocks (owner_account_id, state, issuance_id, lower(serials));
CREATE INDEX blocks_by_lower ON blocks (issuance_id, lower(serials));
CREATE INDEX blocks_by_upper ON blocks (issuance_id, upper(serials));
CREATE INDEX blocks_by_retirement ON blocks (retirement_id) WHERE retirement_id IS NOT NULL;

-- Every movement of credits, append-only: ownership moves and state changes alike.
CREATE TABLE transfers (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    issuance_id      bigint NOT NULL REFERENCES issuances,
    serials          int8range NOT NULL CHECK (NOT isempty(serials)),
    from_account_id  bigint REFERENCES accounts,
    from_state       text,
    to_account_id    bigint NOT NULL REFERENCES accounts,
    to_state         text NOT NULL,
    cause            text NOT NULL CHECK (cause IN ('issuance', 'transfer', 'trade', 'retirement',
                                                    'freeze', 'unfreeze', 'cancel', 'encumber',
                                                    'release')),
    cause_ref        text NOT NULL CHECK (length(btrim(cause_ref)) BETWEEN 1 AND 200),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((cause = 'issuance') = (from_account_id IS NULL)),
    CHECK ((from_account_id IS NULL) = (from_state IS NULL))
);
CREATE INDEX transfers_by_serials ON transfers USING gist (issuance_id, serials);
CREATE INDEX transfers_by_cause ON transfers (cause, cause_ref);

-- Append-only tables refuse UPDATE, DELETE and TRUNCATE.
CREATE FUNCTION carbonx_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'check_violation', CONSTRAINT = TG_TABLE_NAME || '_append_only';
END $$;

CREATE TRIGGER issuances_append_only BEFORE UPDATE OR DELETE ON issuances
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER issuances_no_truncate BEFORE TRUNCATE ON issuances
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER retirements_append_only BEFORE UPDATE OR DELETE ON retirements
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER retirements_no_truncate BEFORE TRUNCATE ON retirements
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER blocks_no_truncate BEFORE TRUNCATE ON blocks
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();

-- A retired or cancelled block is final.
CREATE FUNCTION carbonx_block_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state IN ('retired', 'cancelled') THEN
        RAISE EXCEPTION 'block % (% of issuance %) is %, and can never change',
            OLD.id, OLD.serials, OLD.issuance_id, OLD.state
            USING ERRCODE = 'check_violation', CONSTRAINT = 'blocks_final';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER blocks_final BEFORE UPDATE OR DELETE ON blocks
    FOR EACH ROW EXECUTE FUNCTION carbonx_block_final();

-- Exact cover: at commit, the blocks of every touched issuance add up to its issued range and lie
-- inside it (with no overlap, guaranteed above, that is exact cover). The check runs once per
-- issuance per "generation" of changes: a statement-level trigger bumps a transaction-local
-- generation counter after every statement that touches blocks, and the deferred row trigger
-- skips an issuance already checked at the current generation. Batches that rewrite thousands of
-- blocks therefore pay one aggregate per issuance, not one per row.
CREATE FUNCTION carbonx_blocks_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('carbonx.blocks_gen',
        (coalesce(nullif(current_setting('carbonx.blocks_gen', true), ''), '0')::bigint + 1)::text,
        true);
    RETURN NULL;
END $$;
CREATE TRIGGER blocks_generation AFTER INSERT OR UPDATE OR DELETE ON blocks
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_blocks_generation();

CREATE FUNCTION carbonx_assert_cover(iss bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    issued   int8range;
    covered  bigint;
    lo       bigint;
    hi       bigint;
BEGIN
    SELECT serials INTO issued FROM issuances WHERE id = iss;
    SELECT coalesce(sum(upper(serials) - lower(serials)), 0), min(lower(serials)), max(upper(serials))
      INTO covered, lo, hi FROM blocks WHERE issuance_id = iss;
    IF covered <> upper(issued) - lower(issued) OR lo IS DISTINCT FROM lower(issued)
       OR hi IS DISTINCT FROM upper(issued) THEN
        RAISE EXCEPTION 'blocks of issuance % cover % kg in [%, %), but % kg in % were issued',
            iss, covered, lo, hi, upper(issued) - lower(issued), issued
            USING ERRCODE = 'check_violation', CONSTRAINT = 'blocks_exact_cover';
    END IF;
END $$;

CREATE FUNCTION carbonx_check_cover() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    iss  bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.issuance_id ELSE NEW.issuance_id END;
    gen  text := coalesce(nullif(current_setting('carbonx.blocks_gen', true), ''), '0');
    key  text := 'carbonx.cover_' || iss;
BEGIN
    IF current_setting(key, true) = gen THEN
        RETURN NULL;
    END IF;
    PERFORM set_config(key, gen, true);
    PERFORM carbonx_assert_cover(iss);
    RETURN NULL;
END $$;

CREATE FUNCTION carbonx_check_issuance_cover() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM carbonx_assert_cover(NEW.id);
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER blocks_cover AFTER INSERT OR UPDATE OR DELETE ON blocks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION carbonx_check_cover();

-- An issuance is born covered: its first block is inserted in the same transaction.
CREATE CONSTRAINT TRIGGER issuances_cover AFTER INSERT ON issuances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION carbonx_check_issuance_cover();
