-- Named queries of the credential store (engine/store.py). Each block: "-- name --", a comment line, the SQL.

-- ping --
-- Cheapest round trip, for readiness checks.
SELECT 1;
