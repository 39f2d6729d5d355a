-- The trace of the request that queued each message: the worker's send
-- continues it, as a child of that request's span (W3C `traceparent` and
-- `tracestate`; NULL for messages queued before this column existed).
ALTER TABLE messages ADD COLUMN traceparent TEXT;
ALTER TABLE messages ADD COLUMN tracestate TEXT;
