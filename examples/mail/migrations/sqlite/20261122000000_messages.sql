-- The message queue: one row per accepted job, keyed by the caller's
-- message_id, so a job delivered twice is stored once.
--
-- Times are milliseconds since the Unix epoch (UTC).
--
-- Life of a row: queued -> sending (leased by one worker until lease_until)
-- -> sent; a failed attempt puts it back to queued with a later
-- next_attempt_at; after the last attempt it is dead. A worker that dies
-- leaves its row in sending with an expired lease, and another worker
-- takes it again.
CREATE TABLE messages (
    message_id      TEXT    NOT NULL PRIMARY KEY,
    recipient       TEXT    NOT NULL,
    template        TEXT    NOT NULL,
    data            TEXT    NOT NULL CHECK (json_valid(data)),
    correlation_id  TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'sending', 'sent', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    lease_owner     TEXT,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    CHECK ((status = 'sending') = (lease_owner IS NOT NULL AND lease_until IS NOT NULL))
) STRICT;

-- What the workers look for: due queued rows and expired leases.
CREATE INDEX messages_due ON messages (status, next_attempt_at);
