-- Terminals are bound to how they authenticate, and sign-on cannot be used
-- against a terminal.
--
-- A terminal's profile says which dialect it speaks and how its messages are
-- authenticated; it transacts only on a listener with the same dialect and MAC
-- method. A sign-on no longer replaces the working keys in use: it issues
-- pending keys, remembered per peer address, and the old keys stay valid until
-- the terminal's first message that verifies under one of the pending MAKs,
-- which promotes that set. So a peer that knows only a terminal id can make
-- keys nobody uses, and nothing else.

ALTER TABLE terminals
    ADD COLUMN dialect          text NOT NULL DEFAULT 'cup' CHECK (dialect IN ('cup', 'iso87')),
    ADD COLUMN mac_method       text NOT NULL DEFAULT 'ecb' CHECK (mac_method IN ('ecb', 'x919', 'off')),
    -- A double-length MAK (3DES MAC) instead of UnionPay's single-length one; x919 always has one.
    ADD COLUMN double_mak       boolean NOT NULL DEFAULT false,
    -- Sign-on 60.3 = 001 (single-length PIK and MAK) is refused unless this is set.
    ADD COLUMN single_des_allowed boolean NOT NULL DEFAULT false,
    -- Key generations handed out so far; the keys in use carry key_generation.
    ADD COLUMN keys_issued      integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT terminals_x919_double_mak CHECK (mac_method <> 'x919' OR double_mak);
UPDATE terminals SET keys_issued = key_generation;

CREATE TABLE terminal_pending_keys (
    terminal_id     text NOT NULL REFERENCES terminals ON DELETE CASCADE,
    generation      integer NOT NULL,
    peer            text NOT NULL,          -- the address the sign-on came from
    key_scheme      text NOT NULL CHECK (key_scheme IN ('single', 'double', 'double_with_track')),
    pik_sealed      bytea NOT NULL,
    mak_sealed      bytea NOT NULL,
    tdk_sealed      bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, generation)
);

-- Every process keeps terminals' sessions in memory; any change to a terminal
-- or to its pending keys tells them all to forget that terminal.
CREATE FUNCTION notify_terminal_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pointswitch_terminals',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.terminal_id ELSE NEW.terminal_id END);
    RETURN NULL;
END $$;

CREATE TRIGGER terminals_changed AFTER INSERT OR UPDATE OR DELETE ON terminals
    FOR EACH ROW EXECUTE FUNCTION notify_terminal_changed();
CREATE TRIGGER terminal_pending_keys_changed AFTER INSERT OR UPDATE OR DELETE ON terminal_pending_keys
    FOR EACH ROW EXECUTE FUNCTION notify_terminal_changed();

-- A merchant's status is part of every one of its terminals' sessions: '*' = forget all.
CREATE FUNCTION notify_merchant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pointswitch_terminals', '*');
    RETURN NULL;
END $$;

CREATE TRIGGER merchants_changed AFTER UPDATE ON merchants
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION notify_merchant_changed();
