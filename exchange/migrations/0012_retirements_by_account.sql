-- A member's retirements, newest first, without reading everyone's.
--
-- GET /v1/registry/retirements?account=CODE is public and pages newest first; with no index on the
-- account, a member with few retirements (or none) made every request walk the whole table:
-- 61 ms a request over 600,000 retirements (review16).
CREATE INDEX retirements_by_account ON retirements (account_id, id DESC);
