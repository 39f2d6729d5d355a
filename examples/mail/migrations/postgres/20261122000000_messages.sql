-- The message queue (Postgres): the same table as migrations/sqlite, one
-- row per accepted job, keyed by the caller's message_id, so a job
-- delivered twice is stored once.
--
-- Times are milliseconds since the Unix epoch (UTC), as BIGINT.
--
-- Life of a row: queued -> sending (leased by one worker until lease_until)
-- -> sent; a failed attempt puts it back to queued with a later
-- next_attempt_at; after the last attempt it is dead. A worker that dies
-- leaves its row in sending with an expired lease, and another worker
-- takes it again.
--
-- `data` has no JSON check here: the service stores what serde_json wrote,
-- and jsonb would refuse some valid JSON (a string holding \u0000).
CREATE TABLE messages (
    message_id      TEXT    NOT NULL PRIMARY KEY,
    recipient       TEXT    NOT NULL,
    template        TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    correlation_id  TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'sending', 'sent', 'dead')),
    attempts        BIGINT  NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at BIGINT  NOT NULL,
    lease_until     BIGINT,
    lease_owner     TEXT,
    last_error      TEXT,
    created_at      BIGINT  NOT NULL,
    sent_at         BIGINT,
    CHECK ((status = 'sending') = (lease_owner IS NOT NULL AND lease_until IS NOT NULL))
);

-- What the workers look for: due queued rows and expired leases.
CREATE INDEX messages_due ON messages (status, next_attempt_at);
