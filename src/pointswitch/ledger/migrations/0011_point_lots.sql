-- Points lots: every accrual is a lot on its card, with the business date it was
-- earned on and the last business date its points are valid (NULL: never). A
-- spend draws from the lots that expire first (never-expiring last, ties by lot
-- id) and records what it drew (lot_draws); giving a spend back returns its draws
-- to their lots, with their original expiry. Invariant: for every card, the sum
-- of points_left over its lots equals cards.points_balance.
--
-- Lock order, as everywhere: the card row first, then its lots. The functions
-- below take the card row lock themselves (or are called with it held), so a
-- card's lots only ever change under its card row lock.

CREATE TABLE point_lots (
    lot_id         bigserial PRIMARY KEY,
    card_index     text NOT NULL REFERENCES cards (card_index),
    -- The accrual that earned it; NULL for the opening lot of this migration and
    -- for points given back that no draw accounts for (spends older than lots).
    request_id     bigint UNIQUE REFERENCES requests,
    origin         text NOT NULL CHECK (origin IN ('accrual', 'opening', 'returned')),
    earned_on      date NOT NULL,
    expires_on     date,                 -- the last business date its points are valid; NULL: never
    points_earned  bigint NOT NULL CHECK (points_earned >= 0),
    points_left    bigint NOT NULL CHECK (points_left >= 0 AND points_left <= points_earned)
);
-- A card's open lots in spending order (ASC puts NULL, never expiring, last), and
-- the expiry run's walk over cards.
CREATE INDEX point_lots_open ON point_lots (card_index, expires_on, lot_id) WHERE points_left > 0;
CREATE INDEX point_lots_due ON point_lots (expires_on) WHERE points_left > 0 AND expires_on IS NOT NULL;

-- What a request took from each lot: a spend (redemption, hold), a take-back (void,
-- refund or reversal of an accrual, from that accrual's lot) or an expiry.
-- ``returned``: given back to the lot (the spend was voided, reversed, released).
CREATE TABLE lot_draws (
    draw_id     bigserial PRIMARY KEY,
    request_id  bigint NOT NULL REFERENCES requests,
    lot_id      bigint NOT NULL REFERENCES point_lots,
    points      bigint NOT NULL CHECK (points > 0),
    returned    boolean NOT NULL DEFAULT false
);
CREATE INDEX lot_draws_request ON lot_draws (request_id) WHERE NOT returned;
CREATE INDEX lot_draws_lot ON lot_draws (lot_id);

-- Existing balances: one opening lot per card, earned on the migration's business
-- date, never expiring (they were earned under a promise that points do not
-- expire; a network that wants them to expire sets expires_on by hand, see
-- docs/expiry.md).
INSERT INTO point_lots (card_index, origin, earned_on, expires_on, points_earned, points_left)
SELECT card_index, 'opening', business_date_now(), NULL, points_balance, points_balance
FROM cards WHERE points_balance > 0;

-- Draw ``points`` from a card's lots, those that expire first first. The caller
-- holds the card row lock and has taken the points off the card's balance; every
-- writer of a card's lots holds that lock first, so the lots need no lock of their
-- own. The walk follows point_lots_open in spending order and stops as soon as
-- enough is drawn: a card with a thousand lots costs a spend the lots it takes.
CREATE FUNCTION lots_draw(p_card text, p_points bigint) RETURNS TABLE (lot_id bigint, points bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_lot record;
    v_left bigint := p_points;
BEGIN
    IF p_points <= 0 THEN
        RETURN;
    END IF;
    FOR v_lot IN SELECT l.lot_id, l.points_left FROM point_lots l
                 WHERE l.card_index = p_card AND l.points_left > 0
                 ORDER BY l.expires_on ASC NULLS LAST, l.lot_id LOOP
        lot_id := v_lot.lot_id;
        points := least(v_lot.points_left, v_left);
        UPDATE point_lots l SET points_left = l.points_left - points WHERE l.lot_id = v_lot.lot_id;
        RETURN NEXT;
        v_left := v_left - points;
        EXIT WHEN v_left = 0;
    END LOOP;
END
$$;

-- Earn on a card: lock its row, add the points, and say which of its lots expire
-- next (before the new lot exists: the caller adds it) for the member's answer.
CREATE FUNCTION card_earn(p_card text, p_points bigint, OUT balance bigint, OUT account_id bigint,
                          OUT next_date date, OUT next_points bigint)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE cards c SET points_balance = c.points_balance + p_points, updated_at = now()
    WHERE c.card_index = p_card RETURNING c.points_balance, c.account_id INTO balance, account_id;
    IF NOT FOUND THEN RETURN; END IF;
    SELECT l.expires_on, sum(l.points_left) INTO next_date, next_points FROM point_lots l
    WHERE l.card_index = p_card AND l.points_left > 0 AND l.expires_on IS NOT NULL
    GROUP BY l.expires_on ORDER BY l.expires_on LIMIT 1;
END
$$;

-- Spend from a card: lock its row, take ``p_points`` off its balance (with
-- ``p_cap``: what there is, when there is less) and draw them from its lots.
-- applied is NULL when there is no such card or (without cap) too few points.
-- The draws come back as arrays: the caller records them once its request row exists.
CREATE FUNCTION card_spend(p_card text, p_points bigint, p_cap boolean,
                           OUT applied bigint, OUT balance bigint, OUT account_id bigint,
                           OUT lot_ids bigint[], OUT lot_points bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    IF p_cap THEN
        SELECT least(p_points, c.points_balance) INTO applied FROM cards c WHERE c.card_index = p_card FOR UPDATE;
        IF NOT FOUND THEN RETURN; END IF;
    ELSE
        applied := p_points;
    END IF;
    UPDATE cards c SET points_balance = c.points_balance - applied, updated_at = now()
    WHERE c.card_index = p_card AND c.points_balance - applied >= 0
    RETURNING c.points_balance, c.account_id INTO balance, account_id;
    IF NOT FOUND THEN
        applied := NULL;
        RETURN;
    END IF;
    SELECT coalesce(array_agg(d.lot_id ORDER BY d.lot_id), '{}'), coalesce(array_agg(d.points ORDER BY d.lot_id), '{}')
    INTO lot_ids, lot_points FROM lots_draw(p_card, applied) d;
    IF (SELECT coalesce(sum(x), 0) FROM unnest(lot_points) x) <> applied THEN
        RAISE EXCEPTION 'the lots of card % do not cover its balance', left(p_card, 8);
    END IF;
END
$$;

-- Take back up to ``p_points`` of an accrual (void, refund, reversal): only what is
-- left of that accrual's own lot. An accrual older than lots has none: then the
-- card's lots are drawn (those that expire first), capped at the balance.
CREATE FUNCTION card_take_lot(p_card text, p_accrual bigint, p_points bigint,
                              OUT applied bigint, OUT balance bigint, OUT account_id bigint,
                              OUT lot_ids bigint[], OUT lot_points bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_lot point_lots;
BEGIN
    SELECT least(p_points, c.points_balance) INTO applied FROM cards c WHERE c.card_index = p_card FOR UPDATE;
    IF NOT FOUND THEN RETURN; END IF;
    SELECT * INTO v_lot FROM point_lots l WHERE l.request_id = p_accrual FOR UPDATE;
    IF NOT FOUND THEN
        SELECT s.applied, s.balance, s.account_id, s.lot_ids, s.lot_points
        INTO applied, balance, account_id, lot_ids, lot_points FROM card_spend(p_card, applied, true) s;
        RETURN;
    END IF;
    applied := least(p_points, v_lot.points_left);
    UPDATE point_lots SET points_left = points_left - applied WHERE lot_id = v_lot.lot_id;
    UPDATE cards c SET points_balance = c.points_balance - applied, updated_at = now()
    WHERE c.card_index = p_card RETURNING c.points_balance, c.account_id INTO balance, account_id;
    lot_ids := CASE WHEN applied > 0 THEN ARRAY[v_lot.lot_id] ELSE '{}' END;
    lot_points := CASE WHEN applied > 0 THEN ARRAY[applied] ELSE '{}' END;
END
$$;

-- Give back to a card the ``p_points`` that request ``p_request`` took: its draws
-- not yet returned go back to their lots (with their original expiry). Points no
-- draw accounts for (a request older than lots) become a never-expiring lot
-- earned on ``p_day``.
CREATE FUNCTION card_give_back(p_card text, p_request bigint, p_points bigint, p_day date,
                               OUT applied bigint, OUT balance bigint, OUT account_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_drawn bigint;
BEGIN
    UPDATE cards c SET points_balance = c.points_balance + p_points, updated_at = now()
    WHERE c.card_index = p_card RETURNING c.points_balance, c.account_id INTO balance, account_id;
    IF NOT FOUND THEN RETURN; END IF;
    applied := p_points;
    WITH back AS (
        UPDATE lot_draws d SET returned = true WHERE d.request_id = p_request AND NOT d.returned
        RETURNING d.lot_id, d.points
    ), per_lot AS (
        SELECT b.lot_id, sum(b.points) AS points FROM back b GROUP BY b.lot_id
    ), restored AS (
        UPDATE point_lots l SET points_left = l.points_left + p.points FROM per_lot p WHERE l.lot_id = p.lot_id
        RETURNING p.points
    )
    SELECT coalesce(sum(r.points), 0) INTO v_drawn FROM restored r;
    IF v_drawn > p_points THEN
        RAISE EXCEPTION 'request % drew % points but gives back %', p_request, v_drawn, p_points;
    END IF;
    IF v_drawn < p_points THEN
        INSERT INTO point_lots (card_index, origin, earned_on, expires_on, points_earned, points_left)
        VALUES (p_card, 'returned', p_day, NULL, p_points - v_drawn, p_points - v_drawn);
    END IF;
END
$$;

-- Expire a card's lots due on ``p_day`` (expires_on <= p_day): one request row per
-- card and day (key expiry:<day>:<card index>), an 'expire' posting card -> the
-- operator's expired account, dated ``p_day``. Returns the points expired (0: none
-- due, or this card's expiry of that day is written already).
CREATE FUNCTION card_expire(p_card text, p_day date, p_expired_account bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_points bigint;
    v_request bigint;
    v_balance bigint;
    v_account bigint;
BEGIN
    PERFORM 1 FROM cards c WHERE c.card_index = p_card FOR UPDATE;
    SELECT coalesce(sum(l.points_left), 0) INTO v_points FROM point_lots l
    WHERE l.card_index = p_card AND l.expires_on <= p_day AND l.points_left > 0;
    IF v_points = 0 THEN RETURN 0; END IF;
    INSERT INTO requests (request_key, operation, state, status, terminal_id, merchant_id, card_index,
                          amount_fen, points, batch, trace, outcome, business_date)
    VALUES ('expiry:' || p_day::text || ':' || p_card, 'expire', 'approved', 'approved', 'host', '', p_card,
            0, v_points, 0, 0, '{}', p_day)
    ON CONFLICT (request_key) DO NOTHING
    RETURNING request_id INTO v_request;
    IF v_request IS NULL THEN RETURN 0; END IF;
    WITH due AS (
        SELECT l.lot_id, l.points_left FROM point_lots l
        WHERE l.card_index = p_card AND l.expires_on <= p_day AND l.points_left > 0
        FOR UPDATE
    ), drawn AS (
        INSERT INTO lot_draws (request_id, lot_id, points) SELECT v_request, d.lot_id, d.points_left FROM due d
    )
    UPDATE point_lots l SET points_left = 0 FROM due d WHERE l.lot_id = d.lot_id;
    UPDATE cards c SET points_balance = c.points_balance - v_points, updated_at = now()
    WHERE c.card_index = p_card RETURNING c.points_balance, c.account_id INTO v_balance, v_account;
    INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points, business_date)
    VALUES (v_request, 'expire', v_account, p_expired_account, v_points, p_day);
    UPDATE requests SET outcome = jsonb_build_object('status', 'approved', 'points_moved', v_points,
                                                     'points_balance', v_balance, 'business_date', p_day::text)
    WHERE request_id = v_request;
    RETURN v_points;
END
$$;
