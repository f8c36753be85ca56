-- Messages to members and merchants (docs/messages.md).
--
-- Who wants to be told, and how: contacts, one per recipient and channel. A
-- member is named by the card index, never the card number; the address (phone,
-- e-mail, URL) and a webhook's signing secret are sealed under the vault
-- ("contact:<kind>:<ref>:<channel>", "contact-secret:<...>"), only a masked form is
-- in clear.
--
-- What is to be sent: the outbox, one row per message and contact, written by the
-- triggers below in the same transaction as the event (an accrual's request row,
-- a card blocked, a day's clearing stored), so every write path, the group-commit
-- statements included, produces its messages and a rolled-back event none. The
-- delivery workers (pointswitch.messages) claim rows with FOR UPDATE SKIP LOCKED,
-- woken by NOTIFY pointswitch_outbox.

CREATE TABLE contacts (
    contact_id       bigserial PRIMARY KEY,
    recipient_kind   text NOT NULL CHECK (recipient_kind IN ('member', 'merchant')),
    recipient_ref    text NOT NULL,         -- the card index (member) or the merchant id
    channel          text NOT NULL CHECK (channel IN ('sms', 'email', 'webhook')),
    address_sealed   bytea NOT NULL,
    address_display  text NOT NULL,         -- masked: for screens and logs
    secret_sealed    bytea,                 -- a webhook's signing secret
    opt_in           boolean NOT NULL DEFAULT true,
    language         text NOT NULL DEFAULT 'zh-CN' CHECK (language IN ('zh-CN', 'en')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- The one index a trigger probes: a member with no contact costs one probe.
    UNIQUE (recipient_kind, recipient_ref, channel),
    CHECK (recipient_kind <> 'member' OR recipient_ref ~ '^[0-9a-f]{64}$'),
    CHECK (recipient_kind = 'merchant' OR channel <> 'webhook'),
    CHECK ((channel = 'webhook') = (secret_sealed IS NOT NULL))
);

CREATE TABLE outbox (
    message_id       bigserial PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('accrual', 'redemption', 'cash_out', 'insurance', 'card_blocked',
                                                   'points_expiring', 'clearing_statement')),
    recipient_kind   text NOT NULL CHECK (recipient_kind IN ('member', 'merchant')),
    recipient_ref    text NOT NULL,         -- as in contacts: a card index or a merchant id
    contact_id       bigint NOT NULL REFERENCES contacts,
    channel          text NOT NULL,
    idempotency_key  text NOT NULL UNIQUE,  -- sent to the channel: the same message is never taken twice
    request_id       bigint,                -- the request that caused it (the balance is read from its outcome)
    payload          jsonb NOT NULL,        -- the template's values; the card number masked only
    language         text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    retried_at       timestamptz,           -- an operator sent it again (its maximum age counts from here)
    not_before       timestamptz,           -- held for quiet hours (or a rate limit) until then
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    failed_at        timestamptz,
    last_error       text,
    CHECK (delivered_at IS NULL OR failed_at IS NULL),
    CHECK (recipient_kind <> 'member' OR recipient_ref ~ '^[0-9a-f]{64}$')
);
-- The workers' queue: messages still to send, by when they are due.
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL AND failed_at IS NULL;
-- A recipient's messages (the console's card page; rate limits count the last hour's).
CREATE INDEX outbox_recipient ON outbox (recipient_ref, channel, created_at);
CREATE INDEX outbox_failed ON outbox (failed_at) WHERE failed_at IS NOT NULL;

-- Queue message ``p_kind`` for every opted-in contact of a card: the payload gets
-- the masked card number; the key is <kind>:<p_ref>:<contact>. Returns how many.
CREATE FUNCTION outbox_for_card(p_kind text, p_card text, p_ref text, p_request bigint, p_payload jsonb)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO outbox (kind, recipient_kind, recipient_ref, contact_id, channel, idempotency_key, request_id,
                        payload, language)
    SELECT p_kind, 'member', p_card, c.contact_id, c.channel, p_kind || ':' || p_ref || ':' || c.contact_id,
           p_request, p_payload || jsonb_build_object('card', k.pan_display), c.language
    FROM contacts c JOIN cards k ON k.card_index = c.recipient_ref
    WHERE c.recipient_kind = 'member' AND c.recipient_ref = p_card AND c.opt_in
    ON CONFLICT (idempotency_key) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pointswitch_outbox', '');  -- one per transaction, however many
    END IF;
    RETURN n;
END
$$;

-- The same for a merchant's contacts (the payload gets the merchant's name).
CREATE FUNCTION outbox_for_merchant(p_kind text, p_merchant text, p_ref text, p_payload jsonb)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO outbox (kind, recipient_kind, recipient_ref, contact_id, channel, idempotency_key, payload, language)
    SELECT p_kind, 'merchant', p_merchant, c.contact_id, c.channel, p_kind || ':' || p_ref || ':' || c.contact_id,
           p_payload || jsonb_build_object('merchant_id', m.merchant_id, 'merchant_name', m.name), c.language
    FROM contacts c JOIN merchants m ON m.merchant_id = c.recipient_ref
    WHERE c.recipient_kind = 'merchant' AND c.recipient_ref = p_merchant AND c.opt_in
    ON CONFLICT (idempotency_key) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pointswitch_outbox', '');
    END IF;
    RETURN n;
END
$$;

-- What a member is told about a request: its points, where, when.
CREATE FUNCTION outbox_request_payload(r requests) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('points', r.points, 'amount_fen', r.amount_fen, 'merchant_id', r.merchant_id,
                              'merchant_name', (SELECT m.name FROM merchants m WHERE m.merchant_id = r.merchant_id),
                              'business_date', r.business_date, 'rrn', r.rrn)
$$;

-- Accruals and redemptions: approved when their request row is written (one
-- statement for a whole group commit). An approved row with points costs one
-- probe of the contacts index; only a member who has a contact gets further.
CREATE FUNCTION outbox_requests_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox_for_card(CASE r.operation WHEN 'accrue' THEN 'accrual' ELSE 'redemption' END,
                            r.card_index, r.request_id::text, r.request_id, outbox_request_payload(r))
    FROM inserted r
    WHERE r.state = 'approved' AND r.operation IN ('accrue', 'redeem') AND r.points > 0
      AND EXISTS (SELECT 1 FROM contacts c WHERE c.recipient_kind = 'member' AND c.recipient_ref = r.card_index
                  AND c.opt_in);
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_requests_inserted AFTER INSERT ON requests
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION outbox_requests_inserted();

-- Cash-out and insurance premiums: two-phase, told when the upstream host approved.
CREATE FUNCTION outbox_request_approved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox_for_card(NEW.operation, NEW.card_index, NEW.request_id::text, NEW.request_id,
                            outbox_request_payload(NEW));
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_request_approved AFTER UPDATE OF state ON requests FOR EACH ROW
    WHEN (OLD.state = 'pending' AND NEW.state = 'approved' AND NEW.operation IN ('cash_out', 'insurance'))
    EXECUTE FUNCTION outbox_request_approved();

-- A card blocked (by an operator). Each blocking is its own message.
CREATE FUNCTION outbox_card_blocked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox_for_card('card_blocked', NEW.card_index, txid_current()::text, NULL,
                            jsonb_build_object('blocked_at', now()));
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_card_blocked AFTER UPDATE OF status ON cards FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'blocked')
    EXECUTE FUNCTION outbox_card_blocked();

-- A merchant's daily clearing statement, when the day's clearing is stored.
CREATE FUNCTION outbox_clearing_stored() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox_for_merchant('clearing_statement', p.party, p.business_date::text, jsonb_build_object(
        'business_date', p.business_date, 'points_issued', p.points_issued, 'points_redeemed', p.points_redeemed,
        'issue_fee_fen', p.issue_fee_fen, 'redeem_value_fen', p.redeem_value_fen, 'net_fen', p.net_fen))
    FROM stored p WHERE p.kind = 'merchant';
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_clearing_stored AFTER INSERT ON clearing_positions
    REFERENCING NEW TABLE AS stored FOR EACH STATEMENT EXECUTE FUNCTION outbox_clearing_stored();

-- Points expiring within ``p_days`` business days of ``p_today``: one message per
-- card, expiry date and contact, however often this runs (the key holds the date).
-- Walks the due lots (point_lots_due), only of cards that have a contact.
CREATE FUNCTION outbox_points_expiring(p_today date, p_days integer) RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(outbox_for_card('points_expiring', e.card_index, e.expires_on::text, NULL,
                                        jsonb_build_object('points', e.points, 'expires_on', e.expires_on))), 0)::integer
    FROM (SELECT l.card_index, l.expires_on, sum(l.points_left) AS points FROM point_lots l
          WHERE l.points_left > 0 AND l.expires_on BETWEEN p_today AND p_today + p_days
            AND EXISTS (SELECT 1 FROM contacts c WHERE c.recipient_kind = 'member'
                        AND c.recipient_ref = l.card_index AND c.opt_in)
          GROUP BY l.card_index, l.expires_on) e
$$;
