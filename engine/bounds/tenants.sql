-- Named queries of the per-owner quotas (engine/bounds/quotas.py) and of the API processes' registry that divides the
-- rate limits (engine/api/limits.py). Same block format as queries.sql.

-- lock_owner --
-- Serialize the quota checks of owner $1 until the transaction ends (advisory lock class 774412, keyed by a
-- hash of the owner id: two owners sharing a hash only wait for each other), waiting at most $2 (lock_timeout,
-- local to the transaction: the rest of the transaction keeps that bound too).
SELECT pg_advisory_xact_lock(774412, hashtext($1))
FROM (SELECT set_config('lock_timeout', $2, true)) AS bound;

-- verify_requests_in_window --
-- Owner $1's verify requests of the last $2 seconds.
SELECT count(*) FROM owner_verify_requests
WHERE owner_id = $1 AND at > clock_timestamp() - make_interval(secs => $2);

-- verify_window_frees_in --
-- Seconds until owner $1 may make one more verify request: when its ($3 + 1)-th oldest request of the last
-- $2 seconds leaves the window.
SELECT extract(epoch FROM at + make_interval(secs => $2) - clock_timestamp())::float8
FROM owner_verify_requests
WHERE owner_id = $1 AND at > clock_timestamp() - make_interval(secs => $2)
ORDER BY at
OFFSET $3 LIMIT 1;

-- record_verify_request --
-- One verify request of owner $1, now; also deletes up to 100 rows of any owner older than $2 seconds (rows
-- another transaction is deleting are skipped, never waited for).
WITH stale AS (
    DELETE FROM owner_verify_requests
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM owner_verify_requests
        WHERE at < clock_timestamp() - make_interval(secs => $2)
        LIMIT 100
        FOR UPDATE SKIP LOCKED
    ))
)
INSERT INTO owner_verify_requests (owner_id, at) VALUES ($1, clock_timestamp());

-- api_instance_beat --
-- API process $1 is alive: record it, forget processes silent for 10 x $2 seconds, and count the other
-- processes seen in the last $2 seconds (the answer + 1 is the live count; the upsert is not visible here).
WITH beat AS (
    INSERT INTO api_instances (id) VALUES ($1)
    ON CONFLICT (id) DO UPDATE SET seen_at = now()
), gone AS (
    DELETE FROM api_instances WHERE seen_at < now() - make_interval(secs => $2::float8 * 10) AND id <> $1
)
SELECT count(*) FROM api_instances WHERE id <> $1 AND seen_at > now() - make_interval(secs => $2::float8);

-- api_instance_gone --
-- API process $1 stops: the others stop counting it at their next beat.
DELETE FROM api_instances WHERE id = $1;
