-- Named queries of the retention purge (engine/bounds/retention.py) and of the event buses' published cursors. Same
-- block format as queries.sql. Every purge statement deletes at most $n rows, found through an index in age
-- order (EXPLAIN: an index scan with a LIMIT; tests/integration/test_retention.py checks each plan).

-- retention_lock_shared --
-- A bus publishing a new cursor holds this until its transaction ends: a purge (exclusive) never runs between
-- the bus reading its starting cursor and that cursor becoming visible (advisory lock class 774413).
SELECT pg_advisory_xact_lock_shared(774413);

-- retention_lock --
-- The purge of events holds this (exclusive) while it reads the live cursors and deletes below them.
SELECT pg_advisory_xact_lock(774413);

-- event_cursor_register --
-- Bus $1 starts reading just past every finished event: its cursor row, and that cursor (the last finished
-- event in (txid, position) order, one step back along events_tail; (0, 0) on an empty outbox). Run after
-- retention_lock_shared, in the same transaction.
INSERT INTO event_cursors (id, txid, position)
SELECT $1, coalesce(last.txid, 0), coalesce(last.position, 0)
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT txid::text::bigint AS txid, position FROM events
    WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY events.txid DESC, events.position DESC
    LIMIT 1
) AS last ON true
ON CONFLICT (id) DO UPDATE SET txid = excluded.txid, position = excluded.position, seen_at = now()
RETURNING txid, position;

-- event_cursor_publish --
-- Bus $1 has read every event up to ($2, $3): publish it. was_live is false when the row had gone (purged as
-- stale) or was older than $4 seconds: the purge may have deleted events this bus had not read yet.
WITH prev AS (SELECT seen_at FROM event_cursors WHERE id = $1)
INSERT INTO event_cursors (id, txid, position) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET txid = excluded.txid, position = excluded.position, seen_at = now()
RETURNING coalesce((SELECT seen_at > now() - make_interval(secs => $4) FROM prev), false) AS was_live;

-- event_cursor_remove --
-- Bus $1 stops: it holds no events back any more.
DELETE FROM event_cursors WHERE id = $1;

-- event_cursors_live --
-- The published cursors refreshed within the last $1 seconds, smallest first (operators, tests).
SELECT id, txid, position, started_at, seen_at FROM event_cursors
WHERE seen_at > now() - make_interval(secs => $1)
ORDER BY txid, position;

-- purge_events --
-- Up to $3 events older than $1 seconds that every live bus has read (at or before the smallest cursor
-- refreshed within $2 seconds; none live: any) and that have no webhook delivery left (a pending, waiting,
-- recent or dead delivery keeps its event); how many went. Run after retention_lock, in the same transaction.
WITH bound AS MATERIALIZED (
    SELECT txid::text::xid8 AS txid, position FROM event_cursors
    WHERE seen_at > now() - make_interval(secs => $2)
    ORDER BY txid, position
    LIMIT 1
), doomed AS (
    SELECT e.position FROM events e
    WHERE e.created_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM bound b WHERE (e.txid, e.position) > (b.txid, b.position))
      -- OFFSET 0 keeps this a per-row probe of webhook_deliveries_once (event_id, ...) on the rows the index scan
      -- walks, in age order; as an anti join the planner may hash the whole deliveries table and sort instead
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id OFFSET 0)
    ORDER BY e.created_at
    LIMIT $3
), gone AS (
    DELETE FROM events WHERE position = ANY (ARRAY(SELECT position FROM doomed)) RETURNING 1
)
SELECT count(*) FROM gone;

-- purge_delivered_webhook_deliveries --
-- Up to $2 deliveries delivered more than $1 seconds ago, with their attempts (ON DELETE CASCADE): (deliveries,
-- attempts) deleted. The state is checked again on the row deleted (a concurrent change wins).
WITH doomed AS (
    SELECT id FROM webhook_deliveries
    WHERE state = 'delivered' AND delivered_at < now() - make_interval(secs => $1)
    ORDER BY delivered_at
    LIMIT $2
), attempts AS (
    SELECT count(*) AS n FROM webhook_attempts WHERE delivery_id = ANY (ARRAY(SELECT id FROM doomed))
), gone AS (
    DELETE FROM webhook_deliveries
    WHERE id = ANY (ARRAY(SELECT id FROM doomed))
      AND state = 'delivered' AND delivered_at < now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT n FROM attempts) AS attempts;

-- purge_dead_webhook_deliveries --
-- Up to $2 deliveries dead for more than $1 seconds (not retried since), with their attempts: (deliveries,
-- attempts) deleted. A pending or waiting delivery is never purged.
WITH doomed AS (
    SELECT id FROM webhook_deliveries
    WHERE state = 'dead' AND updated_at < now() - make_interval(secs => $1)
    ORDER BY updated_at
    LIMIT $2
), attempts AS (
    SELECT count(*) AS n FROM webhook_attempts WHERE delivery_id = ANY (ARRAY(SELECT id FROM doomed))
), gone AS (
    DELETE FROM webhook_deliveries
    WHERE id = ANY (ARRAY(SELECT id FROM doomed))
      AND state = 'dead' AND updated_at < now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT n FROM attempts) AS attempts;

-- purge_key_access_audit --
-- Up to $2 key-access audit rows older than $1 seconds; how many went.
WITH doomed AS (
    SELECT id FROM key_access_audit
    WHERE accessed_at < now() - make_interval(secs => $1)
    ORDER BY accessed_at
    LIMIT $2
), gone AS (
    DELETE FROM key_access_audit WHERE id = ANY (ARRAY(SELECT id FROM doomed)) RETURNING 1
)
SELECT count(*) FROM gone;

-- purge_verify_requests --
-- Up to $2 rows of the verify-request log older than $1 seconds (the quota's window: they count no more);
-- rows a quota check is deleting are skipped, never waited for. How many went.
WITH gone AS (
    DELETE FROM owner_verify_requests
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM owner_verify_requests
        WHERE at < now() - make_interval(secs => $1)  -- now(), not clock_timestamp(): a volatile bound is no index bound
        ORDER BY at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING 1
)
SELECT count(*) FROM gone;

-- purge_api_instances --
-- Up to $2 rows of API processes silent for more than $1 seconds (a live process refreshes its row every few
-- seconds; the table holds one row per process, so a sequential scan is the right plan). How many went.
WITH gone AS (
    DELETE FROM api_instances
    WHERE id IN (SELECT id FROM api_instances WHERE seen_at < now() - make_interval(secs => $1) LIMIT $2)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- purge_event_cursors --
-- Up to $2 cursor rows of buses silent for more than $1 seconds (their process was killed). How many went.
WITH gone AS (
    DELETE FROM event_cursors
    WHERE id IN (SELECT id FROM event_cursors WHERE seen_at < now() - make_interval(secs => $1) LIMIT $2)
    RETURNING 1
)
SELECT count(*) FROM gone;
