-- Key leases (engine/live): what the lease registry reads.

-- lease_states --
-- Status, secret version, venue account and last event sequence of the leased credentials ($1), in one query
-- (a re-check after the event bus lost its connection; a revoked credential keeps its row).
SELECT id, status, secret_version, venue_account_id, failure_reason, event_seq FROM credentials WHERE id = ANY($1::uuid[]);
