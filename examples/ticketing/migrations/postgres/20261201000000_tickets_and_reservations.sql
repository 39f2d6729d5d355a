-- Ticket products and reservations of every account.
--
-- Timestamps are RFC 3339 UTC text with milliseconds
-- (`2026-12-01T09:30:00.000Z`): fixed width, so text order is time order.
-- Dates are `YYYY-MM-DD`.

CREATE TABLE tickets (
    id          TEXT PRIMARY KEY,                      -- tkt_<uuid v7>
    account     TEXT NOT NULL,
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    price_minor BIGINT  NOT NULL CHECK (price_minor >= 0),
    currency    TEXT NOT NULL CHECK (length(currency) = 3),
    capacity    BIGINT  NOT NULL CHECK (capacity BETWEEN 1 AND 1000000),
    valid_from  TEXT NOT NULL,
    valid_until TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    CHECK (valid_from <= valid_until)
);

CREATE INDEX tickets_by_account ON tickets (account, created_at);

-- A reservation holds `quantity` places of a ticket. Held and confirmed
-- reservations use capacity; a held one stops using it when `expires_at`
-- passes, even before the expiry task marks it `expired`.
CREATE TABLE reservations (
    id              TEXT PRIMARY KEY,                  -- rsv_<uuid v7>
    account         TEXT NOT NULL,
    ticket_id       TEXT NOT NULL REFERENCES tickets (id),
    quantity        BIGINT  NOT NULL CHECK (quantity BETWEEN 1 AND 100),
    status          TEXT NOT NULL
                    CHECK (status IN ('held', 'confirmed', 'released', 'expired')),
    expires_at      TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    -- The caller's Idempotency-Key, unique per account; NULL when none was sent.
    idempotency_key TEXT,
    UNIQUE (account, idempotency_key)
);

-- The capacity check sums the places in use of one ticket.
CREATE INDEX reservations_by_ticket ON reservations (ticket_id, status);
-- The expiry task finds held reservations past their expiry.
CREATE INDEX reservations_held_by_expiry ON reservations (expires_at) WHERE status = 'held';
