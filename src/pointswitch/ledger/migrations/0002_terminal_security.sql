-- Terminal security: master keys, working keys and sessions; PIN tries.
-- Every key is sealed (AES-GCM) under the operator's master key; only key
-- check values are stored in clear.

ALTER TABLE terminals
    ADD COLUMN tmk_sealed      bytea,
    ADD COLUMN tmk_kcv         text,
    ADD COLUMN key_scheme      text CHECK (key_scheme IN ('single', 'double', 'double_with_track')),
    ADD COLUMN pik_sealed      bytea,
    ADD COLUMN mak_sealed      bytea,
    ADD COLUMN tdk_sealed      bytea,
    ADD COLUMN session_state   text NOT NULL DEFAULT 'none'
        CHECK (session_state IN ('none', 'signed_on', 'signed_off')),
    ADD COLUMN key_generation  integer NOT NULL DEFAULT 0;

ALTER TABLE cards
    ADD COLUMN pin_failures integer NOT NULL DEFAULT 0 CHECK (pin_failures >= 0),
    ADD COLUMN pin_locked   boolean NOT NULL DEFAULT false;

-- One sealed known value: proves at start-up that the configured master key is
-- the one this database's keys were sealed under.
CREATE TABLE vault_check (
    id          integer PRIMARY KEY CHECK (id = 1),
    sealed      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
