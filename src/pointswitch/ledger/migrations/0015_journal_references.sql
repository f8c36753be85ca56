-- The journal's references without per-row foreign-key checks (decision 51).
--
-- A foreign key on postings(debit_account_id, credit_account_id) makes every
-- posting run SELECT ... FOR KEY SHARE on the accounts it names. A merchant's and
-- the network's accounts are named by nearly every posting, so every concurrent
-- transaction locks the same few rows: PostgreSQL turns those shared locks into
-- multixacts, and that was more than half of the database's CPU per accrual
-- (measured: 0.96 -> 0.39 ms; bench/README.md, "The journal's references").
--
-- The guarantee the keys gave is kept another way. What a posting, a lot or a draw
-- refers to is written in the same transaction that reads it under lock (the
-- context query), and none of those rows is ever deleted or re-keyed: statement
-- triggers refuse it, so a reference that was valid when written stays valid.
-- `admin check` looks for orphans anyway (ledger.admin.check_invariants).

ALTER TABLE postings DROP CONSTRAINT postings_debit_account_id_fkey;
ALTER TABLE postings DROP CONSTRAINT postings_credit_account_id_fkey;
ALTER TABLE postings DROP CONSTRAINT postings_request_id_fkey;
ALTER TABLE point_lots DROP CONSTRAINT point_lots_card_index_fkey;
ALTER TABLE point_lots DROP CONSTRAINT point_lots_request_id_fkey;
ALTER TABLE lot_draws DROP CONSTRAINT lot_draws_request_id_fkey;
ALTER TABLE lot_draws DROP CONSTRAINT lot_draws_lot_id_fkey;

CREATE FUNCTION journal_parent_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted or re-keyed: the journal refers to them', TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER accounts_kept BEFORE DELETE OR TRUNCATE OR UPDATE OF account_id ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION journal_parent_kept();
CREATE TRIGGER requests_kept BEFORE DELETE OR TRUNCATE OR UPDATE OF request_id ON requests
    FOR EACH STATEMENT EXECUTE FUNCTION journal_parent_kept();
CREATE TRIGGER cards_kept BEFORE DELETE OR TRUNCATE OR UPDATE OF card_index ON cards
    FOR EACH STATEMENT EXECUTE FUNCTION journal_parent_kept();
CREATE TRIGGER point_lots_kept BEFORE DELETE OR TRUNCATE OR UPDATE OF lot_id ON point_lots
    FOR EACH STATEMENT EXECUTE FUNCTION journal_parent_kept();
-- postings: already append-only (0009) for UPDATE and DELETE; TRUNCATE too now.
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION postings_append_only();
