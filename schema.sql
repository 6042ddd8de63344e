-- credential-engine: the whole PostgreSQL schema. Idempotent: applied at every engine start (under an advisory
-- lock), so every statement is CREATE ... IF NOT EXISTS or otherwise safe to repeat.

-- Which schema.sql this database holds (its SHA-256): engines skip the DDL, and its locks, when it matches.
CREATE TABLE IF NOT EXISTS engine_schema (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    digest      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- A stored credential. Key material lives in credential_secrets, never here.
CREATE TABLE IF NOT EXISTS credentials (
    id               uuid PRIMARY KEY,
    owner_id         text NOT NULL,
    venue            text NOT NULL CHECK (venue IN ('BINANCE', 'OKX', 'BYBIT', 'COINBASE', 'KRAKEN')),
    credential_type  text NOT NULL CHECK (credential_type IN ('EXCHANGE', 'BROKER')),
    nickname         text,
    masked_api_key   text NOT NULL,
    status           text NOT NULL CHECK (status IN ('PENDING', 'VERIFIED', 'FAILED', 'REVOKED')),
    -- the secret version in use; 0 once revoked (no material left). The fence for probe results.
    secret_version   integer NOT NULL,
    identities       text[] NOT NULL DEFAULT '{}',
    permissions      jsonb,
    venue_account_id text,
    -- the venue account of the first successful verification: set once, never changed (a trigger refuses it);
    -- every later verification or rotation that reaches another account fails with ACCOUNT_MISMATCH
    pinned_venue_account_id text,
    environment      text,
    failure_reason   text,
    failure_message  text,
    warnings         text[] NOT NULL DEFAULT '{}',
    event_seq        bigint NOT NULL DEFAULT 0,  -- last per-credential event sequence handed out
    last_secret_version integer NOT NULL DEFAULT 1,  -- monotonic: a staged version never reuses a number
    rotation_failure_reason text,
    expiry_warned_at_ms bigint,                  -- the expiry we already warned about (once per expiry)
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    verified_at      timestamptz,
    revoked_at       timestamptz,
    CONSTRAINT revoked_has_no_version CHECK ((status = 'REVOKED') = (secret_version = 0))
);
-- Databases made before the pinned account existed: add it, pinned to the account already verified (a
-- credential has a venue_account_id only once it has verified). Repeating this changes nothing.
ALTER TABLE credentials ADD COLUMN IF NOT EXISTS pinned_venue_account_id text;
UPDATE credentials SET pinned_venue_account_id = venue_account_id
WHERE pinned_venue_account_id IS NULL AND venue_account_id IS NOT NULL;
-- A credential minted through a BROKER credential: its parent and sub-account, as broker_links holds them (set
-- with the row, never changed; the credential object shows them as mintedFrom). Databases made before: added,
-- then filled from broker_links once that table exists (below).
ALTER TABLE credentials ADD COLUMN IF NOT EXISTS minted_from_id uuid;
ALTER TABLE credentials ADD COLUMN IF NOT EXISTS minted_sub_account text;

CREATE OR REPLACE FUNCTION credential_pinned_account_is_final() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the venue account a credential is pinned to never changes' USING ERRCODE = 'check_violation';
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS credentials_pinned_account_final ON credentials;
CREATE TRIGGER credentials_pinned_account_final
    BEFORE UPDATE OF pinned_venue_account_id ON credentials
    FOR EACH ROW
    WHEN (OLD.pinned_venue_account_id IS NOT NULL
          AND NEW.pinned_venue_account_id IS DISTINCT FROM OLD.pinned_venue_account_id)
    EXECUTE FUNCTION credential_pinned_account_is_final();

-- What the credential quota counts, kept as counters instead of counting an owner's rows at every create (that
-- count read every credential of the owner, and a batch of 50 owners' creations counted them all: most of its
-- statement's time in the lifecycle benchmark, and more with every credential stored). An owner holds
-- created - gone credentials that are not REVOKED, where:
--   credential_counts_created  rows inserted not REVOKED, added by the insert (a statement trigger, one upsert per
--                              owner). Creations run under the owner's quota lock (advisory class 774412) when
--                              there is a quota, so this row is only ever written by the holder of that lock:
--                              reading it under the lock never waits and sees the exact figure;
--   credential_counts_gone     credentials that left the count: revoked, or deleted while not REVOKED (a row
--                              trigger). Revocations do not take the quota lock (a revocation waiting for a
--                              creation batch, or one holding up a batch, would tie owners together), so they
--                              keep a row of their own: a create reads it without waiting, and a revocation not
--                              yet committed is not seen, exactly as a count of the rows would not see it.
-- A TRUNCATE of credentials empties both. engine.testing's invariants compare them with a count of the rows.
CREATE TABLE IF NOT EXISTS credential_counts_created (
    owner_id text PRIMARY KEY,
    n        bigint NOT NULL CHECK (n >= 0)
);
CREATE TABLE IF NOT EXISTS credential_counts_gone (
    owner_id text PRIMARY KEY,
    n        bigint NOT NULL  -- no CHECK: PostgreSQL checks the proposed row of an upsert (-1 for a credential
                              -- taken out of REVOKED by hand) before it finds the existing one
);

CREATE OR REPLACE FUNCTION ce_count_created() RETURNS trigger AS $$
BEGIN
    INSERT INTO credential_counts_created AS k (owner_id, n)
    SELECT a.owner_id, count(*) FROM added a WHERE a.status <> 'REVOKED' GROUP BY a.owner_id ORDER BY a.owner_id
    ON CONFLICT (owner_id) DO UPDATE SET n = k.n + EXCLUDED.n;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION ce_count_gone() RETURNS trigger AS $$
DECLARE
    who text := CASE WHEN TG_OP = 'DELETE' THEN OLD.owner_id ELSE NEW.owner_id END;
    delta integer := CASE WHEN TG_OP = 'UPDATE' AND NEW.status <> 'REVOKED' THEN -1 ELSE 1 END;
BEGIN
    INSERT INTO credential_counts_gone AS k (owner_id, n) VALUES (who, delta)
    ON CONFLICT (owner_id) DO UPDATE SET n = k.n + EXCLUDED.n;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION ce_count_truncated() RETURNS trigger AS $$
BEGIN
    DELETE FROM credential_counts_created;
    DELETE FROM credential_counts_gone;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

-- How many credentials that are not REVOKED owner p_owner holds (under its quota lock: exact).
CREATE OR REPLACE FUNCTION ce_credentials_held(p_owner text) RETURNS bigint AS $$
    SELECT coalesce((SELECT n FROM credential_counts_created WHERE owner_id = p_owner), 0)
           - coalesce((SELECT n FROM credential_counts_gone WHERE owner_id = p_owner), 0)
$$ LANGUAGE sql STABLE;

-- The triggers before the first fill: each takes a lock on credentials that waits for every transaction writing
-- it and keeps new writers out until this schema's transaction commits, so the fill below counts every row
-- written before and the triggers every row after.
DROP TRIGGER IF EXISTS credentials_count_created ON credentials;
CREATE TRIGGER credentials_count_created
    AFTER INSERT ON credentials REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION ce_count_created();
DROP TRIGGER IF EXISTS credentials_count_revoked ON credentials;
CREATE TRIGGER credentials_count_revoked
    AFTER UPDATE OF status ON credentials
    FOR EACH ROW
    WHEN ((OLD.status = 'REVOKED') IS DISTINCT FROM (NEW.status = 'REVOKED'))
    EXECUTE FUNCTION ce_count_gone();
DROP TRIGGER IF EXISTS credentials_count_deleted ON credentials;
CREATE TRIGGER credentials_count_deleted
    AFTER DELETE ON credentials
    FOR EACH ROW
    WHEN (OLD.status <> 'REVOKED')
    EXECUTE FUNCTION ce_count_gone();
DROP TRIGGER IF EXISTS credentials_count_truncated ON credentials;
CREATE TRIGGER credentials_count_truncated
    AFTER TRUNCATE ON credentials
    FOR EACH STATEMENT EXECUTE FUNCTION ce_count_truncated();
-- first fill (a database from before the counters): every owner without a counter yet gets its count of rows
INSERT INTO credential_counts_created (owner_id, n)
SELECT c.owner_id, count(*) FROM credentials c
WHERE c.status <> 'REVOKED'
  AND NOT EXISTS (SELECT 1 FROM credential_counts_created k WHERE k.owner_id = c.owner_id)
GROUP BY c.owner_id
ON CONFLICT (owner_id) DO NOTHING;

-- A statement that changes a credential for a job attempt raises this when the attempt turns out to no longer own
-- its job (queries.sql, verified_and_done): the error undoes the whole statement (engine/db.py: AttemptLost).
CREATE OR REPLACE FUNCTION ce_attempt_lost() RETURNS boolean AS $$
BEGIN
    RAISE EXCEPTION 'the job attempt no longer owns its job' USING ERRCODE = 'CE409';
END
$$ LANGUAGE plpgsql;

-- Whether owner p_owner may hold one more credential (p_quota: how many that are not REVOKED it may hold; NULL:
-- no quota), asked under the owner's quota lock (engine/bounds/quotas.py: advisory class 774412, waited for at
-- most p_timeout), which it takes first and which holds until the transaction ends. The count
-- (ce_credentials_held) is read by a statement of its own in a VOLATILE function, so under READ COMMITTED it runs
-- on a snapshot taken after the lock was granted and sees every credential committed before: what lock_owner
-- followed by insert_credential does in two statements, for a statement that must do it in one (queries.sql,
-- created_and_enqueued).
CREATE OR REPLACE FUNCTION ce_credential_room(p_owner text, p_quota integer, p_timeout text) RETURNS boolean AS $$
DECLARE
    held bigint;
BEGIN
    IF p_quota IS NULL THEN
        RETURN true;
    END IF;
    PERFORM set_config('lock_timeout', p_timeout, true);
    PERFORM pg_advisory_xact_lock(774412, hashtext(p_owner));
    held := ce_credentials_held(p_owner);
    RETURN held < p_quota;
END
$$ LANGUAGE plpgsql VOLATILE;

-- The quota room of a batch of new credentials (queries.sql, created_in_batch): what ce_credential_room does for
-- one owner, for every owner of p_owners at once, without waiting. Each distinct owner's quota lock (advisory
-- class 774412) is tried, never waited for: a batch carries many owners, and waiting for one owner's lock
-- (held by another process's create, mint or transaction path) would hold up every other owner's creations
-- behind it. An owner whose lock is taken elsewhere comes back busy (held NULL): its items are not written by
-- the batch and their callers send them alone (engine/creates.py), waiting for that lock as a single create
-- does (p_timeout, also the bound of any row lock the batch's inserts wait for; a table lock, from DDL or LOCK
-- TABLE, is taken before the statement runs this function, so only the command timeout bounds that wait).
-- Then, by a statement of its own (a snapshot taken after the locks), how many credentials each locked owner holds that are not REVOKED
-- (ce_credentials_held): one row per locked owner. No lock and no row when p_quota is NULL (no quota; creations
-- of one owner in two transactions then wait for each other's counter row, credential_counts_created, until the
-- other commits, at most p_timeout); the lock timeout is set in every case.
DROP FUNCTION IF EXISTS ce_credential_rooms(text[], integer, text);
CREATE FUNCTION ce_credential_rooms(p_owners text[], p_quota integer, p_timeout text)
RETURNS TABLE (room_owner text, held bigint, busy boolean) AS $$
DECLARE
    owner_name text;
    taken text[] := '{}';
    refused text[] := '{}';
BEGIN
    PERFORM set_config('lock_timeout', p_timeout, true);  -- also the bound of the inserts' waits
    IF p_quota IS NULL THEN
        RETURN;
    END IF;
    FOR owner_name IN SELECT DISTINCT o FROM unnest(p_owners) AS o ORDER BY 1 LOOP
        IF pg_try_advisory_xact_lock(774412, hashtext(owner_name)) THEN
            taken := taken || owner_name;
        ELSE
            refused := refused || owner_name;
        END IF;
    END LOOP;
    RETURN QUERY SELECT o, NULL::bigint, true FROM unnest(refused) AS o;
    RETURN QUERY SELECT o, ce_credentials_held(o), false FROM unnest(taken) AS o;
END
$$ LANGUAGE plpgsql VOLATILE;

CREATE INDEX IF NOT EXISTS credentials_owner_created ON credentials (owner_id, created_at, id);
CREATE INDEX IF NOT EXISTS credentials_verified_sweep ON credentials (verified_at) WHERE status = 'VERIFIED';

-- Encrypted key material, one row per secret version: CURRENT (in use) or PENDING (a staged rotation).
-- Envelope encryption (engine/crypto.py): ciphertext under a per-version data key, the data key wrapped by a
-- versioned master key. owner_id/venue are copied here so the fingerprint uniqueness can be a plain index.
CREATE TABLE IF NOT EXISTS credential_secrets (
    credential_id    uuid NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    version          integer NOT NULL CHECK (version > 0),
    state            text NOT NULL CHECK (state IN ('CURRENT', 'PENDING')),
    owner_id         text NOT NULL,
    venue            text NOT NULL,
    kek_version      integer NOT NULL,
    wrapped_dek      bytea NOT NULL,
    nonce            bytea NOT NULL,
    ciphertext       bytea NOT NULL,
    key_fingerprint  bytea NOT NULL,       -- HMAC-SHA256 of the API key: duplicate detection without the key
    masked_api_key   text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (credential_id, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS credential_secrets_one_current
    ON credential_secrets (credential_id) WHERE state = 'CURRENT';
CREATE UNIQUE INDEX IF NOT EXISTS credential_secrets_one_pending
    ON credential_secrets (credential_id) WHERE state = 'PENDING';
CREATE UNIQUE INDEX IF NOT EXISTS credential_secrets_fingerprint
    ON credential_secrets (owner_id, venue, key_fingerprint);
CREATE INDEX IF NOT EXISTS credential_secrets_kek ON credential_secrets (kek_version);

-- docs/api-dialect.md §8's trading accounts. An ACTIVE account always points at a non-revoked credential (the revoke
-- transaction disables them; a trigger refuses any ACTIVE row pointing at a REVOKED credential).
CREATE TABLE IF NOT EXISTS trading_accounts (
    id             uuid PRIMARY KEY,
    owner_id       text NOT NULL,
    credential_id  uuid NOT NULL REFERENCES credentials (id),
    venue          text NOT NULL,
    name           text,
    account_type   text NOT NULL,
    status         text NOT NULL CHECK (status IN ('ACTIVE', 'DISABLED')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS trading_accounts_owner ON trading_accounts (owner_id, created_at, id);
CREATE INDEX IF NOT EXISTS trading_accounts_credential ON trading_accounts (credential_id) WHERE status = 'ACTIVE';
CREATE UNIQUE INDEX IF NOT EXISTS trading_accounts_one_active_per_type
    ON trading_accounts (credential_id, account_type) WHERE status = 'ACTIVE';

-- The credential is read FOR SHARE: a revoke running concurrently (it locks the credential FOR UPDATE) either
-- commits first, and this sees REVOKED, or waits for this transaction, and then disables the new account. A
-- plain read would see the credential as it was before an uncommitted revoke, and both would commit. The row
-- is locked before the status is looked at (a WHERE on the status would skip the row without waiting).
CREATE OR REPLACE FUNCTION trading_account_needs_live_credential() RETURNS trigger AS $$
DECLARE
    credential_status text;
BEGIN
    IF NEW.status = 'ACTIVE' THEN
        SELECT c.status INTO credential_status FROM credentials c WHERE c.id = NEW.credential_id FOR SHARE;
        IF credential_status = 'REVOKED' THEN
            RAISE EXCEPTION 'an ACTIVE trading account cannot point at a REVOKED credential'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS trading_accounts_live_credential ON trading_accounts;
CREATE TRIGGER trading_accounts_live_credential
    BEFORE INSERT OR UPDATE ON trading_accounts
    FOR EACH ROW EXECUTE FUNCTION trading_account_needs_live_credential();

-- What callers read: a credential with its staged rotation, if any. Dropped and made again (not replaced): a
-- column added to credentials moves the view's columns, which CREATE OR REPLACE VIEW refuses.
DROP VIEW IF EXISTS credential_view;
CREATE VIEW credential_view AS
SELECT c.*,
       p.version        AS pending_version,
       p.masked_api_key AS pending_masked_api_key,
       p.created_at     AS pending_started_at
FROM credentials c
LEFT JOIN credential_secrets p ON p.credential_id = c.id AND p.state = 'PENDING';

-- Engine-internal keys (the fingerprint HMAC key), wrapped under the master key like any secret (Vault.wrap_blob
-- with the row's name as the purpose).
CREATE TABLE IF NOT EXISTS engine_keys (
    name         text PRIMARY KEY,
    kek_version  integer NOT NULL,
    wrapped_dek  bytea NOT NULL,
    nonce        bytea NOT NULL,
    ciphertext   bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The transactional outbox: one row per lifecycle event, written in the transaction of the change.
-- position is global and increasing in commit order per writer; listeners read by position.
CREATE TABLE IF NOT EXISTS events (
    position       bigserial PRIMARY KEY,
    -- the writing transaction: readers only take rows of transactions older than every running one
    -- (xid < pg_snapshot_xmin), so a row that commits late can never be skipped by a reader's cursor
    txid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id             uuid NOT NULL UNIQUE,
    type           text NOT NULL,
    owner_id       text NOT NULL,
    credential_id  uuid,
    sequence       bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    data           jsonb NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_credential_sequence ON events (credential_id, sequence);
CREATE INDEX IF NOT EXISTS events_owner ON events (owner_id, position);
CREATE INDEX IF NOT EXISTS events_tail ON events (txid, position);
-- the retention purge (engine/bounds/retention.py) walks old events in age order here
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);

-- The outbox cursor of each running EventBus (engine/events.py), published every few seconds: the retention
-- purge never deletes an event after the smallest cursor refreshed within the stale bound (a process that stops
-- deletes its row; a killed one stops holding events back once its row is stale).
CREATE TABLE IF NOT EXISTS event_cursors (
    id          text PRIMARY KEY,
    txid        bigint NOT NULL,
    position    bigint NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- Every reveal of decrypted keys to the embedding application.
CREATE TABLE IF NOT EXISTS key_access_audit (
    id             bigserial PRIMARY KEY,
    credential_id  uuid NOT NULL,
    owner_id       text NOT NULL,
    secret_version integer NOT NULL,
    purpose        text,
    accessed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS key_access_audit_credential ON key_access_audit (credential_id, accessed_at);
-- the retention purge deletes rows past ENGINE_KEY_ACCESS_RETENTION through this
CREATE INDEX IF NOT EXISTS key_access_audit_accessed ON key_access_audit (accessed_at);
-- what handed the keys out: 'reveal' (reveal_keys), 'lease_open' (a key lease opened: engine/live) or
-- 'lease_swap' (a lease's keys swapped in place after a rotation)
ALTER TABLE key_access_audit ADD COLUMN IF NOT EXISTS access text NOT NULL DEFAULT 'reveal';

-- BEGIN queue (owned by engine/queue.py)
-- The durable job queue. A job moves queued -> running -> done | dead, or back to queued (retry, hand-back);
-- queued jobs can be cancelled.
-- attempt counts every claim and is the fencing token: outcome writes match id AND attempt AND running, so a
-- late finisher of an old attempt changes nothing. uncounted: claims that do not count against max_attempts
-- (hand-backs at shutdown, attempts before an operator's retry); tries so far = attempt - uncounted.
-- Finished rows stay (operators list them); JobQueue.purge() deletes old done and cancelled rows.
-- lease_cap: while running, the latest lease_expires_at may reach in this attempt (claim time + the kind's handler
-- timeout + a margin): a heartbeat never holds a job past it, so a hung attempt is taken back.
-- fair_key, fair_seq: fairness across owners (engine/queue.py, "Fair claims"). A job due now that names its owner
-- (fair_key) gets a start tag fair_seq = greatest(that owner's last queued tag + 1, the smallest queued tag) and
-- is claimed in tag order: one owner's thousands of jobs take turns with everyone else's. fair_seq is NULL for
-- jobs without an owner and for scheduled and retried jobs (claimed in run_at order); a row with a fair_seq is
-- due (run_at <= now()) when it is given one.
CREATE TABLE IF NOT EXISTS queue_jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              text NOT NULL,
    payload           jsonb NOT NULL DEFAULT '{}',
    state             text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'dead', 'cancelled')),
    attempt           integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    uncounted         integer NOT NULL DEFAULT 0 CHECK (uncounted >= 0 AND uncounted <= attempt),
    max_attempts      integer NOT NULL CHECK (max_attempts > 0),
    dedupe_key        text,
    run_at            timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz,
    worker_id         text,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    lease_cap         timestamptz,
    fair_key          text,
    fair_seq          bigint,
    CONSTRAINT queue_jobs_lease_iff_running CHECK ((state = 'running') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT queue_jobs_finished_iff_final CHECK ((state IN ('done', 'dead', 'cancelled')) = (finished_at IS NOT NULL))
);
-- databases made before lease caps and fair claims
ALTER TABLE queue_jobs ADD COLUMN IF NOT EXISTS lease_cap timestamptz;
ALTER TABLE queue_jobs ADD COLUMN IF NOT EXISTS fair_key text;
ALTER TABLE queue_jobs ADD COLUMN IF NOT EXISTS fair_seq bigint;
DROP INDEX IF EXISTS queue_jobs_ready;  -- replaced by queue_jobs_due (it held the fair jobs too)
-- the claim query walks these in order; rows leave them when claimed: jobs in run_at order ...
CREATE INDEX IF NOT EXISTS queue_jobs_due ON queue_jobs (run_at, id) WHERE state = 'queued' AND fair_seq IS NULL;
-- ... and owners' jobs in start-tag order (the smallest tag is also what a new owner's job starts from)
CREATE INDEX IF NOT EXISTS queue_jobs_fair ON queue_jobs (fair_seq, id) WHERE state = 'queued' AND fair_seq IS NOT NULL;
-- an owner's last queued tag, when it enqueues another job
CREATE INDEX IF NOT EXISTS queue_jobs_fair_owner ON queue_jobs (fair_key, fair_seq) WHERE state = 'queued' AND fair_seq IS NOT NULL;
-- expired leases (a worker died) are found here by the same claim query
CREATE INDEX IF NOT EXISTS queue_jobs_leases ON queue_jobs (lease_expires_at) WHERE state = 'running';
-- at most one queued (not yet started) job per dedupe key; a running one does not block a new queued one
CREATE UNIQUE INDEX IF NOT EXISTS queue_jobs_dedupe_queued ON queue_jobs (dedupe_key) WHERE state = 'queued';
-- the retention purge (JobQueue.purge, the hourly purge_jobs job) finds old finished rows here
CREATE INDEX IF NOT EXISTS queue_jobs_finished ON queue_jobs (finished_at) WHERE state IN ('done', 'cancelled');
-- the operators' dead-letter list
CREATE INDEX IF NOT EXISTS queue_jobs_dead ON queue_jobs (id) WHERE state = 'dead';
-- The claim (engine/queue/queue.sql, claim_jobs; engine/queue/backend.py, "Batches"): one call, one round trip,
-- no transaction of its own. Mark attempts p_done_ids/p_done_attempts done, then claim up to p_limit jobs of
-- kinds p_kinds for worker p_worker with a p_lease s lease, capped at p_caps[i] s after now for kind p_kinds[i].
-- The outcomes of the previous batch ride along (fenced like complete_jobs). Expired leases (a worker died) come
-- first. Then ready jobs from the two orders (queue_jobs_due, queue_jobs_fair): owners' jobs in start-tag order
-- get what is left but up to half of it, which goes to the jobs in run_at order (without an owner, scheduled,
-- retried); either fills in for the other when it runs short. The run_at order is read (and locked) for the whole
-- batch and cut afterwards (a CTE keeps its rows' order): when owners' jobs take their half, the rows cut stay
-- locked until the call ends, a moment. The rows are locked in the CTEs and updated by primary key (an array, so
-- the plan stays index lookups whatever the statistics say); an expired job already at its last try is buried
-- (dead) instead of claimed.
-- SET enable_sort = off: the claims must walk the ready indexes in order and stop after p_limit rows; with stale
-- statistics (right after a bulk enqueue) the planner would rather sort the whole backlog. A function's SET
-- clause holds while it runs and is restored when it exits (https://www.postgresql.org/docs/current/sql-createfunction.html),
-- so nothing stays on the session (a transaction pooler's server connection), and the call needs no BEGIN,
-- SET LOCAL and COMMIT round trips of its own.
CREATE OR REPLACE FUNCTION queue_claim(
    p_limit integer, p_worker text, p_lease float8, p_kinds text[], p_done_ids bigint[], p_done_attempts integer[],
    p_caps float8[]
) RETURNS TABLE (
    id bigint, kind text, payload jsonb, state text, attempt integer, tries integer, max_attempts integer,
    dedupe_key text, run_at timestamptz, created_at timestamptz
) SET enable_sort = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH completed AS (
        -- each id once in p_done_ids (the caller keeps an id's newest attempt: only that one can still hold
        -- the row), so the attempt is looked up by position: no join, whose plan (cached, generic) would
        -- compare every running row with every outcome
        UPDATE queue_jobs AS j
        SET state = 'done', lease_expires_at = NULL, worker_id = NULL, finished_at = now()
        WHERE j.id = ANY (p_done_ids) AND j.state = 'running'
          AND j.attempt = p_done_attempts[array_position(p_done_ids, j.id)]
        RETURNING j.id
    ), expired AS (
        SELECT q.id
        FROM queue_jobs AS q
        WHERE q.state = 'running' AND q.lease_expires_at < now() AND q.kind = ANY (p_kinds)
          AND NOT (q.id = ANY (p_done_ids))  -- a row is changed once per statement: not both completed and claimed
        ORDER BY q.lease_expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT q.id
        FROM queue_jobs AS q
        WHERE q.state = 'queued' AND q.fair_seq IS NULL AND q.run_at <= now() AND q.kind = ANY (p_kinds)
        ORDER BY q.run_at, q.id
        LIMIT greatest(p_limit - (SELECT count(*) FROM expired), 0)
        FOR UPDATE SKIP LOCKED
    ), fair AS (
        SELECT q.id
        FROM queue_jobs AS q
        WHERE q.state = 'queued' AND q.fair_seq IS NOT NULL AND q.kind = ANY (p_kinds)
        ORDER BY q.fair_seq, q.id
        -- all that is left but what the run_at order keeps: up to half of it, less when it has fewer ready
        LIMIT greatest(p_limit - (SELECT count(*) FROM expired) - least(
            (SELECT count(*) FROM due), ceil((p_limit - (SELECT count(*) FROM expired)) / 2.0)), 0)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE queue_jobs AS j
    SET state            = CASE WHEN j.state = 'running' AND j.attempt - j.uncounted >= j.max_attempts
                                THEN 'dead' ELSE 'running' END,
        attempt          = CASE WHEN j.state = 'running' AND j.attempt - j.uncounted >= j.max_attempts
                                THEN j.attempt ELSE j.attempt + 1 END,
        lease_expires_at = CASE WHEN j.state = 'running' AND j.attempt - j.uncounted >= j.max_attempts
                                THEN NULL
                                ELSE now() + make_interval(secs => least(p_lease, p_caps[array_position(p_kinds, j.kind)])) END,
        lease_cap        = now() + make_interval(secs => p_caps[array_position(p_kinds, j.kind)]),
        worker_id        = CASE WHEN j.state = 'running' AND j.attempt - j.uncounted >= j.max_attempts
                                THEN NULL ELSE p_worker END,
        finished_at      = CASE WHEN j.state = 'running' AND j.attempt - j.uncounted >= j.max_attempts
                                THEN now() END,
        last_error       = CASE WHEN j.state = 'running'
                                THEN 'LeaseExpired: the worker running attempt ' || j.attempt || ' stopped renewing its lease'
                                ELSE j.last_error END
    WHERE j.id = ANY (ARRAY(
        SELECT e.id FROM expired AS e
        UNION ALL (SELECT u.id FROM due AS u
                   LIMIT greatest(p_limit - (SELECT count(*) FROM expired) - (SELECT count(*) FROM fair), 0))
        UNION ALL SELECT f.id FROM fair AS f))
    RETURNING j.id, j.kind, j.payload, j.state, j.attempt, j.attempt - j.uncounted, j.max_attempts,
              j.dedupe_key, j.run_at, j.created_at;
END
$$ LANGUAGE plpgsql;
-- END queue

-- BEGIN broker (owned by engine/broker/)
-- A credential minted through a BROKER (master) credential: an EXCHANGE credential whose key the engine created
-- for one sub-account of the master account, labelled at the venue with the credential's id. The row is written
-- with the credential, before any venue call (the intent): a key labelled with this id that the credential does
-- not hold is an orphan the reconciliation deletes (engine/broker/reconcile.py).
CREATE TABLE IF NOT EXISTS broker_links (
    credential_id  uuid PRIMARY KEY REFERENCES credentials (id) ON DELETE CASCADE,
    parent_id      uuid NOT NULL REFERENCES credentials (id),
    sub_account    text NOT NULL,
    grant_read     boolean NOT NULL,
    grant_trade    boolean NOT NULL,
    ip_allowlist   text[] NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS broker_links_sub ON broker_links (parent_id, sub_account);
-- Credentials minted before credentials.minted_from_id existed. Repeating this changes nothing.
UPDATE credentials c SET minted_from_id = l.parent_id, minted_sub_account = l.sub_account
FROM broker_links l
WHERE l.credential_id = c.id AND c.minted_from_id IS NULL;

-- One venue operation of a minted credential, recorded before the venue is called: MINT (its first key) or
-- ROTATE (a new key staged as a rotation). OPEN: the venue may be creating a key; STAGED: the new key is the
-- credential's staged version (staged_version); DONE or FAILED (reason) once settled. At most one unsettled
-- operation per credential.
CREATE TABLE IF NOT EXISTS broker_intents (
    id              uuid PRIMARY KEY,
    credential_id   uuid NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    purpose         text NOT NULL CHECK (purpose IN ('MINT', 'ROTATE')),
    automatic       boolean NOT NULL DEFAULT false,
    state           text NOT NULL CHECK (state IN ('OPEN', 'STAGED', 'DONE', 'FAILED')),
    staged_version  integer,
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS broker_intents_one_unsettled
    ON broker_intents (credential_id) WHERE state IN ('OPEN', 'STAGED');
CREATE INDEX IF NOT EXISTS broker_intents_credential ON broker_intents (credential_id, created_at);

-- A key of a minted credential the engine no longer uses but that may still work at the venue: the one a promoted
-- rotation replaced (until delete_after: the rotation grace), a rejected staged key, the keys of a revoked or
-- immediately rotated credential (delete_after: now). The key itself (the venue deletes by it; Binance lists keys
-- masked) is sealed like a secret (engine/crypto.py wrap_blob, purpose "broker-retired:<credential id>"); the
-- fingerprint (the HMAC of engine/crypto.py) finds it in a venue's listing. The row goes once the venue deleted it.
CREATE TABLE IF NOT EXISTS broker_retired_keys (
    credential_id    uuid NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    key_fingerprint  bytea NOT NULL,
    kek_version      integer NOT NULL,
    wrapped_dek      bytea NOT NULL,
    nonce            bytea NOT NULL,
    ciphertext       bytea NOT NULL,
    delete_after     timestamptz NOT NULL,
    PRIMARY KEY (credential_id, key_fingerprint)
);
CREATE INDEX IF NOT EXISTS broker_retired_keys_due ON broker_retired_keys (delete_after);
-- END broker

-- BEGIN webhooks (owned by engine/webhooks/)
-- Webhook endpoints (Standard Webhooks), per owner. event_types NULL = every type. An endpoint is disabled by
-- its owner (MANUAL), at once by a 410 answer (GONE), or after failing for days (FAILING).
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id               uuid PRIMARY KEY,
    owner_id         text NOT NULL,
    url              text NOT NULL,
    description      text,
    event_types      text[],
    enabled          boolean NOT NULL DEFAULT true,
    disabled_reason  text CHECK (disabled_reason IN ('MANUAL', 'GONE', 'FAILING')),
    failing_since    timestamptz,                 -- first failed attempt since the last success
    event_seq        bigint NOT NULL DEFAULT 0,   -- sequence of this endpoint's own events
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_reason_iff_disabled CHECK (enabled = (disabled_reason IS NULL))
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_owner ON webhook_endpoints (owner_id, created_at, id);
CREATE INDEX IF NOT EXISTS webhook_endpoints_fan_out ON webhook_endpoints (owner_id) WHERE enabled;

-- Signing secrets, encrypted like key material (Vault.wrap_blob, purpose bound to endpoint and version).
-- expires_at NULL: the current secret; a rotated-out secret keeps signing until expires_at (grace period).
CREATE TABLE IF NOT EXISTS webhook_secrets (
    endpoint_id  uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    version      integer NOT NULL CHECK (version > 0),
    kek_version  integer NOT NULL,
    wrapped_dek  bytea NOT NULL,
    nonce        bytea NOT NULL,
    ciphertext   bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    PRIMARY KEY (endpoint_id, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS webhook_secrets_one_current ON webhook_secrets (endpoint_id) WHERE expires_at IS NULL;
CREATE INDEX IF NOT EXISTS webhook_secrets_kek ON webhook_secrets (kek_version);
-- the hourly purge (purge_jobs) destroys secrets past their grace period through this
CREATE INDEX IF NOT EXISTS webhook_secrets_expiry ON webhook_secrets (expires_at) WHERE expires_at IS NOT NULL;

-- One delivery per (event, endpoint). pending: a job will attempt it; waiting: parked behind an earlier
-- undelivered event of the same credential to the same endpoint (woken when that one is delivered or dead);
-- delivered; dead: attempts exhausted or endpoint disabled (an operator can retry it).
-- tries = attempts - retry_base: the position in the retry schedule (a manual retry starts it again).
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id               uuid PRIMARY KEY,
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    owner_id         text NOT NULL,
    event_id         uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    event_type       text NOT NULL,
    credential_id    uuid,
    sequence         bigint NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'waiting', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    retry_base       integer NOT NULL DEFAULT 0 CHECK (retry_base <= attempts),
    next_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT webhook_deliveries_once UNIQUE (event_id, endpoint_id)
);
-- the ordering checks: earlier undelivered events of one credential to one endpoint
CREATE INDEX IF NOT EXISTS webhook_deliveries_stream
    ON webhook_deliveries (endpoint_id, credential_id, sequence) WHERE state IN ('pending', 'waiting');
CREATE INDEX IF NOT EXISTS webhook_deliveries_owner ON webhook_deliveries (owner_id, created_at, id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at, id);
-- the retention purge: delivered and dead deliveries in age order (pending and waiting ones are never purged)
CREATE INDEX IF NOT EXISTS webhook_deliveries_delivered ON webhook_deliveries (delivered_at) WHERE state = 'delivered';
CREATE INDEX IF NOT EXISTS webhook_deliveries_dead ON webhook_deliveries (updated_at) WHERE state = 'dead';

-- Every attempt: when, the answer (or why there was none) and how long it took. Never a body or a secret.
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL CHECK (attempt > 0),
    outcome      text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'gone', 'refused')),
    status_code  integer,
    latency_ms   double precision NOT NULL,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
-- END webhooks

-- BEGIN tenants (owned by engine/bounds/quotas.py and engine/api/limits.py)
-- Verify requests of each owner, one row per request, for the hourly quota (a sliding window: at most N in any
-- hour). Rows older than the window are deleted in small batches by later requests.
CREATE TABLE IF NOT EXISTS owner_verify_requests (
    owner_id  text NOT NULL,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS owner_verify_requests_window ON owner_verify_requests (owner_id, at);
CREATE INDEX IF NOT EXISTS owner_verify_requests_at ON owner_verify_requests (at);

-- Live API processes: each `serve` process refreshes its row every few seconds; the REST API's rate limits are
-- divided by the number of fresh rows, so N processes together allow what the settings say.
CREATE TABLE IF NOT EXISTS api_instances (
    id          text PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
-- END tenants

-- BEGIN budgets (owned by engine/bounds/budgets.py)
-- Per-IP venue budgets shared by the engine processes of one egress group (docs/venues.md §1.6, §3.6): one row
-- per (egress group, budget). Time is cut into slots of slot_seconds by the database clock (one clock for every
-- process); counts[1] is what was granted in slot newest_slot, counts[i] in slot newest_slot - i + 1. A grant is
-- made only while the slots of the window (counts[1..n]) hold at most the allowance. Bounded: one row per budget
-- and group, no history kept.
CREATE TABLE IF NOT EXISTS venue_budgets (
    egress_group  text NOT NULL,
    budget        text NOT NULL,
    newest_slot   bigint NOT NULL,
    counts        float8[] NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (egress_group, budget)
);

-- Take up to p_want of budget p_budget of group p_group, whose window is p_slots slots of p_slot_seconds
-- holding at most p_allowance: nothing unless the grant and what the caller still holds of this slot (p_have,
-- granted in slot p_have_slot) reach p_need. p_charge is spent already (what a process spent on its own while
-- the database was out of reach) and is counted first. Returns what was granted, the slot it belongs to, the
-- seconds until that slot ends (grants are spent before it does) and the total now in the window. The row
-- lock serializes concurrent takers for the length of this one call.
DROP FUNCTION IF EXISTS venue_budget_take(text, text, float8, integer, float8, float8, float8, float8);
CREATE OR REPLACE FUNCTION venue_budget_take(
    p_group text, p_budget text, p_slot_seconds float8, p_slots integer, p_allowance float8,
    p_want float8, p_need float8, p_have float8, p_have_slot bigint, p_charge float8,
    OUT granted float8, OUT slot_index bigint, OUT ends_in float8, OUT in_window float8
) AS $$
DECLARE
    v_now    float8 := extract(epoch FROM clock_timestamp());
    v_slot   bigint := floor(v_now / p_slot_seconds)::bigint;
    v_row    venue_budgets%ROWTYPE;
    v_counts float8[];
    v_shift  bigint;
BEGIN
    INSERT INTO venue_budgets (egress_group, budget, newest_slot, counts)
    VALUES (p_group, p_budget, v_slot, array_fill(0::float8, ARRAY[p_slots]))
    ON CONFLICT (egress_group, budget) DO NOTHING;
    SELECT * INTO v_row FROM venue_budgets WHERE egress_group = p_group AND budget = p_budget FOR UPDATE;
    -- a database clock that stepped back keeps counting in the newest slot (stricter, never looser)
    v_shift := greatest(v_slot - v_row.newest_slot, 0);
    v_slot := v_row.newest_slot + v_shift;
    IF v_shift >= p_slots OR cardinality(v_row.counts) <> p_slots THEN
        v_counts := array_fill(0::float8, ARRAY[p_slots]);
    ELSIF v_shift > 0 THEN
        v_counts := array_fill(0::float8, ARRAY[v_shift::integer]) || v_row.counts[1:p_slots - v_shift];
    ELSE
        v_counts := v_row.counts;
    END IF;
    v_counts[1] := v_counts[1] + greatest(p_charge, 0);
    in_window := (SELECT sum(c) FROM unnest(v_counts) AS c);
    granted := least(p_want, p_allowance - in_window);
    IF granted + (CASE WHEN p_have_slot = v_slot THEN p_have ELSE 0 END) < p_need THEN
        granted := 0;
    END IF;
    v_counts[1] := v_counts[1] + granted;
    in_window := in_window + granted;
    UPDATE venue_budgets SET newest_slot = v_slot, counts = v_counts, updated_at = clock_timestamp()
    WHERE egress_group = p_group AND budget = p_budget;
    slot_index := v_slot;
    ends_in := least(greatest((v_slot + 1) * p_slot_seconds - v_now, 0), p_slot_seconds);
END
$$ LANGUAGE plpgsql;

-- The engine processes of each egress group, for the fallback when the database is out of reach: each process
-- then spends at most 1/N of a budget, N being the live processes of its group last counted here. Each process
-- refreshes its row every few seconds; rows silent for long are deleted by the others.
CREATE TABLE IF NOT EXISTS venue_budget_processes (
    process_id    text PRIMARY KEY,
    egress_group  text NOT NULL,
    seen_at       timestamptz NOT NULL DEFAULT now()
);
-- END budgets
