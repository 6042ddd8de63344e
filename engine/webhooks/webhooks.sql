-- Named queries of the webhook endpoints and their deliveries (engine/webhooks/service.py,
-- engine/webhooks/delivery.py). Each block: "-- name --", a one-line description, the SQL.
-- Tables: webhook_endpoints, webhook_secrets, webhook_deliveries, webhook_attempts (schema.sql, webhooks markers).
-- Lock order, everywhere: the stream's advisory lock, then the endpoint row, then delivery rows.

-- count_webhook_endpoints --
-- How many endpoints owner $1 has (the per-owner limit).
SELECT count(*) FROM webhook_endpoints WHERE owner_id = $1;

-- insert_webhook_endpoint --
-- A new endpoint ($1 id, $2 owner, $3 url, $4 description, $5 event types or NULL for all), enabled.
INSERT INTO webhook_endpoints (id, owner_id, url, description, event_types)
VALUES ($1, $2, $3, $4, $5::text[])
RETURNING *;

-- insert_webhook_secret --
-- One sealed signing secret ($2 version) of endpoint $1: the current one (expires_at NULL).
INSERT INTO webhook_secrets (endpoint_id, version, kek_version, wrapped_dek, nonce, ciphertext)
VALUES ($1, $2, $3, $4, $5, $6);

-- get_webhook_endpoint --
-- Endpoint $1 of owner $2.
SELECT * FROM webhook_endpoints WHERE id = $1 AND owner_id = $2;

-- lock_webhook_endpoint --
-- Endpoint $1 of owner $2, locked for the rest of the transaction (secret rotation).
SELECT * FROM webhook_endpoints WHERE id = $1 AND owner_id = $2 FOR UPDATE;

-- list_webhook_endpoints --
-- Every endpoint of owner $1, oldest first.
SELECT * FROM webhook_endpoints WHERE owner_id = $1 ORDER BY created_at, id;

-- delete_webhook_endpoint --
-- Remove endpoint $1 of owner $2 with its secrets, deliveries and attempts (cascade).
DELETE FROM webhook_endpoints WHERE id = $1 AND owner_id = $2 RETURNING id;

-- update_webhook_endpoint --
-- Change endpoint $1 of owner $2: url $3 (NULL: keep), event types $5 when $4, enabled $6 (NULL: keep).
-- Disabling by hand records MANUAL (an automatic reason is kept); enabling clears the reason and the failure clock.
UPDATE webhook_endpoints
SET url             = coalesce($3, url),
    event_types     = CASE WHEN $4::boolean THEN $5::text[] ELSE event_types END,
    enabled         = coalesce($6::boolean, enabled),
    disabled_reason = CASE WHEN $6::boolean IS NULL THEN disabled_reason
                           WHEN $6::boolean THEN NULL
                           ELSE coalesce(disabled_reason, 'MANUAL') END,
    failing_since   = CASE WHEN $6::boolean THEN NULL ELSE failing_since END,
    updated_at      = now()
WHERE id = $1 AND owner_id = $2
RETURNING *;

-- next_webhook_secret_version --
-- The version number the next secret of endpoint $1 takes.
SELECT coalesce(max(version), 0) + 1 FROM webhook_secrets WHERE endpoint_id = $1;

-- retire_webhook_secrets --
-- Rotation: every active secret of endpoint $1 keeps signing for $2 more seconds at most, then expires.
UPDATE webhook_secrets
SET expires_at = least(coalesce(expires_at, 'infinity'::timestamptz), now() + make_interval(secs => $2))
WHERE endpoint_id = $1 AND (expires_at IS NULL OR expires_at > now());

-- prune_webhook_secrets --
-- Destroy the expired secrets of endpoint $1 and all but the newest $2 active ones.
DELETE FROM webhook_secrets
WHERE endpoint_id = $1
  AND (expires_at <= now()
       OR version NOT IN (SELECT version FROM webhook_secrets
                          WHERE endpoint_id = $1 AND (expires_at IS NULL OR expires_at > now())
                          ORDER BY version DESC LIMIT $2));

-- webhook_fan_out_targets --
-- The enabled endpoints of owner $1 that want type $2, key-share locked (not removable until commit); with a
-- credential $3, each (endpoint, credential) stream's advisory lock is taken too (see lock_webhook_stream).
SELECT e.id,
       CASE WHEN $3::uuid IS NOT NULL
            THEN pg_advisory_xact_lock(774412, hashtext(e.id::text || '/' || $3::uuid::text)) END AS locked
FROM webhook_endpoints e
WHERE e.owner_id = $1 AND e.enabled AND (e.event_types IS NULL OR $2::text = ANY (e.event_types))
FOR KEY SHARE OF e;

-- fan_out_event --
-- One delivery of event $1 (owner $2, type $3, credential $4, sequence $5) per endpoint of $6: waiting when an
-- earlier event of the same credential is still undelivered to that endpoint, pending otherwise.
INSERT INTO webhook_deliveries (id, endpoint_id, owner_id, event_id, event_type, credential_id, sequence, state)
SELECT gen_random_uuid(), t.endpoint_id, $2, $1, $3, $4, $5,
       CASE WHEN $4::uuid IS NOT NULL AND EXISTS (
                SELECT 1 FROM webhook_deliveries p
                WHERE p.endpoint_id = t.endpoint_id AND p.credential_id = $4::uuid AND p.sequence < $5
                  AND p.state IN ('pending', 'waiting'))
            THEN 'waiting' ELSE 'pending' END
FROM unnest($6::uuid[]) AS t (endpoint_id)
RETURNING id, endpoint_id, credential_id, state;

-- webhook_delivery_for_attempt --
-- Delivery $1 with what an attempt needs: its endpoint, its event, the active secrets, and whether an earlier
-- event of the same credential to the same endpoint is still undelivered (blocked).
SELECT d.id, d.state, d.attempts, d.retry_base, d.endpoint_id, d.credential_id, d.sequence, d.owner_id,
       e.url, e.enabled,
       ev.id AS event_id, ev.type AS event_type, ev.owner_id AS event_owner_id, ev.sequence AS event_sequence,
       ev.credential_id AS event_credential_id, ev.created_at AS event_created_at, ev.data AS event_data,
       d.credential_id IS NOT NULL AND EXISTS (
           SELECT 1 FROM webhook_deliveries p
           WHERE p.endpoint_id = d.endpoint_id AND p.credential_id = d.credential_id
             AND p.sequence < d.sequence AND p.state IN ('pending', 'waiting')
       ) AS blocked,
       s.versions AS secret_versions, s.kek_versions AS secret_kek_versions, s.wrapped_deks AS secret_wrapped_deks,
       s.nonces AS secret_nonces, s.ciphertexts AS secret_ciphertexts
FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.id = d.endpoint_id
JOIN events ev ON ev.id = d.event_id
CROSS JOIN LATERAL (
    SELECT array_agg(version ORDER BY version DESC) AS versions,
           array_agg(kek_version ORDER BY version DESC) AS kek_versions,
           array_agg(wrapped_dek ORDER BY version DESC) AS wrapped_deks,
           array_agg(nonce ORDER BY version DESC) AS nonces,
           array_agg(ciphertext ORDER BY version DESC) AS ciphertexts
    FROM webhook_secrets
    WHERE endpoint_id = d.endpoint_id AND (expires_at IS NULL OR expires_at > now())
) s
WHERE d.id = $1;

-- lock_webhook_stream --
-- Serialize the ordering decisions of one (endpoint $1, credential $2) stream until the transaction ends.
SELECT pg_advisory_xact_lock(774412, hashtext($1::text || '/' || $2::text));

-- kill_webhook_delivery --
-- Delivery $1 ends dead with error $2 (its endpoint is disabled), unless it has ended already.
UPDATE webhook_deliveries SET state = 'dead', last_error = $2, next_attempt_at = NULL, updated_at = now()
WHERE id = $1 AND state IN ('pending', 'waiting');

-- park_webhook_delivery --
-- Delivery $1 waits behind an earlier undelivered event of its credential (no job until it is woken).
UPDATE webhook_deliveries SET state = 'waiting', updated_at = now()
WHERE id = $1 AND state = 'pending'
RETURNING id;

-- record_webhook_attempt --
-- Attempt $2 of delivery $1: outcome $3, status $4, latency $5 ms, error $6; the delivery becomes $7 (next try in $8 s).
WITH attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, outcome, status_code, latency_ms, error)
    SELECT $1::uuid, $2::integer, $3::text, $4::integer, $5::float8, $6::text
    WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1)
    RETURNING id
)
UPDATE webhook_deliveries
SET state            = $7::text,
    attempts         = greatest(attempts, $2),
    next_attempt_at  = CASE WHEN $8::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $8::float8) END,
    last_status_code = $4,
    last_error       = $6,
    delivered_at     = CASE WHEN $7::text = 'delivered' THEN now() END,
    updated_at       = now()
WHERE id = $1 AND state = 'pending'
RETURNING id, (SELECT count(*) FROM attempt) AS recorded;

-- webhook_endpoint_failed --
-- Endpoint $1 failed an attempt: start its failure clock if needed; overdue once it has failed for $2 seconds.
UPDATE webhook_endpoints
SET failing_since = coalesce(failing_since, now())
WHERE id = $1 AND enabled
RETURNING failing_since <= now() - make_interval(secs => $2) AS overdue;

-- webhook_endpoint_succeeded --
-- Endpoint $1 answered 2xx: stop its failure clock (no write, no row lock, when it is not running).
UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL;

-- disable_webhook_endpoint --
-- Disable endpoint $1 for reason $2 (GONE, FAILING) and hand out the sequence of its event; no row if already disabled.
UPDATE webhook_endpoints
SET enabled = false, disabled_reason = $2, event_seq = event_seq + 1, updated_at = now()
WHERE id = $1 AND enabled
RETURNING *;

-- kill_webhook_deliveries --
-- The endpoint $1 is disabled: its pending and waiting deliveries become dead with error $2.
UPDATE webhook_deliveries
SET state = 'dead', last_error = $2, next_attempt_at = NULL, updated_at = now()
WHERE endpoint_id = $1 AND state IN ('pending', 'waiting');

-- wake_next_webhook_delivery --
-- The earliest waiting delivery of stream (endpoint $1, credential $2) becomes pending, unless an earlier one still is.
UPDATE webhook_deliveries AS d
SET state = 'pending', updated_at = now()
WHERE d.id = (SELECT w.id FROM webhook_deliveries w
              WHERE w.endpoint_id = $1 AND w.credential_id = $2 AND w.state = 'waiting'
              ORDER BY w.sequence LIMIT 1)
  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                  WHERE p.endpoint_id = $1 AND p.credential_id = $2 AND p.state = 'pending'
                    AND p.sequence < d.sequence)
RETURNING d.id, d.endpoint_id, d.credential_id;

-- list_webhook_deliveries --
-- Deliveries of owner $1 (endpoint $2, state $3 when given), newest first; $4 rows from offset $5.
SELECT * FROM webhook_deliveries
WHERE owner_id = $1 AND ($2::uuid IS NULL OR endpoint_id = $2::uuid) AND ($3::text IS NULL OR state = $3::text)
ORDER BY created_at DESC, id DESC
LIMIT $4 OFFSET $5;

-- count_webhook_deliveries --
-- How many deliveries list_webhook_deliveries would page through.
SELECT count(*) FROM webhook_deliveries
WHERE owner_id = $1 AND ($2::uuid IS NULL OR endpoint_id = $2::uuid) AND ($3::text IS NULL OR state = $3::text);

-- get_webhook_delivery --
-- Delivery $1 of owner $2.
SELECT * FROM webhook_deliveries WHERE id = $1 AND owner_id = $2;

-- webhook_attempts_of --
-- Every attempt of the deliveries $1, oldest first.
SELECT * FROM webhook_attempts WHERE delivery_id = ANY ($1::uuid[]) ORDER BY delivery_id, id;

-- revive_webhook_delivery --
-- An operator retries dead delivery $1 of owner $2: pending again, the retry schedule starts over.
UPDATE webhook_deliveries
SET state = 'pending', retry_base = attempts, next_attempt_at = NULL, last_error = NULL, updated_at = now()
WHERE id = $1 AND owner_id = $2 AND state = 'dead'
RETURNING id, endpoint_id, credential_id;

-- webhook_secrets_to_rewrap --
-- Master-key rotation: up to $4 secrets after key ($2 endpoint, $3 version) in key order wrapped by another
-- master key than $1, locked; rows other transactions hold are skipped (a later pass takes them).
SELECT endpoint_id, version, kek_version, wrapped_dek, nonce, ciphertext
FROM webhook_secrets
WHERE kek_version <> $1 AND (endpoint_id, version) > ($2::uuid, $3::integer)
ORDER BY endpoint_id, version
LIMIT $4
FOR UPDATE SKIP LOCKED;

-- webhook_secret_keys_to_rewrap --
-- The keys of up to $4 secrets after ($2, $3) wrapped by another master key than $1, without locking.
SELECT endpoint_id, version
FROM webhook_secrets
WHERE kek_version <> $1 AND (endpoint_id, version) > ($2::uuid, $3::integer)
ORDER BY endpoint_id, version
LIMIT $4;

-- lock_webhook_secret_to_rewrap --
-- Secret ($1 endpoint, $2 version) if still wrapped by another master key than $3, locked (waits up to
-- lock_timeout).
SELECT endpoint_id, version, kek_version, wrapped_dek, nonce, ciphertext
FROM webhook_secrets
WHERE endpoint_id = $1 AND version = $2 AND kek_version <> $3
FOR UPDATE;

-- rewrap_webhook_secret --
-- Store the rewrapped data key of secret ($1 endpoint, $2 version) under master key $3, unless it moved since.
UPDATE webhook_secrets SET kek_version = $3, wrapped_dek = $4
WHERE endpoint_id = $1 AND version = $2 AND kek_version = $5;

-- webhook_secrets_left_to_rewrap --
-- How many webhook secrets are wrapped by another master key than $1, and by which versions.
SELECT count(*) AS left_count, coalesce(array_agg(DISTINCT kek_version), '{}') AS kek_versions
FROM webhook_secrets WHERE kek_version <> $1;

-- kek_versions_of_webhook_secrets --
-- Every master-key version wrapping a webhook secret: a skip scan of webhook_secrets_kek, one index probe per
-- distinct version (it runs at every engine start).
WITH RECURSIVE found (kek_version) AS (
    (SELECT kek_version FROM webhook_secrets ORDER BY kek_version LIMIT 1)
    UNION ALL
    SELECT (SELECT s.kek_version FROM webhook_secrets s
            WHERE s.kek_version > found.kek_version ORDER BY s.kek_version LIMIT 1)
    FROM found WHERE found.kek_version IS NOT NULL
)
SELECT kek_version FROM found WHERE kek_version IS NOT NULL;

-- purge_expired_webhook_secrets --
-- Destroy every webhook secret past its grace period (the hourly purge); returns how many went.
WITH purged AS (
    DELETE FROM webhook_secrets WHERE expires_at <= now()
    RETURNING 1
)
SELECT count(*) FROM purged;
