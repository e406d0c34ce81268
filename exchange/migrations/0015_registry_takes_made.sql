-- The journal seq of each take (the core's `adjust` marked take) whose registry change was made,
-- written in the change's own transaction, for the takes that took credits bought that day. A
-- start after a crash between a take and its change finds the takes the core still remembers
-- with no row here, and gives their credits back locked (T+1) as a refusal would have; before,
-- the start's comparison with the registry gave them back sellable.
CREATE TABLE registry_takes_made (
    seq        bigint PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER registry_takes_made_append_only BEFORE UPDATE OR DELETE ON registry_takes_made
    FOR EACH ROW EXECUTE FUNCTION carbonx_append_only();
CREATE TRIGGER registry_takes_made_no_truncate BEFORE TRUNCATE ON registry_takes_made
    FOR EACH STATEMENT EXECUTE FUNCTION carbonx_append_only();
