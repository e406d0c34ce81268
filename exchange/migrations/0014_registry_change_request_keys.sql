-- An operator's freeze, unfreeze or cancel of a serial range may carry an idempotency key (the
-- Idempotency-Key header of POST /v1/registry/freeze, /unfreeze and /cancel), unique per account:
-- a retry of a change whose answer was lost (a crash after its commit) finds what the first
-- request moved, instead of a refusal that reads like someone else's change ("credits_frozen").
-- Written in the change's own transaction, so a key names a change made or nothing (review26).
CREATE TABLE registry_change_requests (
    account_id   bigint NOT NULL REFERENCES accounts,
    request_key  text   NOT NULL CHECK (length(request_key) BETWEEN 1 AND 64),
    request_hash bytea  NOT NULL,
    action       text   NOT NULL CHECK (action IN ('freeze', 'unfreeze', 'cancel')),
    pieces       jsonb  NOT NULL,  -- what moved: [[issuance_id, lo, hi, from_owner, from_state], ...]
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, request_key)
);
CREATE TRIGGER registry_change_requests_append_only BEFORE UPDATE OR DELETE ON registry_change_requests
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER registry_change_requests_no_truncate BEFORE TRUNCATE ON registry_change_requests
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();
