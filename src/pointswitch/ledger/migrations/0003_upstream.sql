-- Points that leave the network through an upstream host (cash to a bank card,
-- an insurance premium): two-phase holds and a store-and-forward queue of
-- reversals owed to those hosts.
--
-- A hold moves the points from the card to the operator's 'holds' account, so
-- the card cannot spend them twice and the journal stays balanced; approval
-- moves them on to the operator's 'cash_out' or 'insurance' account, a decline
-- or a timeout moves them back to the card.

ALTER TABLE requests DROP CONSTRAINT requests_state_check;
ALTER TABLE requests ADD CONSTRAINT requests_state_check
    CHECK (state IN ('approved', 'declined', 'placeholder', 'pending'));

ALTER TABLE requests
    ADD COLUMN upstream_connector   text,
    ADD COLUMN upstream_reference   text,           -- retrieval reference (37) sent upstream
    ADD COLUMN upstream_rc          text,           -- the host's response code
    ADD COLUMN upstream_auth        text,           -- the host's reference for the member
    ADD COLUMN reversal_sealed      bytea,          -- the reversal to send if it comes to that (opaque, sealed)
    ADD COLUMN reversal_requested   boolean NOT NULL DEFAULT false,
    ADD COLUMN deadline_at          timestamptz;    -- a pending request past this is timed out
CREATE INDEX requests_pending ON requests (deadline_at) WHERE state = 'pending';
CREATE INDEX requests_card_day ON requests (card_number, operation, created_at)
    WHERE upstream_connector IS NOT NULL;

INSERT INTO accounts (kind, owner) VALUES ('operator', 'holds'), ('operator', 'cash_out'), ('operator', 'insurance')
ON CONFLICT DO NOTHING;

-- Reversals owed to upstream hosts, sent until acknowledged (0410 / 0430).
CREATE TABLE upstream_reversals (
    reversal_id       bigserial PRIMARY KEY,
    request_id        bigint NOT NULL UNIQUE REFERENCES requests,  -- at most one reversal per request
    connector         text NOT NULL,
    reason            text NOT NULL CHECK (reason IN ('timeout', 'lost', 'terminal_reversal', 'late_approval')),
    message_sealed    bytea NOT NULL,
    points_on_ack     bigint NOT NULL DEFAULT 0 CHECK (points_on_ack >= 0),  -- back to the card when acknowledged
    state             text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'acknowledged', 'expired')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    last_error        text,
    upstream_rc       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    acknowledged_at   timestamptz
);
CREATE INDEX upstream_reversals_due ON upstream_reversals (next_attempt_at) WHERE state = 'pending';

-- What each connector of the running switch last reported (for `pointswitch admin connectors`).
CREATE TABLE connector_status (
    name        text PRIMARY KEY,
    state       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
