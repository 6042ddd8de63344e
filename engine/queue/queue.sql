-- Named queries of the job queue (engine/queue.py). Each block: "-- name --", a one-line description, the SQL.
-- Table: queue_jobs (schema.sql, between the queue markers). Every NOTIFY is sent from the statement that made the
-- change, so it fires when that transaction commits (and never when it rolls back).

-- enqueue_job --
-- Insert one job ($1 kind, $2 payload, $3 dedupe key, $4 max attempts, run at coalesce($5, now()) + $6 s, owner $8), NOTIFY $7; no row when deduped.
-- A job of an owner that is due now gets its start tag (schema.sql, queue_jobs): after the owner's last queued
-- one, and never before the smallest queued tag (two index lookups); a scheduled one is claimed by run_at.
WITH tag AS (
    SELECT CASE WHEN $8::text IS NOT NULL AND $5::timestamptz IS NULL AND $6::float8 = 0 THEN greatest(
        (SELECT max(fair_seq) + 1 FROM queue_jobs
         WHERE state = 'queued' AND fair_key = $8::text AND fair_seq IS NOT NULL),
        (SELECT min(fair_seq) FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NOT NULL),
        0) END AS seq
), inserted AS (
    INSERT INTO queue_jobs (kind, payload, dedupe_key, max_attempts, run_at, fair_key, fair_seq)
    SELECT $1, $2, $3, $4, coalesce($5::timestamptz, now()) + make_interval(secs => $6), $8::text, tag.seq
    FROM tag
    ON CONFLICT (dedupe_key) WHERE state = 'queued' DO NOTHING
    RETURNING id
)
SELECT id, pg_notify($7, '') FROM inserted;

-- enqueue_many --
-- Insert one job of kind $1 per element of the JSON array $2 (max attempts $3, owner $5) in one statement, NOTIFY $4; returns the count.
-- With an owner, the jobs take consecutive start tags after the owner's last queued one (see enqueue_job).
WITH base AS (
    SELECT CASE WHEN $5::text IS NOT NULL THEN greatest(
        (SELECT max(fair_seq) + 1 FROM queue_jobs
         WHERE state = 'queued' AND fair_key = $5::text AND fair_seq IS NOT NULL),
        (SELECT min(fair_seq) FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NOT NULL),
        0) END AS seq
), inserted AS (
    INSERT INTO queue_jobs (kind, payload, max_attempts, fair_key, fair_seq)
    SELECT $1, p.value, $3, $5::text, base.seq + p.n - 1
    FROM base, jsonb_array_elements($2::jsonb) WITH ORDINALITY AS p (value, n) ORDER BY p.n
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS n, pg_notify($4, '');

-- ensure_periodic --
-- Queue the first occurrence of periodic job $1 (payload $2, key $3, max attempts $4) unless one is queued or running; NOTIFY $5.
WITH inserted AS (
    INSERT INTO queue_jobs (kind, payload, dedupe_key, max_attempts)
    SELECT $1, $2, $3::text, $4
    WHERE NOT EXISTS (SELECT 1 FROM queue_jobs WHERE dedupe_key = $3::text AND state = 'queued')
      AND NOT EXISTS (SELECT 1 FROM queue_jobs WHERE dedupe_key = $3::text AND state = 'running')
    ON CONFLICT (dedupe_key) WHERE state = 'queued' DO NOTHING
    RETURNING id
)
SELECT id, pg_notify($5, '') FROM inserted;

-- claim_jobs --
-- Mark attempts ($5 ids, each once, $6 attempts) done, then claim up to $1 jobs of kinds $4 for worker $2 with a $3 s lease (caps $7 s): schema.sql, queue_claim.
-- One call, one round trip: the function holds the whole statement (the order of the claims, fairness, expired
-- leases, burying a job whose lease expired on its last try) and its planner setting (enable_sort off, restored
-- when it returns).
SELECT id, kind, payload, state, attempt, tries, max_attempts, dedupe_key, run_at, created_at
FROM queue_claim($1::integer, $2::text, $3::float8, $4::text[], $5::bigint[], $6::integer[], $7::float8[]);

-- finish_jobs --
-- Record many attempts' outcomes (state, retry delay, error, uncounted claims) at once, fenced on id, attempt and running.
UPDATE queue_jobs AS j
SET state            = o.state,
    run_at           = CASE WHEN o.state = 'queued' THEN now() + make_interval(secs => o.delay) ELSE j.run_at END,
    -- back to queued later (a retry): claimed in run_at order then; at once (a hand-back): keeps its start tag
    fair_seq         = CASE WHEN o.state = 'queued' AND o.delay = 0 THEN j.fair_seq END,
    last_error       = coalesce(o.error, j.last_error),
    uncounted        = j.uncounted + o.uncount,
    lease_expires_at = NULL,
    worker_id        = NULL,
    finished_at      = CASE WHEN o.state IN ('done', 'dead') THEN now() END,
    -- back to queued while another queued job holds the dedupe key ($7: known to): both run, this one unkeyed
    dedupe_key       = CASE
        WHEN o.state = 'queued' AND j.dedupe_key IS NOT NULL AND ($7::boolean OR EXISTS (
            SELECT 1 FROM queue_jobs AS t WHERE t.dedupe_key = j.dedupe_key AND t.state = 'queued'))
        THEN NULL
        ELSE j.dedupe_key END
FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::float8[], $5::text[], $6::integer[])
    AS o (id, attempt, state, delay, error, uncount)
WHERE j.id = ANY ($1::bigint[]) AND j.id = o.id AND j.attempt = o.attempt AND j.state = 'running'
RETURNING j.id, j.dedupe_key;

-- complete_jobs --
-- Mark many attempts done at once ($1 ids, each once, $2 attempts), fenced on id, attempt and running: the hot path.
-- The attempt is looked up by position, not joined: the cached generic plan of a join compared every running row
-- with every outcome (as schema.sql's queue_claim does for the outcomes riding on a claim).
UPDATE queue_jobs AS j
SET state = 'done', lease_expires_at = NULL, worker_id = NULL, finished_at = now()
WHERE j.id = ANY ($1::bigint[]) AND j.state = 'running'
  AND j.attempt = ($2::integer[])[array_position($1::bigint[], j.id)];

-- complete_job --
-- Mark attempt $2 of job $1 done inside the caller's transaction; no row means this attempt no longer owns the job.
UPDATE queue_jobs
SET state = 'done', lease_expires_at = NULL, worker_id = NULL, finished_at = now()
WHERE id = $1 AND attempt = $2 AND state = 'running'
RETURNING id;

-- extend_leases --
-- Heartbeat: push the leases of all the given (id, attempt) pairs that are still running to now() + $3 s, never
-- past their lease_cap (a hung attempt's lease runs out there, and another worker takes the job back).
UPDATE queue_jobs AS j
SET lease_expires_at = least(now() + make_interval(secs => $3), j.lease_cap)
FROM unnest($1::bigint[], $2::integer[]) AS h (id, attempt)
WHERE j.id = h.id AND j.attempt = h.attempt AND j.state = 'running';

-- next_due --
-- Seconds until a queued job of kinds $1 comes due or a running one's lease expires (negative: already; NULL: none).
-- A job with a start tag is due (its run_at is in the past): the first one in tag order stands for them all.
SELECT extract(epoch FROM least(
    (SELECT min(run_at) FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NULL AND kind = ANY ($1::text[])),
    (SELECT run_at FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NOT NULL AND kind = ANY ($1::text[])
     ORDER BY fair_seq, id LIMIT 1),
    (SELECT min(lease_expires_at) FROM queue_jobs WHERE state = 'running' AND kind = ANY ($1::text[]))
) - now())::float8;

-- has_ready --
-- Whether a job of kinds $1 could be claimed now (queued and due, or running with an expired lease).
SELECT EXISTS (
    SELECT 1 FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NULL AND run_at <= now() AND kind = ANY ($1::text[])
) OR EXISTS (
    SELECT 1 FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NOT NULL AND kind = ANY ($1::text[])
) OR EXISTS (
    SELECT 1 FROM queue_jobs WHERE state = 'running' AND lease_expires_at < now() AND kind = ANY ($1::text[])
);

-- list_jobs --
-- Jobs for operators, newest first, optionally of state $1 and kind $2; $3 rows from offset $4.
SELECT id, kind, state, payload, attempt, attempt - uncounted AS tries, max_attempts, dedupe_key, run_at,
       created_at, finished_at, lease_expires_at, worker_id, last_error
FROM queue_jobs
WHERE ($1::text IS NULL OR state = $1::text) AND ($2::text IS NULL OR kind = $2::text)
ORDER BY id DESC
LIMIT $3 OFFSET $4;

-- retry_dead --
-- Send dead job $1 back to the queue, run now, tries reset ($2: drop its dedupe key); NOTIFY $3. No row: not dead.
WITH revived AS (
    UPDATE queue_jobs AS j
    SET state       = 'queued',
        run_at      = now(),
        uncounted   = j.attempt,
        finished_at = NULL,
        dedupe_key  = CASE
            WHEN j.dedupe_key IS NOT NULL AND ($2::boolean OR EXISTS (
                SELECT 1 FROM queue_jobs AS t WHERE t.dedupe_key = j.dedupe_key AND t.state = 'queued'))
            THEN NULL
            ELSE j.dedupe_key END
    WHERE j.id = $1 AND j.state = 'dead'
    RETURNING j.id
)
SELECT id, pg_notify($3, '') FROM revived;

-- count_jobs --
-- How many jobs are in each state.
SELECT state, count(*) AS n FROM queue_jobs GROUP BY state;

-- cancel_queued --
-- Cancel queued jobs of kind $1 (NULL: any) whose payload contains $2 (NULL: any); returns how many.
WITH cancelled AS (
    UPDATE queue_jobs
    SET state = 'cancelled', finished_at = now()
    WHERE state = 'queued'
      AND ($1::text IS NULL OR kind = $1::text)
      AND ($2::jsonb IS NULL OR payload @> $2::jsonb)
    RETURNING 1
)
SELECT count(*) FROM cancelled;

-- cancel_queued_keys --
-- Cancel the queued jobs holding any of the dedupe keys $1 (an index lookup each); returns how many.
WITH cancelled AS (
    UPDATE queue_jobs
    SET state = 'cancelled', finished_at = now()
    WHERE state = 'queued' AND dedupe_key = ANY ($1::text[])
    RETURNING 1
)
SELECT count(*) FROM cancelled;

-- purge_finished --
-- Delete done and cancelled jobs that finished more than $1 seconds ago; returns how many went.
WITH purged AS (
    DELETE FROM queue_jobs
    WHERE state IN ('done', 'cancelled') AND finished_at < now() - make_interval(secs => $1)
    RETURNING 1
)
SELECT count(*) FROM purged;
