-- Users, service clients, refresh tokens and signing keys: everything the
-- token endpoint needs. Times are Unix seconds.

-- People who log in with the password grant. `password_hash` is an argon2id
-- PHC string; `grants` is a JSON array of permission grants (the `perms`
-- claim of their access tokens).
CREATE TABLE users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    grants        TEXT NOT NULL DEFAULT '[]',
    created_at    BIGINT NOT NULL
);

-- Services that authenticate as themselves (client-credentials grant).
CREATE TABLE clients (
    client_id   TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    grants      TEXT NOT NULL DEFAULT '[]',
    created_at  BIGINT NOT NULL
);

-- Refresh tokens, stored only as the SHA-256 of the token. Every token
-- descends from one login: its family. A token is used once (`used_at`);
-- presenting a used token again revokes the whole family (`revoked_at`).
CREATE TABLE refresh_tokens (
    token_hash BYTEA PRIMARY KEY,
    family_id  TEXT NOT NULL,
    username   TEXT NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    -- The scope asked for at login (space-separated grants), or NULL for
    -- every grant of the user.
    scope      TEXT,
    issued_at  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    revoked_at BIGINT
);
CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);

-- Ed25519 signing keys (PKCS#8). The key without `retired_at` is current and
-- signs new tokens; a retired key stays published in the JWKS until every
-- token it signed has expired, then it is deleted.
CREATE TABLE signing_keys (
    kid        TEXT PRIMARY KEY,
    pkcs8      BYTEA NOT NULL,
    public_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);
-- At most one current key.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;
