-- Terminal batch settlement (0500) and batch upload (0320).
--
-- The switch owns each terminal's batch (terminals.current_batch). A settlement
-- closes it: the host's totals of the batch are computed from the request log,
-- compared with the terminal's, stored here with the answer given, and the
-- terminal's batch advances in the same transaction. A terminal's settlements
-- are numbered by settlement_id: the newest one is "the batch just settled",
-- which a retransmitted 0500 replays and a batch upload belongs to.

CREATE TABLE batch_settlements (
    settlement_id        bigserial PRIMARY KEY,
    terminal_id          text NOT NULL REFERENCES terminals,
    merchant_id          text NOT NULL,
    batch                integer NOT NULL CHECK (batch BETWEEN 1 AND 999999),
    trace                integer NOT NULL,
    business_date        date NOT NULL,
    terminal_debit_fen   bigint NOT NULL,
    terminal_debit_count integer NOT NULL,
    terminal_credit_fen  bigint NOT NULL,
    terminal_credit_count integer NOT NULL,
    host_debit_fen       bigint NOT NULL,
    host_debit_count     integer NOT NULL,
    host_credit_fen      bigint NOT NULL,
    host_credit_count    integer NOT NULL,
    agree                boolean NOT NULL,
    settled_at           timestamptz NOT NULL DEFAULT now(),
    outcome              jsonb NOT NULL,            -- the answer given, replayed to a retransmission
    -- Batch upload: records received, then the end message's reconciliation.
    upload_messages      integer NOT NULL DEFAULT 0,
    upload_records       integer NOT NULL DEFAULT 0,
    upload_ended_at      timestamptz,
    upload_records_sent  integer,                   -- what the end message says was sent
    terminal_agreed      boolean,                   -- 207 (true) or 202 (false) ended the upload
    reconciliation       jsonb                      -- counts per kind of line
);
CREATE INDEX batch_settlements_terminal ON batch_settlements (terminal_id, settlement_id DESC);
CREATE INDEX batch_settlements_date ON batch_settlements (business_date);

-- Every upload message (records or end) of a settlement, by its trace (11): a
-- retransmission is answered from here and stores nothing twice.
CREATE TABLE batch_upload_messages (
    settlement_id  bigint NOT NULL REFERENCES batch_settlements,
    trace          integer NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('records', 'end')),
    fingerprint    bytea NOT NULL,
    outcome        jsonb NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (settlement_id, trace)
);

-- The records a terminal uploaded. No clear card number: its index (vault) and a
-- masked form for operators.
CREATE TABLE batch_upload_records (
    settlement_id      bigint NOT NULL REFERENCES batch_settlements,
    trace              integer NOT NULL,           -- the transaction's trace
    card_organisation  text NOT NULL,
    card_index         text NOT NULL,
    card_display       text NOT NULL,
    amount_fen         bigint NOT NULL,
    PRIMARY KEY (settlement_id, trace)
);

-- The reconciliation of an upload against the host's log of the batch, one line
-- per transaction: matched, terminal_only, host_only, amount_differs, card_differs.
CREATE TABLE batch_reconciliation (
    settlement_id        bigint NOT NULL REFERENCES batch_settlements,
    trace                integer NOT NULL,
    kind                 text NOT NULL CHECK (kind IN ('matched', 'terminal_only', 'host_only',
                                                      'amount_differs', 'card_differs')),
    operation            text,                      -- the host's, when it has the transaction
    card_display         text,
    terminal_amount_fen  bigint,
    host_amount_fen      bigint,
    PRIMARY KEY (settlement_id, trace)
);

-- A batch's totals read the terminal's requests of one batch.
CREATE INDEX requests_terminal_batch ON requests (terminal_id, batch);
