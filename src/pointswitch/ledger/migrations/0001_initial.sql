-- pointswitch ledger, version 1.
-- Points are bigint; money is bigint fen. A posting moves amount_points from one
-- account to another (debit -> credit), so the sum over all accounts is zero by
-- construction. Only the card's own balance is kept inline; merchant and
-- operator balances are derived from the postings (no hot rows).

CREATE TABLE accounts (
    account_id  bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('card', 'merchant_issued', 'merchant_redeemed', 'operator')),
    owner       text NOT NULL,
    UNIQUE (kind, owner)
);

CREATE TABLE merchants (
    merchant_id                 text PRIMARY KEY CHECK (merchant_id ~ '^[\x21-\x7e]{1,15}$'),
    name                        text NOT NULL,
    earn_rate_points_per_yuan   numeric(12, 4) NOT NULL CHECK (earn_rate_points_per_yuan >= 0),
    issue_price_fen_per_point   numeric(12, 4) NOT NULL DEFAULT 1 CHECK (issue_price_fen_per_point >= 0),
    redeem_value_fen_per_point  numeric(12, 4) NOT NULL DEFAULT 1 CHECK (redeem_value_fen_per_point > 0),
    status                      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    issued_account_id           bigint NOT NULL REFERENCES accounts,
    redeemed_account_id         bigint NOT NULL REFERENCES accounts,
    created_at                  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE terminals (
    terminal_id     text PRIMARY KEY CHECK (terminal_id ~ '^[\x21-\x7e]{1,8}$'),
    merchant_id     text NOT NULL REFERENCES merchants,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    current_batch   integer NOT NULL DEFAULT 1 CHECK (current_batch BETWEEN 1 AND 999999),
    signed_on_at    timestamptz,
    signed_off_at   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX terminals_merchant ON terminals (merchant_id);

CREATE TABLE cards (
    card_number     text PRIMARY KEY CHECK (card_number ~ '^[0-9]{12,19}$'),
    holder_name     text NOT NULL,
    phone           text,
    pin_hash        text,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    points_balance  bigint NOT NULL DEFAULT 0 CHECK (points_balance >= 0),
    account_id      bigint NOT NULL UNIQUE REFERENCES accounts,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE rrn_seq MAXVALUE 999999999999 CYCLE;

-- The request log: one row per idempotency key, holding the outcome that is
-- returned again on a retransmission. A reversal that arrives before its
-- original leaves a 'placeholder' row under the original's key, so the late
-- original finds the key taken and is not posted.
CREATE TABLE requests (
    request_id          bigserial PRIMARY KEY,
    request_key         text NOT NULL UNIQUE,
    fingerprint         bytea,
    operation           text NOT NULL,
    state               text NOT NULL CHECK (state IN ('approved', 'declined', 'placeholder')),
    status              text NOT NULL,
    terminal_id         text NOT NULL,
    merchant_id         text NOT NULL,
    card_number         text,
    amount_fen          bigint NOT NULL DEFAULT 0,
    points              bigint NOT NULL DEFAULT 0 CHECK (points >= 0),
    batch               integer NOT NULL,
    trace               integer NOT NULL,
    rrn                 text NOT NULL UNIQUE DEFAULT lpad(nextval('rrn_seq')::text, 12, '0'),
    original_request_id bigint REFERENCES requests,
    voided_by           bigint REFERENCES requests,
    refunded_fen        bigint NOT NULL DEFAULT 0 CHECK (refunded_fen >= 0),
    clawed_points       bigint NOT NULL DEFAULT 0 CHECK (clawed_points >= 0),
    shortfall_points    bigint NOT NULL DEFAULT 0 CHECK (shortfall_points >= 0),
    outcome             jsonb NOT NULL,
    reversed_at         timestamptz,
    reversal_outcome    jsonb,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX requests_card ON requests (card_number);

CREATE TABLE postings (
    posting_id          bigserial PRIMARY KEY,
    request_id          bigint NOT NULL REFERENCES requests,
    reason              text NOT NULL,
    debit_account_id    bigint NOT NULL REFERENCES accounts,
    credit_account_id   bigint NOT NULL REFERENCES accounts,
    amount_points       bigint NOT NULL CHECK (amount_points > 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (debit_account_id <> credit_account_id),
    -- No request is posted twice for the same reason (invariant 3).
    UNIQUE (request_id, reason)
);
CREATE INDEX postings_debit ON postings (debit_account_id);
CREATE INDEX postings_credit ON postings (credit_account_id);

-- Balances of every account, derived from the journal.
CREATE VIEW account_balances AS
SELECT a.account_id, a.kind, a.owner,
       coalesce(c.total, 0) - coalesce(d.total, 0) AS balance_points
FROM accounts a
LEFT JOIN (SELECT credit_account_id AS id, sum(amount_points) AS total FROM postings GROUP BY 1) c
       ON c.id = a.account_id
LEFT JOIN (SELECT debit_account_id AS id, sum(amount_points) AS total FROM postings GROUP BY 1) d
       ON d.id = a.account_id;
