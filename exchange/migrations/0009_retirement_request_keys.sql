-- A retirement is for good, so a client's retry must never retire twice (issue #6: "nothing
-- lost", and nothing doubled). A request may carry an idempotency key (the Idempotency-Key
-- header of POST /v1/retirements and POST /v1/neutrality/offset), unique per account: a repeat
-- finds the retirement the key made instead of making another, and `request_hash` (a digest of
-- the request as the API read it) tells a repeat from a different request under a reused key.
ALTER TABLE retirements
    ADD COLUMN request_key  text  CHECK (request_key IS NULL OR length(request_key) BETWEEN 1 AND 64),
    ADD COLUMN request_hash bytea CHECK ((request_key IS NULL) = (request_hash IS NULL));
CREATE UNIQUE INDEX retirements_by_request_key ON retirements (account_id, request_key)
    WHERE request_key IS NOT NULL;
