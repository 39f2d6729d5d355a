-- Confirmed places, counted on the ticket.
--
-- A confirmed reservation keeps its places for good, so the places in use
-- are `confirmed` plus the holds not yet expired, and the capacity check
-- reads only the ticket's current holds instead of every reservation it
-- ever had. `confirmed` changes only under the ticket's row lock, in the
-- transaction that confirms a hold.

ALTER TABLE tickets ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 0 CHECK (confirmed >= 0);

UPDATE tickets SET confirmed = (
    SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
    WHERE r.ticket_id = tickets.id AND r.status = 'confirmed'
);
