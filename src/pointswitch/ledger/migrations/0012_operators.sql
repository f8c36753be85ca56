-- Operator accounts of the web console (docs/console.md). A password is stored
-- only as an scrypt hash ("scrypt$n$r$p$salt$hash"). failed_logins counts wrong
-- passwords since the last good one; past the limit the account is locked until
-- locked_until. session_generation is written into every session cookie: raising
-- it (logout, new password, new role, disabled) ends every session already issued.

CREATE TABLE operators (
    operator_id         bigserial PRIMARY KEY,
    name                text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9._-]{1,31}$'),
    role                text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash       text NOT NULL,
    disabled            boolean NOT NULL DEFAULT false,
    failed_logins       integer NOT NULL DEFAULT 0 CHECK (failed_logins >= 0),
    locked_until        timestamptz,
    session_generation  integer NOT NULL DEFAULT 1,
    last_login_at       timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The console's overview counts the last hour's requests by the minute: a BRIN
-- index on the append-ordered created_at finds them for almost nothing on insert.
CREATE INDEX requests_created_at ON requests USING brin (created_at);
