-- PIN tries reserved before the PIN is verified (outside any transaction): a try
-- in progress counts against the limit until it ends, so parallel guesses cannot
-- get more tries than max_pin_tries. A check that never ended (the process died
-- in between) counts as a wrong PIN once it is older than the check's time limit.
ALTER TABLE cards
    ADD COLUMN pin_checks_pending integer NOT NULL DEFAULT 0 CHECK (pin_checks_pending >= 0),
    ADD COLUMN pin_check_at timestamptz;
