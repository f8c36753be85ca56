-- Card data protected at rest, step 1 of 2: data keys, the new card columns and
-- the audit trail. The Python step that follows this migration (in the same
-- transaction; ledger/carddata.py) fills the new columns from the clear ones,
-- since SQL cannot compute an HMAC or seal under the vault's keys; migration
-- 0006 then drops the clear columns.

-- Random data keys, each sealed under the operator master key ("data-key:<name>").
CREATE TABLE vault_keys (
    name        text PRIMARY KEY,
    sealed      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE cards
    ADD COLUMN card_index     text,   -- HMAC-SHA256 (hex) of the card number under the card_index key
    ADD COLUMN pan_sealed     bytea,  -- the card number, sealed ("pan:<card_index>")
    ADD COLUMN holder_sealed  bytea,  -- the holder's name, sealed ("holder:<card_index>")
    ADD COLUMN phone_sealed   bytea,  -- the phone number, sealed ("phone:<card_index>"); NULL: none
    ADD COLUMN pan_display    text;   -- first 6 and last 4 digits, the rest masked: for screens

ALTER TABLE requests ADD COLUMN card_index text;

-- What operators did: one row per admin action that changed something (and per
-- reveal of card data), written in the same transaction as the change.
CREATE TABLE audit_log (
    audit_id  bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,           -- the OS user who ran the command
    action    text NOT NULL,           -- e.g. card.block, terminal.rekey
    target    text NOT NULL,           -- what it acted on; card numbers masked
    details   jsonb NOT NULL DEFAULT '{}',
    origin    text NOT NULL            -- host name, process id and terminal
);
CREATE INDEX audit_log_at ON audit_log (at);
