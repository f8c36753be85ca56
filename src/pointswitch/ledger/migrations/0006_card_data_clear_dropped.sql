-- Card data protected at rest, step 2 of 2: the clear columns go, with their
-- indexes and constraints; the sealed ones become required and the card index
-- the key. Dropped columns leave their bytes in the table files until the rows
-- are rewritten: the migration runner rewrites these tables (VACUUM FULL)
-- right after this migration commits.

ALTER TABLE cards DROP COLUMN card_number, DROP COLUMN holder_name, DROP COLUMN phone;
ALTER TABLE cards
    ALTER COLUMN card_index SET NOT NULL,
    ALTER COLUMN pan_sealed SET NOT NULL,
    ALTER COLUMN holder_sealed SET NOT NULL,
    ALTER COLUMN pan_display SET NOT NULL,
    ADD CONSTRAINT cards_pkey PRIMARY KEY (card_index),
    -- Shapes that cannot hold a clear card number.
    ADD CONSTRAINT cards_card_index_check CHECK (card_index ~ '^[0-9a-f]{64}$'),
    ADD CONSTRAINT cards_pan_display_check CHECK (pan_display ~ '^[0-9]{6}[*]{2,9}[0-9]{4}$');

ALTER TABLE requests DROP COLUMN card_number;  -- and with it requests_card, requests_card_day
ALTER TABLE requests ADD CONSTRAINT requests_card_index_check CHECK (card_index ~ '^[0-9a-f]{64}$');
CREATE INDEX requests_card ON requests (card_index);
CREATE INDEX requests_card_day ON requests (card_index, operation, created_at)
    WHERE upstream_connector IS NOT NULL;

-- A card's account is owned by its card index.
ALTER TABLE accounts ADD CONSTRAINT accounts_card_owner_check
    CHECK (kind <> 'card' OR owner ~ '^[0-9a-f]{64}$');
