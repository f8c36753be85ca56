-- The business day. Every request and every posting belongs to exactly one
-- business date. The date is the clock's (local time in the network's time zone,
-- the day after once past the cut-off time), but never a day already cut off: a
-- forced cut-off ("admin day close" with no date) opens the next day at once.
--
-- Cutting a day off and posting into it exclude each other without a hot row:
-- every transaction that posts takes a shared advisory lock when it first asks
-- for the business date (business_date_now(), the columns' default); the cut-off
-- takes that lock exclusively, so it waits for the transactions in flight and
-- the ones after it read the new cut_through.

CREATE TABLE business_calendar (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    cutoff       time NOT NULL DEFAULT '23:00',
    time_zone    text NOT NULL DEFAULT 'Asia/Shanghai',
    first_day    date NOT NULL,              -- the network's first business date
    cut_through  date                        -- the newest day cut off: no posting joins it or any before
);

-- The clock's business date for a time.
CREATE FUNCTION business_date_at(at timestamptz, cutoff time, time_zone text) RETURNS date
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN (at AT TIME ZONE time_zone)::time >= cutoff AND cutoff <> '00:00'
                THEN (at AT TIME ZONE time_zone)::date + 1
                ELSE (at AT TIME ZONE time_zone)::date END
$$;

-- The business date a posting made now belongs to. VOLATILE on purpose: its
-- query runs with a fresh snapshot taken after the lock is granted, so it sees a
-- cut-off that committed while it waited. The date cannot change while the lock
-- is held (until the transaction ends), so it is kept in a transaction-local
-- setting that the columns' default reads before calling this again.
CREATE FUNCTION business_date_now() RETURNS date
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    c business_calendar;
    d date;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1886350433);  -- 'pday'
    SELECT * INTO c FROM business_calendar;
    d := greatest(business_date_at(now(), c.cutoff, c.time_zone), c.cut_through + 1);
    PERFORM set_config('pointswitch.business_date', d::text, true);
    RETURN d;
END
$$;

-- The transaction's business date: asked for once, then read back.
CREATE FUNCTION business_date_of_transaction() RETURNS date
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(nullif(current_setting('pointswitch.business_date', true), '')::date, business_date_now())
$$;

INSERT INTO business_calendar (first_day)
SELECT business_date_at(coalesce((SELECT min(created_at) FROM requests), now()), '23:00', 'Asia/Shanghai');

ALTER TABLE requests ADD COLUMN business_date date;
UPDATE requests SET business_date = business_date_at(created_at, '23:00', 'Asia/Shanghai');
ALTER TABLE requests ALTER COLUMN business_date SET DEFAULT business_date_of_transaction(),
                     ALTER COLUMN business_date SET NOT NULL;

ALTER TABLE postings ADD COLUMN business_date date;
UPDATE postings SET business_date = business_date_at(created_at, '23:00', 'Asia/Shanghai');
ALTER TABLE postings ALTER COLUMN business_date SET DEFAULT business_date_of_transaction(),
                     ALTER COLUMN business_date SET NOT NULL;

-- Rows arrive in date order (almost: a day's expiry is written while the next day
-- has begun), so a BRIN index finds a day's rows for next to no cost on insert.
CREATE INDEX requests_business_date ON requests USING brin (business_date);
CREATE INDEX postings_business_date ON postings USING brin (business_date);

-- The journal is append-only: a posting is never changed or removed.
CREATE FUNCTION postings_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only: postings are never updated or deleted';
END
$$;
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION postings_append_only();

-- One row per business day that has been cut off. 'cut_off': no posting joins
-- it any more, its expiry and clearing are under way; 'closed': done, immutable,
-- with the checksum of its postings so that any later change shows.
CREATE TABLE business_days (
    business_date      date PRIMARY KEY,
    state              text NOT NULL CHECK (state IN ('cut_off', 'closed')),
    forced             boolean NOT NULL DEFAULT false,  -- cut off by an operator before its cut-off time
    cut_off_at         timestamptz NOT NULL DEFAULT now(),
    closed_at          timestamptz,
    closed_by          text,
    postings_count     bigint,
    postings_checksum  text,
    points_expired     bigint,
    points_outstanding bigint,          -- sum of card balances at the end of the day (the liability)
    sum_net_fen        bigint,
    report             jsonb            -- the clearing report, as shown and written to the file
);

INSERT INTO accounts (kind, owner) VALUES ('operator', 'expired') ON CONFLICT DO NOTHING;

-- A closed day's clearing: one row per party (a merchant, 'bank', 'insurer',
-- 'network'); net_fen > 0: the network pays the party. A day's rows sum to zero.
CREATE TABLE clearing_positions (
    business_date       date NOT NULL REFERENCES business_days,
    party               text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('merchant', 'upstream', 'network')),
    points_issued       bigint NOT NULL DEFAULT 0,
    points_redeemed     bigint NOT NULL DEFAULT 0,
    issue_price_fen_per_point  numeric(12, 4),
    redeem_value_fen_per_point numeric(12, 4),
    issue_fee_fen       bigint NOT NULL DEFAULT 0,   -- owed by the merchant for points issued at it
    redeem_value_fen    bigint NOT NULL DEFAULT 0,   -- owed to the merchant for points redeemed at it
    paid_out_fen        bigint NOT NULL DEFAULT 0,   -- cash to bank cards, premiums to insurers
    net_fen             bigint NOT NULL,
    PRIMARY KEY (business_date, party)
);
