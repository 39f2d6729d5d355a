-- The trace of the request that wrote each outbox event: the relay's
-- delivery continues it, as a child of the transaction that stored the
-- event (W3C `traceparent` and `tracestate`; NULL for events written before
-- this column existed).
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
ALTER TABLE outbox ADD COLUMN tracestate TEXT;
