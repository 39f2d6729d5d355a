-- Orders, the idempotency keys that guard their creation, and the outbox of
-- events to deliver (Postgres): the same tables as migrations/sqlite. All
-- three are written in one transaction per order. Every integer is BIGINT.

CREATE TABLE orders (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL,
    ticket_id       TEXT NOT NULL,
    quantity        BIGINT NOT NULL CHECK (quantity BETWEEN 1 AND 100),
    email           TEXT NOT NULL,
    reservation_id  TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('placed', 'confirmed', 'attention')),
    correlation_id  TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE INDEX orders_by_account ON orders (account, created_at);

-- One row per (account, caller, key): the scope of an Idempotency-Key.
CREATE TABLE idempotency_keys (
    account         TEXT NOT NULL,
    principal       TEXT NOT NULL,
    key             TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('started', 'completed')),
    lease_until_ms  BIGINT NOT NULL,
    response_status BIGINT,
    response_body   TEXT,
    order_id        TEXT REFERENCES orders (id),
    created_at      TEXT NOT NULL,
    PRIMARY KEY (account, principal, key)
);

CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('reservation.confirm', 'order.placed')),
    order_id        TEXT NOT NULL REFERENCES orders (id),
    payload         TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    delivered_at    TEXT,
    parked_at       TEXT,
    last_error      TEXT,
    created_at      TEXT NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt_ms) WHERE delivered_at IS NULL AND parked_at IS NULL;
