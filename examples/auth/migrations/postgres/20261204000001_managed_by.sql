-- Who manages a subject: `file` (the grants file declares it, and is
-- authoritative for it) or `api` (registered or changed through the admin
-- API, or created before grants were data; the grants file takes it over
-- when it names it).
ALTER TABLE users ADD COLUMN managed_by TEXT NOT NULL DEFAULT 'api'
    CHECK (managed_by IN ('file', 'api'));
ALTER TABLE clients ADD COLUMN managed_by TEXT NOT NULL DEFAULT 'api'
    CHECK (managed_by IN ('file', 'api'));
