-- A serial's history a page at a time (GET /v1/registry/serials/{serial}?after=<transfer id>).
--
-- The history is every transfer of the issuance that overlaps the range, oldest (smallest id)
-- first. carbonx_transfers_overlapping (0006) finds those by serial and in no order, so a page
-- from it costs every overlapping transfer however small the page: for a whole issuance of a busy
-- vintage, one transfer per trade, and again for every page.
--
-- No btree can answer "overlaps the range, smallest ids after the cursor" exactly (it is a range
-- condition and an order on other columns), and the GiST that could was dropped for its insert
-- cost (0006). Two btree walks cover the two shapes of range between them:
--
-- - a range that many of the issuance's transfers touch (the whole issuance, a large block):
--   walk the issuance's transfers in id order from the cursor and keep those that overlap. The
--   walk stops at the page, so it reads about limit / (the share that overlaps) index entries,
--   a page for a whole issuance. The index carries `serials`, so the walk reads no table rows.
--   Its inserts come in id order (the rightmost leaf of each issuance), which costs little on
--   the settlement path.
-- - a range that few touch (a unit, a small block): the walk gives up after `budget` entries
--   and the rest of the page comes from 0006's lookup, past the last transfer the walk saw;
--   that lookup reads the range's overlapping transfers, which are few for such a range.
--
-- Measured on 266,668 transfers of one issuance (and 133,333 of another), pages of 101: the
-- whole issuance's range 0.7-2.3 ms a page against 370-415 ms for the history unpaged; ranges
-- that 44-2,758 transfers touch 1.5-7 ms a page against 0.4-5 ms unpaged (the budget's walk).

CREATE INDEX transfers_by_issuance ON transfers (issuance_id, id) INCLUDE (serials);

-- At most `n` transfers of issuance `iss` overlapping `r` (finite, non-empty) with id > `after`,
-- the smallest ids, in no particular order (the caller orders by id).
CREATE FUNCTION carbonx_transfers_overlapping_page(iss bigint, r int8range, after bigint, n integer)
RETURNS SETOF transfers
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    budget  bigint := greatest(64::bigint * n, 4096);
    page_ids   bigint[];
    reached bigint;
BEGIN
    -- The walk in id order; the outer LIMIT stops it at the page, the inner one at the budget.
    SELECT coalesce(array_agg(w.id), '{}') INTO page_ids FROM (
        SELECT t.id FROM (SELECT id, serials FROM transfers
                           WHERE issuance_id = iss AND id > after ORDER BY id LIMIT budget) t
         WHERE t.serials && r ORDER BY t.id LIMIT n) w;
    IF cardinality(page_ids) < n THEN
        -- Where the walk gave up, if it did: the budget-th transfer after the cursor.
        SELECT id INTO reached FROM transfers
         WHERE issuance_id = iss AND id > after ORDER BY id OFFSET budget - 1 LIMIT 1;
        IF reached IS NOT NULL THEN
            page_ids := page_ids || ARRAY(SELECT o.id FROM carbonx_transfers_overlapping(iss, r) o
                                     WHERE o.id > reached ORDER BY o.id LIMIT n - cardinality(page_ids));
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM transfers WHERE id = ANY(page_ids);
END $$;
