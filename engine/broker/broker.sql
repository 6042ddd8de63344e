-- Named queries of BROKER credentials and the credentials they mint (engine/broker/).
-- Each block: "-- name --", one comment line saying what it does, the SQL with asyncpg $n placeholders.

-- broker_insert_minted --
-- A minted credential before its key exists: PENDING, secret version 1 still without material, masked key '',
-- event sequence 1 (its credential.created), its link to BROKER parent $6 and sub-account $7 (grant $8-$10) and
-- its MINT intent $11, all before any venue call. No row when owner $2 holds $5 live credentials (its quota).
WITH room AS (
    SELECT $5::integer IS NULL
           OR ce_credentials_held($2) < $5 AS ok
), written AS (
    INSERT INTO credentials (id, owner_id, venue, credential_type, nickname, masked_api_key, status,
                             secret_version, event_seq, minted_from_id, minted_sub_account)
    SELECT $1, $2, $3, 'EXCHANGE', $4, '', 'PENDING', 1, 1, $6, $7 FROM room WHERE room.ok
    RETURNING *
), link AS (
    INSERT INTO broker_links (credential_id, parent_id, sub_account, grant_read, grant_trade, ip_allowlist)
    SELECT written.id, $6, $7, $8, $9, $10 FROM written
), intent AS (
    INSERT INTO broker_intents (id, credential_id, purpose, automatic, state)
    SELECT $11, written.id, 'MINT', false, 'OPEN' FROM written
)
SELECT written.*, NULL::integer AS pending_version, NULL::text AS pending_masked_api_key,
       NULL::timestamptz AS pending_started_at
FROM written;

-- broker_get_link --
-- A minted credential's link, its parent's venue, status and secret version, and the credential's own status.
SELECT l.credential_id, l.parent_id, l.sub_account, l.grant_read, l.grant_trade, l.ip_allowlist,
       c.owner_id, c.status, c.venue, c.secret_version,
       p.status AS parent_status, p.secret_version AS parent_version
FROM broker_links l
JOIN credentials c ON c.id = l.credential_id
JOIN credentials p ON p.id = l.parent_id
WHERE l.credential_id = $1;

-- broker_get_intent --
-- One venue operation of a minted credential.
SELECT id, credential_id, purpose, automatic, state, staged_version, reason, created_at, updated_at
FROM broker_intents WHERE id = $1;

-- broker_insert_intent --
-- Record a ROTATE operation ($3 automatic) before the venue is called; no row while another is unsettled.
INSERT INTO broker_intents (id, credential_id, purpose, automatic, state)
VALUES ($1, $2, 'ROTATE', $3, 'OPEN')
ON CONFLICT (credential_id) WHERE state IN ('OPEN', 'STAGED') DO NOTHING
RETURNING id;

-- broker_touch_intent --
-- An attempt is about to call the venue for OPEN intent $1: the reconciliation leaves its keys alone for the
-- orphan grace from now. False when the intent is settled (nothing to do).
UPDATE broker_intents SET updated_at = now() WHERE id = $1 AND state = 'OPEN' RETURNING true;

-- broker_store_minted_key --
-- The minted key ($4-$7 sealed, $8 fingerprint, $9 masked) becomes secret version 1 of PENDING credential $1
-- (owner $2, venue $3) and MINT intent $10 is DONE, in one statement; no row when the intent is settled or the
-- credential is no longer a PENDING one without material. The public row.
WITH intent AS (
    UPDATE broker_intents i SET state = 'DONE', updated_at = now()
    WHERE i.id = $10 AND i.credential_id = $1 AND i.state = 'OPEN'
      AND EXISTS (SELECT 1 FROM credentials c WHERE c.id = $1 AND c.status = 'PENDING' AND c.secret_version = 1)
      AND NOT EXISTS (SELECT 1 FROM credential_secrets s WHERE s.credential_id = $1)
    RETURNING i.credential_id
), written AS (
    UPDATE credentials c SET masked_api_key = $9, updated_at = now(), event_seq = event_seq + 1
    FROM intent WHERE c.id = intent.credential_id
    RETURNING c.*
), secret AS (
    INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce,
                                    ciphertext, key_fingerprint, masked_api_key)
    SELECT written.id, 1, 'CURRENT', $2, $3, $4, $5, $6, $7, $8, $9 FROM written
)
SELECT written.*, NULL::integer AS pending_version, NULL::text AS pending_masked_api_key,
       NULL::timestamptz AS pending_started_at
FROM written;

-- broker_stage_intent --
-- ROTATE intent $1's new key is now the credential's staged version $2.
UPDATE broker_intents SET state = 'STAGED', staged_version = $2, updated_at = now()
WHERE id = $1 AND state = 'OPEN'
RETURNING id;

-- broker_fail_intent --
-- Settle intent $1 as FAILED with reason $2; its automatic flag (no row: settled already).
UPDATE broker_intents SET state = 'FAILED', reason = $2, updated_at = now()
WHERE id = $1 AND state IN ('OPEN', 'STAGED')
RETURNING automatic;

-- broker_settle_staged --
-- Staged version $2 of credential $1 was promoted ($3 'DONE') or rejected ($3 'FAILED', reason $4): the ROTATE
-- intent that staged it is settled (its automatic flag; null when none did); whether the credential is minted.
WITH settled AS (
    UPDATE broker_intents SET state = $3, reason = $4, updated_at = now()
    WHERE credential_id = $1 AND state = 'STAGED' AND staged_version = $2
    RETURNING automatic
)
SELECT (SELECT automatic FROM settled) AS automatic,
       EXISTS (SELECT 1 FROM broker_links WHERE credential_id = $1) AS minted;

-- broker_retire_key --
-- Key $2 (fingerprint) of minted credential $1, sealed ($3-$6), is to be deleted at the venue $7 seconds from now
-- (the earlier time, when it is retired already). Its delete_after.
INSERT INTO broker_retired_keys (credential_id, key_fingerprint, kek_version, wrapped_dek, nonce, ciphertext,
                                 delete_after)
VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
ON CONFLICT (credential_id, key_fingerprint)
    DO UPDATE SET delete_after = least(broker_retired_keys.delete_after, EXCLUDED.delete_after)
RETURNING delete_after;

-- broker_due_retired --
-- Retired keys due for deletion on sub-account $2 of parent $1 (of credential $3 only, unless null), sealed.
SELECT r.credential_id, r.key_fingerprint, r.kek_version, r.wrapped_dek, r.nonce, r.ciphertext
FROM broker_retired_keys r
JOIN broker_links l ON l.credential_id = r.credential_id
WHERE l.parent_id = $1 AND l.sub_account = $2 AND ($3::uuid IS NULL OR r.credential_id = $3)
  AND r.delete_after <= now()
ORDER BY r.delete_after
LIMIT 500;

-- broker_live_versions --
-- The secret versions credential $1 holds now (current and staged), to retire before they are destroyed.
SELECT version FROM credential_secrets WHERE credential_id = $1 ORDER BY version;

-- broker_settle_all --
-- Credential $1 was revoked or its keys replaced at once: every unsettled intent is FAILED with reason $2;
-- whether the credential is a minted one.
WITH settled AS (
    UPDATE broker_intents SET state = 'FAILED', reason = $2, updated_at = now()
    WHERE credential_id = $1 AND state IN ('OPEN', 'STAGED')
)
SELECT EXISTS (SELECT 1 FROM broker_links WHERE credential_id = $1);

-- broker_due_rotations --
-- Minted VERIFIED credentials whose current key is older than $1 seconds or whose venue expiry is less than $2
-- seconds away, with no rotation staged or under way and no automatic one failed in the last $3 seconds; the
-- oldest keys first, at most $4.
SELECT c.id, c.owner_id
FROM credentials c
JOIN broker_links l ON l.credential_id = c.id
JOIN credential_secrets s ON s.credential_id = c.id AND s.state = 'CURRENT'
WHERE c.status = 'VERIFIED'
  AND NOT EXISTS (SELECT 1 FROM credential_secrets p WHERE p.credential_id = c.id AND p.state = 'PENDING')
  AND NOT EXISTS (
      SELECT 1 FROM broker_intents i
      WHERE i.credential_id = c.id
        AND (i.state IN ('OPEN', 'STAGED')
             OR (i.state = 'FAILED' AND i.automatic AND i.updated_at > now() - make_interval(secs => $3)))
  )
  AND (s.created_at <= now() - make_interval(secs => $1)
       OR (c.permissions ->> 'expiresAt')::bigint
          <= (extract(epoch FROM now()) * 1000)::bigint + ($2::float8 * 1000)::bigint)
ORDER BY s.created_at
LIMIT $4;

-- broker_sub_accounts --
-- Every (BROKER parent, sub-account) pair the engine minted into, with the parent's owner: what reconciles.
SELECT DISTINCT l.parent_id, l.sub_account, p.owner_id
FROM broker_links l JOIN credentials p ON p.id = l.parent_id;

-- broker_key_states --
-- For reconciliation of sub-account $2 of parent $1: each credential minted there, its status, the
-- fingerprints of the keys it holds (current and staged), of its retired keys (deleted by their own rows), and
-- whether a venue operation of it is under way (an intent touched less than $3 seconds ago).
SELECT l.credential_id, c.status, c.owner_id,
       coalesce(array_agg(s.key_fingerprint) FILTER (WHERE s.key_fingerprint IS NOT NULL), '{}') AS live,
       coalesce((SELECT array_agg(r.key_fingerprint) FROM broker_retired_keys r
                 WHERE r.credential_id = l.credential_id), '{}') AS retired,
       EXISTS (SELECT 1 FROM broker_intents i
               WHERE i.credential_id = l.credential_id AND i.state IN ('OPEN', 'STAGED')
                 AND i.updated_at > now() - make_interval(secs => $3)) AS in_flight
FROM broker_links l
JOIN credentials c ON c.id = l.credential_id
LEFT JOIN credential_secrets s ON s.credential_id = l.credential_id
WHERE l.parent_id = $1 AND l.sub_account = $2
GROUP BY l.credential_id, c.status, c.owner_id;

-- broker_forget_retired --
-- A retired key of credential $1 (fingerprint $2) is gone at the venue.
DELETE FROM broker_retired_keys WHERE credential_id = $1 AND key_fingerprint = $2;

-- broker_retired_to_rewrap --
-- Master-key rotation: up to $4 retired keys after key ($2, $3) in key order wrapped by another master key than
-- $1, locked; rows other transactions hold are skipped (a later pass takes them).
SELECT credential_id, key_fingerprint, kek_version, wrapped_dek, nonce, ciphertext
FROM broker_retired_keys
WHERE kek_version <> $1 AND (credential_id, key_fingerprint) > ($2::uuid, $3::bytea)
ORDER BY credential_id, key_fingerprint
LIMIT $4
FOR UPDATE SKIP LOCKED;

-- broker_retired_keys_to_rewrap --
-- The keys of up to $4 retired keys after ($2, $3) wrapped by another master key than $1, without locking.
SELECT credential_id, key_fingerprint
FROM broker_retired_keys
WHERE kek_version <> $1 AND (credential_id, key_fingerprint) > ($2::uuid, $3::bytea)
ORDER BY credential_id, key_fingerprint
LIMIT $4;

-- lock_broker_retired_to_rewrap --
-- Retired key ($1, $2) if still wrapped by another master key than $3, locked (waits up to lock_timeout).
SELECT credential_id, key_fingerprint, kek_version, wrapped_dek, nonce, ciphertext
FROM broker_retired_keys
WHERE credential_id = $1 AND key_fingerprint = $2 AND kek_version <> $3
FOR UPDATE;

-- rewrap_broker_retired --
-- Store the re-wrapped data key of retired key ($1, $2) under master key $3 (the ciphertext is untouched).
UPDATE broker_retired_keys SET kek_version = $3, wrapped_dek = $4
WHERE credential_id = $1 AND key_fingerprint = $2 AND kek_version = $5;

-- broker_retired_left_to_rewrap --
-- How many retired keys are wrapped by another master key than $1, and by which versions.
SELECT count(*) AS left_count, coalesce(array_agg(DISTINCT kek_version), '{}') AS kek_versions
FROM broker_retired_keys WHERE kek_version <> $1;

-- kek_versions_of_broker_retired --
-- Every master-key version wrapping a retired key (a few rows: they live for the rotation grace).
SELECT DISTINCT kek_version FROM broker_retired_keys;

-- broker_purge_intents --
-- Settled venue operations (DONE, FAILED) last touched more than $1 seconds ago, at most $2 of them: deleted.
DELETE FROM broker_intents
WHERE id IN (
    SELECT id FROM broker_intents
    WHERE state IN ('DONE', 'FAILED') AND updated_at < now() - make_interval(secs => $1)
    LIMIT $2
);
