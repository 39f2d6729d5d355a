-- Outbox events are leased: every instance of the service runs a relay,
-- and a relay delivers only the events it claimed. A claim sets
-- lease_owner (the relay's unique id) and lease_until (ms since the Unix
-- epoch); only the owner records the outcome, and a lease that has expired
-- (its relay died or stalled) may be claimed by any relay. Both NULL: not
-- claimed.
ALTER TABLE outbox ADD COLUMN lease_owner TEXT;
ALTER TABLE outbox ADD COLUMN lease_until BIGINT;
