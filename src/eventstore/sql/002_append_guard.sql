-- 002: the guard of the writer's one-round-trip commit (eventstore.store.writer).
--
-- A writer that expects the store's head position and the versions of a batch's streams to be
-- what its last commits left sends the whole transaction at once, with this check right after
-- the append lock. When another server process (or a stale guess) has moved them, the check
-- aborts the transaction before anything is written, and the writer commits the batch the
-- usual way, reading head and versions first.

CREATE OR REPLACE FUNCTION eventstore_expect(ok boolean, what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'eventstore: the writer''s view is stale (%)', what
            USING ERRCODE = 'ES001';
    END IF;
END
$$;
