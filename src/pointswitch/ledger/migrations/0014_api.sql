-- The JSON API for PC and mobile terminals (docs/api.md).
--
-- An API terminal is a terminal row of its merchant whose dialect is 'api': no
-- ISO listener admits it (its dialect is no listener's), so its trace numbers
-- belong to the API alone. Its key signs every request (HMAC-SHA256); the
-- switch must know the key to verify, so it is kept sealed under the master key
-- ("api-key:<terminal>:<generation>"), never in clear.
ALTER TABLE terminals DROP CONSTRAINT IF EXISTS terminals_dialect_check;
ALTER TABLE terminals ADD CONSTRAINT terminals_dialect_check CHECK (dialect IN ('cup', 'iso87', 'api'));

CREATE TABLE api_keys (
    terminal_id  text PRIMARY KEY REFERENCES terminals ON DELETE CASCADE,
    generation   integer NOT NULL CHECK (generation >= 1),
    key_sealed   bytea NOT NULL,
    issued_at    timestamptz NOT NULL DEFAULT now()
);

-- An Idempotency-Key of an API terminal is mapped once to a trace number of the
-- terminal's open batch; the request is then posted under the ledger's own
-- request key (terminal:batch:trace) with its fingerprint, exactly as an ISO
-- request, so the request log's unique key alone decides what was posted.
CREATE TABLE api_requests (
    terminal_id      text NOT NULL REFERENCES terminals ON DELETE CASCADE,
    idempotency_key  text NOT NULL CHECK (idempotency_key ~ '^[\x21-\x7e]{1,64}$'),
    batch            integer NOT NULL,
    trace            integer NOT NULL CHECK (trace BETWEEN 1 AND 999999),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, idempotency_key),
    UNIQUE (terminal_id, batch, trace)
);

-- The last trace number drawn per terminal and batch.
CREATE TABLE api_traces (
    terminal_id  text NOT NULL REFERENCES terminals ON DELETE CASCADE,
    batch        integer NOT NULL,
    last_trace   integer NOT NULL,
    PRIMARY KEY (terminal_id, batch)
);

-- Members' one-time login codes: only a keyed hash of the code, its expiry and
-- the wrong tries; a card locked out after too many wrong codes until locked_until.
CREATE TABLE member_codes (
    card_index    text PRIMARY KEY,
    code_hash     bytea,
    expires_at    timestamptz,
    tries         integer NOT NULL DEFAULT 0,
    failures      integer NOT NULL DEFAULT 0,
    sent_at       timestamptz,
    locked_until  timestamptz
);

-- Codes handed to the delivery seam (web.api.login_codes.CodeSender) when no message
-- channel takes them: sealed ("member-code:<card_index>"), kept until expiry.
CREATE TABLE member_code_deliveries (
    delivery_id   bigserial PRIMARY KEY,
    card_index    text NOT NULL,
    code_sealed   bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX member_code_deliveries_card ON member_code_deliveries (card_index, delivery_id);

-- A secret of the web layer (members' token signing key), sealed ("api-secret:<name>").
CREATE TABLE api_secrets (
    name        text PRIMARY KEY,
    sealed      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
