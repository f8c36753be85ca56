-- Upstream identity and operator-settled reversals.
--
-- Every message the switch sends upstream takes its trace (11) and retrieval
-- reference (37) from one number drawn from this sequence, so no two switch
-- processes, and no process after a restart, ever send the same reference (a
-- host treats a repeated 37 as the same request). One nextval reserves a block
-- of 100 numbers that the process hands out itself (ledger.identity); a block
-- left unused when a process stops is skipped, never reused. NO CYCLE and the
-- 12-digit maximum: past 999 999 999 999 drawing fails instead of repeating.
CREATE SEQUENCE upstream_identity_seq AS bigint
    INCREMENT BY 100 MINVALUE 0 MAXVALUE 999999999999 START WITH 0 NO CYCLE;

-- A reversal an operator settled with the host out of band (`admin reversals
-- resolve`): never sent again. resolved_outcome: 'reversed' (the host undid
-- the credit; points_on_ack went back to the card) or 'kept' (the host kept it).
ALTER TABLE upstream_reversals DROP CONSTRAINT upstream_reversals_state_check;
ALTER TABLE upstream_reversals ADD CONSTRAINT upstream_reversals_state_check
    CHECK (state IN ('pending', 'acknowledged', 'expired', 'resolved'));
ALTER TABLE upstream_reversals
    ADD COLUMN resolved_outcome text CHECK (resolved_outcome IN ('reversed', 'kept')),
    ADD COLUMN resolved_at      timestamptz,
    -- `admin reversals retry`: the age that expires a reversal counts from here
    ADD COLUMN retried_at       timestamptz,
    ADD CONSTRAINT upstream_reversals_resolved_check
        CHECK ((state = 'resolved') = (resolved_outcome IS NOT NULL));
