-- credential-engine: the whole PostgreSQL schema. Idempotent: applied at every engine start (under an advisory
-- lock), so every statement is CREATE ... IF NOT EXISTS or otherwise safe to repeat.

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
    environment      text,
    failure_reason   text,
    failure_message  text,
    warnings         text[] NOT NULL DEFAULT '{}',
    event_seq        bigint NOT NULL DEFAULT 0,  -- last per-credential event sequence handed out
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    verified_at      timestamptz,
    revoked_at       timestamptz,
    CONSTRAINT revoked_has_no_version CHECK ((status = 'REVOKED') = (secret_version = 0))
);
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

-- Seed 05's trading accounts. An ACTIVE account always points at a non-revoked credential (the revoke
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

CREATE OR REPLACE FUNCTION trading_account_needs_live_credential() RETURNS trigger AS $$
BEGIN
    IF NEW.status = 'ACTIVE' AND EXISTS (
        SELECT 1 FROM credentials c WHERE c.id = NEW.credential_id AND c.status = 'REVOKED'
    ) THEN
        RAISE EXCEPTION 'an ACTIVE trading account cannot point at a REVOKED credential'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS trading_accounts_live_credential ON trading_accounts;
CREATE TRIGGER trading_accounts_live_credential
    BEFORE INSERT OR UPDATE ON trading_accounts
    FOR EACH ROW EXECUTE FUNCTION trading_account_needs_live_credential();

-- The transactional outbox: one row per lifecycle event, written in the transaction of the change.
-- position is global and increasing in commit order per writer; listeners read by position.
CREATE TABLE IF NOT EXISTS events (
    position       bigserial PRIMARY KEY,
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

-- BEGIN queue (owned by engine/queue.py)
-- END queue
