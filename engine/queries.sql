-- Named queries of the credential store (engine/store.py) and the outbox (engine/events.py).
-- Each block: "-- name --", one comment line saying what it does, the SQL with asyncpg $n placeholders.
-- Every status change is a guarded UPDATE: "status = ANY($allowed) AND secret_version = $fence"; zero rows
-- means the lifecycle (or a newer state) forbids it, and the caller decides what that means (a stale job, a
-- typed error). Every credential write returns the credential's public row as credential_view shows it after
-- the write (the "written" CTE joined to the staged secret), so nothing is read again to report it.

-- ping --
-- Cheapest round trip, for readiness checks.
SELECT 1;

-- schema_table_exists --
-- Whether this database has been given the engine's schema at all.
SELECT to_regclass('engine_schema') IS NOT NULL;

-- schema_digest --
-- The SHA-256 of the schema.sql last applied here.
SELECT digest FROM engine_schema WHERE id;

-- set_schema_digest --
-- Record the SHA-256 of the schema.sql just applied.
INSERT INTO engine_schema (id, digest) VALUES (true, $1)
ON CONFLICT (id) DO UPDATE SET digest = EXCLUDED.digest, applied_at = now();

-- insert_credential --
-- A new credential, PENDING, with its secret version 1 (CURRENT; $7-$11 sealed material, fingerprint) and event
-- sequence 1 (its credential.created); no row when owner $2 holds $12 credentials that are not REVOKED (its
-- quota; NULL: none). Run after the owner's quota lock: this statement's snapshot, taken after the lock, sees
-- every committed credential of the owner. Returns the public row.
WITH room AS (
    SELECT $12::integer IS NULL
           OR ce_credentials_held($2) < $12 AS ok
), written AS (
    INSERT INTO credentials (id, owner_id, venue, credential_type, nickname, masked_api_key, status,
                             secret_version, event_seq)
    SELECT $1, $2, $3, $4, $5, $6, 'PENDING', 1, 1 FROM room WHERE room.ok
    RETURNING *
), secret AS (
    INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce,
                                    ciphertext, key_fingerprint, masked_api_key)
    SELECT written.id, 1, 'CURRENT', $2, $3, $7, $8, $9, $10, $11, $6 FROM written
)
SELECT written.*, NULL::integer AS pending_version, NULL::text AS pending_masked_api_key,
       NULL::timestamptz AS pending_started_at
FROM written;

-- created_and_enqueued --
-- The creation's hot path in one statement, its own transaction (engine/hotpath.py): insert_credential ($1-$11,
-- quota $12 under the owner's quota lock waited for at most $13: ce_credential_room, schema.sql), its
-- credential.created ($14 id, $15 data, whose credential's createdAt and updatedAt are set here to the row's)
-- with NOTIFY $16, and its verification job as queue.sql's enqueue_job queues a job of owner $2 due now ($17
-- kind, $18 payload, $19 dedupe key, $20 max attempts; start tag after the owner's last queued one and never
-- before the smallest) with NOTIFY $21. One row: room (false: the quota is reached), wanted (a webhook endpoint
-- of the owner wants credential.created: nothing was written, its deliveries need the transaction path), and
-- the public row when written.
WITH room AS (
    SELECT ce_credential_room($2, $12, $13) AS ok,
           EXISTS (
               SELECT 1 FROM webhook_endpoints e
               WHERE e.owner_id = $2 AND e.enabled
                 AND (e.event_types IS NULL OR 'credential.created' = ANY (e.event_types))) AS wanted
), written AS (
    INSERT INTO credentials (id, owner_id, venue, credential_type, nickname, masked_api_key, status,
                             secret_version, event_seq)
    SELECT $1, $2, $3, $4, $5, $6, 'PENDING', 1, 1 FROM room WHERE room.ok AND NOT room.wanted
    RETURNING *, floor(extract(epoch FROM created_at) * 1000)::bigint AS at_ms
), secret AS (
    INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce,
                                    ciphertext, key_fingerprint, masked_api_key)
    SELECT written.id, 1, 'CURRENT', $2, $3, $7, $8, $9, $10, $11, $6 FROM written
), event AS (
    INSERT INTO events (id, type, owner_id, credential_id, sequence, data)
    SELECT $14, 'credential.created', w.owner_id, w.id, 1,
           jsonb_set(jsonb_set($15::jsonb, '{credential,createdAt}', to_jsonb(w.at_ms)),
                     '{credential,updatedAt}', to_jsonb(w.at_ms))
    FROM written w
), tag AS (
    SELECT greatest(
        (SELECT max(fair_seq) + 1 FROM queue_jobs
         WHERE state = 'queued' AND fair_key = $2::text AND fair_seq IS NOT NULL),
        (SELECT min(fair_seq) FROM queue_jobs WHERE state = 'queued' AND fair_seq IS NOT NULL),
        0) AS seq
), job AS (
    INSERT INTO queue_jobs (kind, payload, dedupe_key, max_attempts, run_at, fair_key, fair_seq)
    SELECT $17, $18, $19, $20, now(), $2::text, tag.seq
    FROM written, tag
    ON CONFLICT (dedupe_key) WHERE state = 'queued' DO NOTHING
)
SELECT room.ok AS room, room.wanted, w.*, NULL::integer AS pending_version,
       NULL::text AS pending_masked_api_key, NULL::timestamptz AS pending_started_at,
       CASE WHEN w.id IS NOT NULL THEN pg_notify($16, '') IS NOT NULL AND pg_notify($21, '') IS NOT NULL END
           AS notified
FROM room LEFT JOIN written w ON true;

-- created_in_batch --
-- Many creations in one statement, its own transaction (engine/creates.py): for item n (arrays $1-$11 as
-- insert_credential's $1-$11, $14 event ids, $15 event data, $18 job payloads, $19 dedupe keys) exactly what
-- created_and_enqueued would answer had the items run one after another in order n, or busy: the owner's quota
-- lock is held elsewhere (ce_credential_rooms, schema.sql, tries the locks, lock_timeout $13 for other waits),
-- nothing written for it (its caller sends it alone). Quota $12 under every other owner's lock: an item has room while
-- its owner's held count plus the items of that owner before it that are not refused otherwise (wanted,
-- duplicate) stays under the quota. wanted: a webhook endpoint of the owner wants credential.created (nothing
-- written). duplicate: the owner holds the key ($11 on the venue) already, or an item before it of the same
-- owner carries it. The rest are created with their event and job ($17 kind, $20 max attempts); the jobs of an
-- owner take consecutive start tags from where enqueue_job would start the first (the rule of queue.sql's
-- enqueue_job applied once per job in order n). One NOTIFY $16 and one NOTIFY $21 when anything was written.
-- One row per item in order n: outcome (created, quota, wanted, duplicate, busy) and the public row when created. A
-- key that another transaction stores meanwhile makes the statement fail (unique violation): nothing written.
WITH item AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::integer[],
                $8::bytea[], $9::bytea[], $10::bytea[], $11::bytea[], $14::uuid[], $15::jsonb[], $18::jsonb[],
                $19::text[])
        WITH ORDINALITY AS i (id, owner_id, venue, credential_type, nickname, masked, kek_version, wrapped_dek,
                              nonce, ciphertext, fingerprint, event_id, data, payload, dedupe_key, n)
), room AS MATERIALIZED (
    SELECT * FROM ce_credential_rooms($2::text[], $12, $13)
), wanted AS (
    SELECT DISTINCT e.owner_id FROM webhook_endpoints e
    WHERE e.owner_id = ANY ($2::text[]) AND e.enabled
      AND (e.event_types IS NULL OR 'credential.created' = ANY (e.event_types))
), judged AS MATERIALIZED (
    -- duplicate: a stored secret, or an earlier item, of the same owner, venue and key. Earlier items: numbered
    -- within their group (one sort, where a lookup of the earlier items per item cost PostgreSQL most of the
    -- statement's time at 50 items); stored ones looked up per item by the fingerprint index (a lateral lookup:
    -- as an EXISTS the planner may hash the whole table instead, which grows with it)
    SELECT i.*, w.owner_id IS NOT NULL AS wanted,
           stored.found IS NOT NULL
           OR row_number() OVER (PARTITION BY i.owner_id, i.venue, i.fingerprint ORDER BY i.n) > 1 AS duplicate
    FROM item i
    LEFT JOIN wanted w ON w.owner_id = i.owner_id
    LEFT JOIN LATERAL (
        SELECT true AS found FROM credential_secrets s
        WHERE s.owner_id = i.owner_id AND s.venue = i.venue AND s.key_fingerprint = i.fingerprint
        LIMIT 1
    ) stored ON true
), decided AS MATERIALIZED (
    SELECT j.*,
           CASE WHEN r.busy THEN 'busy'
                WHEN $12::integer IS NOT NULL
                     AND coalesce(r.held, 0) + coalesce(count(*) FILTER (WHERE NOT j.wanted AND NOT j.duplicate)
                         OVER (PARTITION BY j.owner_id ORDER BY j.n
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) >= $12 THEN 'quota'
                WHEN j.wanted THEN 'wanted'
                WHEN j.duplicate THEN 'duplicate'
                ELSE 'created' END AS outcome
    FROM judged j LEFT JOIN room r ON r.room_owner = j.owner_id
), written AS (
    INSERT INTO credentials (id, owner_id, venue, credential_type, nickname, masked_api_key, status,
                             secret_version, event_seq)
    SELECT d.id, d.owner_id, d.venue, d.credential_type, d.nickname, d.masked, 'PENDING', 1, 1
    FROM decided d WHERE d.outcome = 'created' ORDER BY d.n
    RETURNING *, floor(extract(epoch FROM created_at) * 1000)::bigint AS at_ms
), secret AS (
    INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce,
                                    ciphertext, key_fingerprint, masked_api_key)
    SELECT w.id, 1, 'CURRENT', d.owner_id, d.venue, d.kek_version, d.wrapped_dek, d.nonce, d.ciphertext,
           d.fingerprint, d.masked
    FROM written w JOIN decided d ON d.id = w.id ORDER BY d.n
), event AS (
    INSERT INTO events (id, type, owner_id, credential_id, sequence, data)
    SELECT d.event_id, 'credential.created', w.owner_id, w.id, 1,
           jsonb_set(jsonb_set(d.data, '{credential,createdAt}', to_jsonb(w.at_ms)),
                     '{credential,updatedAt}', to_jsonb(w.at_ms))
    FROM written w JOIN decided d ON d.id = w.id ORDER BY d.n
), tag AS (
    SELECT o.owner_id, greatest(
        (SELECT max(q.fair_seq) + 1 FROM queue_jobs q
         WHERE q.state = 'queued' AND q.fair_key = o.owner_id AND q.fair_seq IS NOT NULL),
        (SELECT min(q.fair_seq) FROM queue_jobs q WHERE q.state = 'queued' AND q.fair_seq IS NOT NULL),
        0) AS seq
    FROM (SELECT DISTINCT owner_id FROM written) o
), job AS (
    INSERT INTO queue_jobs (kind, payload, dedupe_key, max_attempts, run_at, fair_key, fair_seq)
    SELECT $17, d.payload, d.dedupe_key, $20, now(), d.owner_id,
           t.seq + row_number() OVER (PARTITION BY d.owner_id ORDER BY d.n) - 1
    FROM written w JOIN decided d ON d.id = w.id JOIN tag t ON t.owner_id = d.owner_id
    ORDER BY d.n
    ON CONFLICT (dedupe_key) WHERE state = 'queued' DO NOTHING
), notified AS MATERIALIZED (
    SELECT pg_notify($16, '') IS NOT NULL AND pg_notify($21, '') IS NOT NULL AS sent
    WHERE EXISTS (SELECT 1 FROM written)
)
SELECT d.n, d.outcome, w.*, NULL::integer AS pending_version, NULL::text AS pending_masked_api_key,
       NULL::timestamptz AS pending_started_at, (SELECT sent FROM notified) AS notified
FROM decided d LEFT JOIN written w ON w.id = d.id
ORDER BY d.n;

-- get_credential --
-- One credential of one owner (other owners' ids find nothing).
SELECT * FROM credential_view WHERE id = $1 AND owner_id = $2;

-- get_credential_by_id --
-- One credential whoever owns it (workers).
SELECT * FROM credential_view WHERE id = $1;

-- lock_credential --
-- Lock one credential row of one owner for the rest of the transaction, and read it whole (as the view does).
SELECT c.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM credentials c
LEFT JOIN credential_secrets p ON p.credential_id = c.id AND p.state = 'PENDING'
WHERE c.id = $1 AND c.owner_id = $2
FOR UPDATE OF c;

-- list_credentials --
-- One page of an owner's credentials, oldest first, with optional filters.
SELECT * FROM credential_view
WHERE owner_id = $1
  AND ($2::text IS NULL OR status = $2)
  AND ($3::text IS NULL OR credential_type = $3)
  AND ($4::text IS NULL OR venue = $4)
ORDER BY created_at, id
OFFSET $5 LIMIT $6;

-- count_credentials --
-- How many credentials the same filters match (pagination total).
SELECT count(*) FROM credentials
WHERE owner_id = $1
  AND ($2::text IS NULL OR status = $2)
  AND ($3::text IS NULL OR credential_type = $3)
  AND ($4::text IS NULL OR venue = $4);

-- find_by_fingerprint --
-- The live credential of an owner holding this API key (as current or staged version), if any.
SELECT s.credential_id, s.state FROM credential_secrets s
WHERE s.owner_id = $1 AND s.venue = $2 AND s.key_fingerprint = $3;

-- get_credentials_with_secrets --
-- Credentials whoever owns them, each with the stored material of one secret version (null columns if gone), for
-- many pairs at once (engine/readbatch.py): $1 a JSON array of [credential id, secret version]; one row per pair
-- whose credential exists, "wanted" its position (from 1). The pairs come as JSON, not arrays, and each is looked
-- up in a LATERAL subquery kept apart (OFFSET 0): the plan's estimates do not depend on how many pairs come, so
-- the server can keep one generic plan that reads each pair by index (with array parameters the estimates follow
-- the batch's length, which invites a custom plan per batch; that version cost more PostgreSQL CPU in the bench).
SELECT w.i AS wanted, r.*
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS w(pair, i)
CROSS JOIN LATERAL (
    SELECT v.*,
           s.version        AS secret_row_version,
           s.state          AS secret_state,
           s.kek_version    AS secret_kek_version,
           s.wrapped_dek    AS secret_wrapped_dek,
           s.nonce          AS secret_nonce,
           s.ciphertext     AS secret_ciphertext,
           s.masked_api_key AS secret_masked_api_key
    FROM credential_view v
    LEFT JOIN credential_secrets s ON s.credential_id = v.id AND s.version = (w.pair ->> 1)::integer
    WHERE v.id = (w.pair ->> 0)::uuid
    OFFSET 0
) r;

-- claim_jobs_reading_credentials --
-- queue.sql's claim_jobs (same parameters and columns) that also reads each claimed verify or rotation_verify job's credential (cred_*) and the secret version it probes (secret_*, null if gone).
-- The verification jobs' reads (engine/payloads.py: VERIFY, ROTATION_VERIFY) ride on their claim (JobQueue.claim_with,
-- engine/jobs.py): no statement of their own. Columns named one by one and prefixed (the job's own include id and
-- created_at); store.py reads them with credential_from_row, so a column it needs is added here too (a test
-- compares with get_credentials_with_secrets). A payload that names no credential id and version reads nothing
-- and never fails the claim (no cast of a bad value: CASE, not AND, whose order of evaluation is the planner's);
-- its handler then reads as usual. Read in this statement's snapshot, which may predate the job: queue_claim()
-- (VOLATILE) finds jobs committed after it, so a row that would drop the job as stale is read again by the handler
-- (engine/jobs.py); anything else it decides on this row is fenced when written (engine/hotpath.py) or decided
-- again under the row lock.
SELECT c.id, c.kind, c.payload, c.state, c.attempt, c.tries, c.max_attempts, c.dedupe_key, c.run_at, c.created_at,
       r.*
FROM queue_claim($1::integer, $2::text, $3::float8, $4::text[], $5::bigint[], $6::integer[], $7::float8[]) AS c
LEFT JOIN LATERAL (
    SELECT v.id AS cred_id, v.owner_id AS cred_owner_id, v.venue AS cred_venue,
           v.credential_type AS cred_credential_type, v.nickname AS cred_nickname,
           v.masked_api_key AS cred_masked_api_key, v.status AS cred_status, v.identities AS cred_identities,
           v.permissions AS cred_permissions, v.venue_account_id AS cred_venue_account_id,
           v.pinned_venue_account_id AS cred_pinned_venue_account_id, v.failure_reason AS cred_failure_reason,
           v.rotation_failure_reason AS cred_rotation_failure_reason, v.secret_version AS cred_secret_version,
           v.event_seq AS cred_event_seq, v.created_at AS cred_created_at, v.updated_at AS cred_updated_at,
           v.verified_at AS cred_verified_at, v.revoked_at AS cred_revoked_at, v.warnings AS cred_warnings,
           v.minted_from_id AS cred_minted_from_id, v.minted_sub_account AS cred_minted_sub_account,
           v.pending_version AS cred_pending_version, v.pending_masked_api_key AS cred_pending_masked_api_key,
           v.pending_started_at AS cred_pending_started_at,
           s.version        AS secret_row_version,
           s.state          AS secret_state,
           s.kek_version    AS secret_kek_version,
           s.wrapped_dek    AS secret_wrapped_dek,
           s.nonce          AS secret_nonce,
           s.ciphertext     AS secret_ciphertext,
           s.masked_api_key AS secret_masked_api_key
    FROM credential_view v
    LEFT JOIN credential_secrets s ON s.credential_id = v.id AND s.version = CASE
        WHEN c.payload ->> 'version' ~ '^[0-9]{1,9}$' THEN (c.payload ->> 'version')::integer END
    WHERE c.kind IN ('verify', 'rotation_verify') AND c.state = 'running' AND v.id = CASE
        WHEN c.payload ->> 'credentialId' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        THEN (c.payload ->> 'credentialId')::uuid END
    OFFSET 0
) r ON true;

-- get_secret --
-- One secret version of a credential.
SELECT credential_id, version, state, kek_version, wrapped_dek, nonce, ciphertext, masked_api_key
FROM credential_secrets WHERE credential_id = $1 AND version = $2;

-- mark_verified --
-- verify_succeeded, fenced on the probed secret version and on the pinned venue account (the first verification
-- pins it; another account changes nothing); the public row, the previous status and permissions.
WITH old AS (
    SELECT id, status AS previous_status, permissions AS previous_permissions
    FROM credentials WHERE id = $1 FOR UPDATE
), written AS (
    UPDATE credentials c
    SET status = 'VERIFIED', identities = $4, permissions = $5, venue_account_id = $6,
        pinned_venue_account_id = coalesce(c.pinned_venue_account_id, $6), environment = $7,
        warnings = $8, failure_reason = NULL, failure_message = NULL, verified_at = now(), updated_at = now(),
        event_seq = event_seq + 1
    FROM old
    WHERE c.id = old.id AND c.status = ANY($2::text[]) AND c.secret_version = $3
      AND (c.pinned_venue_account_id IS NULL OR c.pinned_venue_account_id = $6)
    RETURNING c.*, old.previous_status, old.previous_permissions
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- verified_and_done --
-- The verification's hot path in one statement, its own transaction (engine/hotpath.py): verify_succeeded of
-- secret version $3 of credential $1 as the job read it before probing, fenced on the event sequence it read
-- ($9: nothing reported since, so the row is as read) as well as on status and version like mark_verified; its
-- event ($11 id, $12 type, $13 data, whose credential's updatedAt and verifiedAt are set here to the row's) with
-- NOTIFY $14; attempt $16 of job $15 done (queue.sql's complete_job: fenced on id, attempt and running). The
-- credential's UPDATE is the transaction's first write (the events' order, engine/events.py), and the job's
-- waits for it. No row, nothing written: the row changed, another venue account is pinned, or a webhook
-- endpoint of owner $10 wants the type (its deliveries need the transaction path). SQLSTATE CE409 when the
-- attempt no longer owns the job: the error undoes the whole statement.
WITH written AS (
    UPDATE credentials c
    SET status = 'VERIFIED', identities = $4, permissions = $5, venue_account_id = $6,
        pinned_venue_account_id = coalesce(c.pinned_venue_account_id, $6), environment = $7,
        warnings = $8, failure_reason = NULL, failure_message = NULL, verified_at = now(), updated_at = now(),
        event_seq = c.event_seq + 1
    WHERE c.id = $1 AND c.status = ANY ($2::text[]) AND c.secret_version = $3 AND c.event_seq = $9
      AND c.rotation_failure_reason IS NULL
      AND (c.pinned_venue_account_id IS NULL OR c.pinned_venue_account_id = $6)
      AND NOT EXISTS (
          SELECT 1 FROM webhook_endpoints e
          WHERE e.owner_id = $10 AND e.enabled AND (e.event_types IS NULL OR $12 = ANY (e.event_types)))
    RETURNING c.id, c.owner_id, c.event_seq, floor(extract(epoch FROM c.updated_at) * 1000)::bigint AS at_ms
), event AS (
    INSERT INTO events (id, type, owner_id, credential_id, sequence, data)
    SELECT $11, $12, w.owner_id, w.id, w.event_seq,
           jsonb_set(jsonb_set($13::jsonb, '{credential,updatedAt}', to_jsonb(w.at_ms)),
                     '{credential,verifiedAt}', to_jsonb(w.at_ms))
    FROM written w
    RETURNING position
), done AS (
    UPDATE queue_jobs
    SET state = 'done', lease_expires_at = NULL, worker_id = NULL, finished_at = now()
    WHERE id = $15 AND attempt = $16 AND state = 'running' AND EXISTS (SELECT 1 FROM written)
    RETURNING id
)
SELECT w.event_seq,
       pg_notify($14, '') IS NOT NULL AS notified,
       CASE WHEN EXISTS (SELECT 1 FROM done) THEN true ELSE ce_attempt_lost() END AS completed
FROM written w, event e;

-- verified_and_done_batch --
-- verified_and_done for many successful verifications in one statement, its own transaction (engine/donebatch.py):
-- $1 a JSON array of items in ascending credential id order, each credential once, each an object of id, version,
-- identities, permissions, account, environment, warnings, seq (the event sequence read), owner, event (the
-- event's id), type, data, job, attempt; $2 the statuses verify_succeeded fires from; NOTIFY $3 once. Each item is
-- looked up by index in a LATERAL subquery (a plan that does not depend on the batch's size). First the
-- credentials passing every fence of verified_and_done are locked, one after another in id order, skipping a row
-- another transaction holds (a revoke, a rotation, an operator's session: never waited for, so one held row
-- cannot hold up the other owners' verifications of the batch; it reads 'refused' and its caller takes the
-- transaction path, which waits for that row alone), the first lock being the transaction's
-- first write (engine/events.py; the event sequence fence refuses a row another transaction reported on after the
-- job read it, so the later-locked rows keep the events' order too); then, once every credential is locked (the
-- gate: a one-time filter that counts them), each one's job row if attempt $attempt still runs it, skipping a
-- row another transaction holds (a heartbeat: the batch never waits once it holds a job row, so it can never be
-- in a cycle through the jobs). Only a credential whose job row is held is written, with its event, and its job
-- done. One row per item, "i" its position (from 1): outcome 'written' (with the new event sequence), 'refused'
-- (a fence or an endpoint that wants the event: nothing written), 'lost' (the attempt no longer owns its job:
-- nothing written for it) or 'busy' (another transaction held the job row: nothing written, the transaction path
-- decides). SQLSTATE CE409 undoes the whole batch if a written credential's job was not marked done (never
-- expected: the row is held).
WITH item AS MATERIALIZED (
    SELECT t.i, (t.x ->> 'id')::uuid AS id, (t.x ->> 'job')::bigint AS job, (t.x ->> 'attempt')::integer AS attempt,
           t.x
    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t (x, i)
), locked AS MATERIALIZED (
    SELECT it.i
    FROM item it
    CROSS JOIN LATERAL (
        SELECT c.id FROM credentials c
        WHERE c.id = it.id AND c.status = ANY ($2::text[]) AND c.secret_version = (it.x ->> 'version')::integer
          AND c.event_seq = (it.x ->> 'seq')::bigint AND c.rotation_failure_reason IS NULL
          AND (c.pinned_venue_account_id IS NULL OR c.pinned_venue_account_id = it.x ->> 'account')
          AND NOT EXISTS (
              SELECT 1 FROM webhook_endpoints e
              WHERE e.owner_id = it.x ->> 'owner' AND e.enabled
                AND (e.event_types IS NULL OR it.x ->> 'type' = ANY (e.event_types)))
        FOR UPDATE OF c SKIP LOCKED
    ) c
), held AS MATERIALIZED (
    SELECT it.i, it.id
    FROM locked l
    JOIN item it ON it.i = l.i
    CROSS JOIN LATERAL (
        SELECT j.id FROM queue_jobs j
        WHERE j.id = it.job AND j.attempt = it.attempt AND j.state = 'running'
        FOR UPDATE OF j SKIP LOCKED
    ) j
    WHERE (SELECT count(*) FROM locked) >= 0  -- the gate: every credential is locked before the first job row
), written AS (
    UPDATE credentials c
    SET status = 'VERIFIED', identities = ARRAY(SELECT jsonb_array_elements_text(it.x -> 'identities')),
        permissions = it.x -> 'permissions', venue_account_id = it.x ->> 'account',
        pinned_venue_account_id = coalesce(c.pinned_venue_account_id, it.x ->> 'account'),
        environment = it.x ->> 'environment', warnings = ARRAY(SELECT jsonb_array_elements_text(it.x -> 'warnings')),
        failure_reason = NULL, failure_message = NULL, verified_at = now(), updated_at = now(),
        event_seq = c.event_seq + 1
    FROM held h
    JOIN item it ON it.i = h.i
    WHERE c.id = it.id AND c.event_seq = (it.x ->> 'seq')::bigint
      AND c.id = ANY (ARRAY(SELECT id FROM held))  -- an index scan of the held ids, whatever the table's size
    RETURNING it.i, c.id, c.owner_id, c.event_seq, floor(extract(epoch FROM c.updated_at) * 1000)::bigint AS at_ms
), event AS (
    INSERT INTO events (id, type, owner_id, credential_id, sequence, data)
    SELECT (it.x ->> 'event')::uuid, it.x ->> 'type', w.owner_id, w.id, w.event_seq,
           jsonb_set(jsonb_set(it.x -> 'data', '{credential,updatedAt}', to_jsonb(w.at_ms)),
                     '{credential,verifiedAt}', to_jsonb(w.at_ms))
    FROM written w
    JOIN item it ON it.i = w.i
    RETURNING position
), done AS (
    UPDATE queue_jobs j
    SET state = 'done', lease_expires_at = NULL, worker_id = NULL, finished_at = now()
    FROM written w
    JOIN item it ON it.i = w.i
    WHERE j.id = it.job AND j.attempt = it.attempt AND j.state = 'running'
    RETURNING j.id
), summary AS (
    SELECT CASE WHEN (SELECT count(*) FROM done) = n AND (SELECT count(*) FROM event) = n THEN true
                ELSE ce_attempt_lost() END AS complete,
           CASE WHEN n > 0 THEN pg_notify($3, '') IS NOT NULL END AS notified
    FROM (SELECT count(*) AS n FROM written) w
)
SELECT it.i,
       CASE WHEN w.i IS NOT NULL THEN 'written'
            WHEN l.i IS NULL THEN 'refused'
            WHEN EXISTS (SELECT 1 FROM queue_jobs j WHERE j.id = it.job AND j.attempt = it.attempt
                                                        AND j.state = 'running') THEN 'busy'
            ELSE 'lost' END AS outcome,
       w.event_seq,
       s.complete
FROM item it
CROSS JOIN summary s
LEFT JOIN locked l ON l.i = it.i
LEFT JOIN written w ON w.i = it.i
ORDER BY it.i;

-- mark_failed --
-- verify_rejected (a permanent cause), fenced on the probed secret version; the public row and previous status.
WITH old AS (SELECT id, status AS previous_status FROM credentials WHERE id = $1 FOR UPDATE),
written AS (
    UPDATE credentials c
    SET status = 'FAILED', failure_reason = $4, failure_message = $5, updated_at = now(), event_seq = event_seq + 1
    FROM old
    WHERE c.id = old.id AND c.status = ANY($2::text[]) AND c.secret_version = $3
    RETURNING c.*, old.previous_status
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- touch_verified --
-- A re-verification found nothing new: record when, without an event.
UPDATE credentials SET verified_at = now() WHERE id = $1 AND status = 'VERIFIED' AND secret_version = $2;

-- stage_rotation --
-- rotate: take secret version $4 (last_secret_version + 1, read under the row lock) and store its sealed
-- material ($5 owner, $6 venue, $7-$10 sealed, $11 fingerprint, $12 masked key) as PENDING; the status is
-- unchanged, the event sequence moves. The public row, with the staged version as its pending rotation.
WITH written AS (
    UPDATE credentials
    SET last_secret_version = $4, rotation_failure_reason = NULL, updated_at = now(), event_seq = event_seq + 1
    WHERE id = $1 AND status = ANY($2::text[]) AND secret_version = $3 AND last_secret_version = $4 - 1
    RETURNING *
), staged AS (
    INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce,
                                    ciphertext, key_fingerprint, masked_api_key)
    SELECT written.id, $4, 'PENDING', $5, $6, $7, $8, $9, $10, $11, $12 FROM written
    RETURNING version, masked_api_key, created_at
)
SELECT written.*, staged.version AS pending_version, staged.masked_api_key AS pending_masked_api_key,
       staged.created_at AS pending_started_at
FROM written, staged;

-- rotate_immediately --
-- rotate_immediately: version $4 (last_secret_version + 1, read under the row lock) becomes current at once with
-- its sealed material ($6 owner, $7 venue, $8-$11 sealed, $12 fingerprint; $5 masked key) and the credential
-- goes back to PENDING. Run after the old material was destroyed. The public row.
WITH written AS (
    UPDATE credentials
    SET status = 'PENDING', secret_version = $4, last_secret_version = $4,
        masked_api_key = $5, permissions = NULL, identities = '{}', warnings = '{}', failure_reason = NULL,
        failure_message = NULL, rotation_failure_reason = NULL, verified_at = NULL, updated_at = now(),
        event_seq = event_seq + 1
    WHERE id = $1 AND status = ANY($2::text[]) AND secret_version = $3 AND last_secret_version = $4 - 1
    RETURNING *
), current_secret AS (
    INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce,
                                    ciphertext, key_fingerprint, masked_api_key)
    SELECT written.id, $4, 'CURRENT', $6, $7, $8, $9, $10, $11, $12, $5 FROM written
)
SELECT written.*, NULL::integer AS pending_version, NULL::text AS pending_masked_api_key,
       NULL::timestamptz AS pending_started_at
FROM written;

-- delete_secret --
-- Destroy one secret version's material.
DELETE FROM credential_secrets WHERE credential_id = $1 AND version = $2;

-- delete_secrets_for_immediate_rotation --
-- rotate_immediately: destroy the current version $2 and any staged one of a credential.
DELETE FROM credential_secrets WHERE credential_id = $1 AND (version = $2 OR state = 'PENDING');

-- delete_all_secrets --
-- Destroy every secret version of a credential (revoke).
DELETE FROM credential_secrets WHERE credential_id = $1;

-- promote_secret --
-- Make a staged version the current one (after the old current row was deleted).
UPDATE credential_secrets SET state = 'CURRENT' WHERE credential_id = $1 AND version = $2 AND state = 'PENDING';

-- mark_rotated --
-- rotation_succeeded: the staged version is current and verified; fenced on the old version, a live status and
-- the pinned venue account (pinned here when the credential never verified before). Run after the old material
-- was destroyed and the staged row promoted. The public row, the previous status and permissions.
WITH old AS (
    SELECT id, status AS previous_status, permissions AS previous_permissions
    FROM credentials WHERE id = $1 FOR UPDATE
), written AS (
    UPDATE credentials c
    SET status = 'VERIFIED', secret_version = $4, masked_api_key = $5, identities = $6, permissions = $7,
        venue_account_id = $8, pinned_venue_account_id = coalesce(c.pinned_venue_account_id, $8), environment = $9,
        warnings = $10, failure_reason = NULL, failure_message = NULL,
        rotation_failure_reason = NULL, verified_at = now(), updated_at = now(), event_seq = event_seq + 1
    FROM old
    WHERE c.id = old.id AND c.status = ANY($2::text[]) AND c.secret_version = $3
      AND (c.pinned_venue_account_id IS NULL OR c.pinned_venue_account_id = $8)
    RETURNING c.*, old.previous_status, old.previous_permissions
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- mark_rotation_rejected --
-- rotation_rejected: record why; status and current keys unchanged. Run after the staged material was
-- destroyed. The public row.
WITH written AS (
    UPDATE credentials
    SET rotation_failure_reason = $3, updated_at = now(), event_seq = event_seq + 1
    WHERE id = $1 AND status = ANY($2::text[])
    RETURNING *
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- mark_revoked --
-- revoke: terminal; the secret version becomes 0 (no material left). The public row and previous status.
WITH old AS (SELECT id, status AS previous_status FROM credentials WHERE id = $1 FOR UPDATE),
written AS (
    UPDATE credentials c
    SET status = 'REVOKED', secret_version = 0, revoked_at = now(), updated_at = now(), event_seq = event_seq + 1,
        identities = '{}'
    FROM old
    WHERE c.id = old.id AND c.owner_id = $2 AND c.status = ANY($3::text[])
    RETURNING c.*, old.previous_status
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- bump_event_seq --
-- Hand out the next event sequence number of a credential (events that change no status). The public row.
WITH written AS (
    UPDATE credentials SET event_seq = event_seq + 1, updated_at = now() WHERE id = $1 RETURNING *
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- mark_expiry_warned --
-- Remember that the expiry at $2 is being announced (so it is announced once) and hand out the announcement's
-- event sequence number; no row when it was announced already or the credential is no longer VERIFIED.
WITH written AS (
    UPDATE credentials SET expiry_warned_at_ms = $2, event_seq = event_seq + 1, updated_at = now()
    WHERE id = $1 AND expiry_warned_at_ms IS DISTINCT FROM $2 AND status = 'VERIFIED'
    RETURNING *
)
SELECT w.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM written w
LEFT JOIN credential_secrets p ON p.credential_id = w.id AND p.state = 'PENDING';

-- due_for_reverify --
-- VERIFIED credentials not verified for $1 seconds, oldest first, with their owner and current secret version.
SELECT id, owner_id, secret_version FROM credentials
WHERE status = 'VERIFIED' AND verified_at < now() - make_interval(secs => $1)
ORDER BY verified_at
LIMIT $2;

-- insert_trading_account --
-- docs/api-dialect.md §8's trading account, ACTIVE.
INSERT INTO trading_accounts (id, owner_id, credential_id, venue, name, account_type, status)
VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE')
RETURNING *;

-- get_trading_account --
-- One trading account of one owner.
SELECT * FROM trading_accounts WHERE id = $1 AND owner_id = $2;

-- disable_trading_account --
-- Disconnect one ACTIVE account.
UPDATE trading_accounts SET status = 'DISABLED', updated_at = now()
WHERE id = $1 AND owner_id = $2 AND status = 'ACTIVE'
RETURNING *;

-- disable_credential_accounts --
-- Disconnect every ACTIVE account of a credential (revoke cascade).
UPDATE trading_accounts SET status = 'DISABLED', updated_at = now()
WHERE credential_id = $1 AND status = 'ACTIVE'
RETURNING *;

-- count_active_accounts --
-- How many ACTIVE accounts use a credential.
SELECT count(*) FROM trading_accounts WHERE credential_id = $1 AND status = 'ACTIVE';

-- list_trading_accounts --
-- One page of an owner's trading accounts, with optional filters.
SELECT * FROM trading_accounts
WHERE owner_id = $1
  AND ($2::uuid IS NULL OR credential_id = $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::text IS NULL OR venue = $4)
ORDER BY created_at, id
OFFSET $5 LIMIT $6;

-- count_trading_accounts --
-- How many trading accounts the same filters match.
SELECT count(*) FROM trading_accounts
WHERE owner_id = $1
  AND ($2::uuid IS NULL OR credential_id = $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::text IS NULL OR venue = $4);

-- insert_key_access --
-- Audit one reveal of decrypted keys.
INSERT INTO key_access_audit (credential_id, owner_id, secret_version, purpose) VALUES ($1, $2, $3, $4);

-- insert_key_accesses --
-- Audit one hand-out of decrypted keys per purpose ($4, one row each) of access kind $5 (engine/live leases).
INSERT INTO key_access_audit (credential_id, owner_id, secret_version, purpose, access)
SELECT $1, $2, $3, purpose, $5 FROM unnest($4::text[]) AS purpose;

-- list_key_access --
-- The reveal audit of one credential, newest first.
SELECT credential_id, owner_id, secret_version, purpose, access, accessed_at FROM key_access_audit
WHERE credential_id = $1 AND owner_id = $2 ORDER BY accessed_at DESC, id DESC LIMIT $3;

-- get_engine_key --
-- An engine-internal wrapped key.
SELECT name, kek_version, wrapped_dek, nonce, ciphertext FROM engine_keys WHERE name = $1;

-- insert_engine_key --
-- Store an engine-internal wrapped key unless another process stored one first (then no row).
INSERT INTO engine_keys (name, kek_version, wrapped_dek, nonce, ciphertext) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO NOTHING
RETURNING name;

-- secrets_to_rewrap --
-- Master-key rotation: up to $4 secret versions (CURRENT and PENDING) after key ($2, $3) in key order wrapped
-- by another master key than $1, locked; rows other transactions hold are skipped (a later pass takes them).
SELECT credential_id, version, kek_version, wrapped_dek, nonce, ciphertext
FROM credential_secrets
WHERE kek_version <> $1 AND (credential_id, version) > ($2::uuid, $3::integer)
ORDER BY credential_id, version
LIMIT $4
FOR UPDATE SKIP LOCKED;

-- secret_keys_to_rewrap --
-- The keys of up to $4 secret versions after ($2, $3) wrapped by another master key than $1, without locking
-- (the last pass of a rewrap then waits for each row's lock in turn).
SELECT credential_id, version
FROM credential_secrets
WHERE kek_version <> $1 AND (credential_id, version) > ($2::uuid, $3::integer)
ORDER BY credential_id, version
LIMIT $4;

-- lock_secret_to_rewrap --
-- Secret version ($1, $2) if still wrapped by another master key than $3, locked (waits up to lock_timeout).
SELECT credential_id, version, kek_version, wrapped_dek, nonce, ciphertext
FROM credential_secrets
WHERE credential_id = $1 AND version = $2 AND kek_version <> $3
FOR UPDATE;

-- count_secrets_to_rewrap --
-- How many secret versions are not under the current master key.
SELECT count(*) FROM credential_secrets WHERE kek_version <> $1;

-- secrets_left_to_rewrap --
-- How many secret versions are wrapped by another master key than $1, and by which versions.
SELECT count(*) AS left_count, coalesce(array_agg(DISTINCT kek_version), '{}') AS kek_versions
FROM credential_secrets WHERE kek_version <> $1;

-- update_wrapped_dek --
-- Store a re-wrapped data key (the ciphertext is untouched).
UPDATE credential_secrets SET kek_version = $3, wrapped_dek = $4
WHERE credential_id = $1 AND version = $2 AND kek_version = $5;

-- engine_keys_to_rewrap --
-- Up to $3 engine keys named after $2 wrapped by another master key than $1, locked, skipping locked rows.
SELECT name, kek_version, wrapped_dek, nonce, ciphertext
FROM engine_keys WHERE kek_version <> $1 AND name > $2
ORDER BY name
LIMIT $3
FOR UPDATE SKIP LOCKED;

-- engine_key_names_to_rewrap --
-- The names of up to $3 engine keys after $2 wrapped by another master key than $1, without locking.
SELECT name FROM engine_keys WHERE kek_version <> $1 AND name > $2 ORDER BY name LIMIT $3;

-- lock_engine_key_to_rewrap --
-- Engine key $1 if still wrapped by another master key than $2, locked (waits up to lock_timeout).
SELECT name, kek_version, wrapped_dek, nonce, ciphertext
FROM engine_keys WHERE name = $1 AND kek_version <> $2
FOR UPDATE;

-- rewrap_engine_key --
-- Store the re-wrapped data key of engine key $1 under master key $2 (the ciphertext is untouched).
UPDATE engine_keys SET kek_version = $2, wrapped_dek = $3 WHERE name = $1 AND kek_version = $4;

-- engine_keys_left_to_rewrap --
-- How many engine keys are wrapped by another master key than $1, and by which versions.
SELECT count(*) AS left_count, coalesce(array_agg(DISTINCT kek_version), '{}') AS kek_versions
FROM engine_keys WHERE kek_version <> $1;

-- kek_versions_of_secrets --
-- Every master-key version wrapping a credential secret: a skip scan of credential_secrets_kek, one index probe
-- per distinct version (it runs at every engine start).
WITH RECURSIVE found (kek_version) AS (
    (SELECT kek_version FROM credential_secrets ORDER BY kek_version LIMIT 1)
    UNION ALL
    SELECT (SELECT s.kek_version FROM credential_secrets s
            WHERE s.kek_version > found.kek_version ORDER BY s.kek_version LIMIT 1)
    FROM found WHERE found.kek_version IS NOT NULL
)
SELECT kek_version FROM found WHERE kek_version IS NOT NULL;

-- kek_versions_of_engine_keys --
-- Every master-key version wrapping an engine key (a handful of rows).
SELECT DISTINCT kek_version FROM engine_keys;

-- set_lock_timeout --
-- Bound every lock wait of the rest of this transaction ($1, e.g. '5000ms'; SET LOCAL semantics).
SELECT set_config('lock_timeout', $1, true);

-- insert_event --
-- One outbox row, in the transaction of the change it reports, with its NOTIFY (sent at commit) and whether
-- any enabled webhook endpoint of the owner wants the type (only then does the fan-out run): one round trip.
WITH ins AS (
    INSERT INTO events (id, type, owner_id, credential_id, sequence, data)
    VALUES ($1, $2, $3, $4, $5, $6)
    RETURNING position, created_at
)
SELECT ins.position,
       ins.created_at,
       pg_notify($7, '') IS NOT NULL AS notified,
       EXISTS (
           SELECT 1 FROM webhook_endpoints e
           WHERE e.owner_id = $3 AND e.enabled AND (e.event_types IS NULL OR $2 = ANY (e.event_types))
       ) AS webhooks_wanted
FROM ins;

-- events_cursor_now --
-- The outbox cursor (txid, position) just past every event of transactions that have finished.
SELECT coalesce(max(txid::text::bigint), 0) AS txid, coalesce(max(position), 0) AS position
FROM events WHERE txid < pg_snapshot_xmin(pg_current_snapshot());

-- events_after --
-- Events of finished transactions after a (txid, position) cursor, in that order. A transaction still running
-- has txid >= xmin, and every row it commits later sorts after this cursor: nothing is ever skipped.
SELECT txid::text::bigint AS txid, position, id, type, owner_id, credential_id, sequence, created_at, data
FROM events
WHERE (txid, position) > ($1::bigint::text::xid8, $2::bigint)
  AND txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY txid, position
LIMIT $3;

-- events_passed_after --
-- What a bus without listeners reads (engine/events.py): of the first $3 events of finished transactions after a
-- (txid, position) cursor, in cursor order, the last one's place and how many they are; no row: none. No data.
SELECT txid::text::bigint AS txid, position, count(*) OVER () AS n
FROM (
    SELECT txid, position
    FROM events
    WHERE (txid, position) > ($1::bigint::text::xid8, $2::bigint)
      AND txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY txid, position
    LIMIT $3
) AS passed
ORDER BY txid DESC, position DESC
LIMIT 1;

-- list_events --
-- Events of one credential of one owner, in sequence order.
SELECT position, id, type, owner_id, credential_id, sequence, created_at, data
FROM events WHERE credential_id = $1 AND owner_id = $2 ORDER BY sequence;
