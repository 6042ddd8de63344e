"""Webhook signing secrets at rest: sealed with the vault, bound to their endpoint and version.

Secrets are ``whsec_`` strings (:func:`engine.webhooks.signing.generate_secret`) whose key is sealed with
``Vault.wrap_blob`` under the purpose ``webhook-secret:<endpoint>:<version>``, so a ciphertext copied to another
row does not open. The plaintext is returned once, when the endpoint is added and when its secret is rotated,
and otherwise exists only in memory while an attempt is signed.
"""

from __future__ import annotations

import uuid

from engine import crypto
from engine import db as dbmod
from engine.webhooks import signing

SECRET_PURPOSE = "webhook-secret"  # noqa: S105 - a vault purpose label, not a secret


def secret_purpose(endpoint_id: uuid.UUID, version: int) -> str:
    """The vault purpose binding a sealed secret to its endpoint and version."""
    return f"{SECRET_PURPOSE}:{endpoint_id}:{version}"


def seal(vault: crypto.Vault, endpoint_id: uuid.UUID, version: int, secret: str) -> crypto.Sealed:
    """The signing key of ``secret`` (a ``whsec_`` string), sealed for this endpoint and version."""
    return vault.wrap_blob(signing.secret_key(secret), purpose=secret_purpose(endpoint_id, version))


def open_all(vault: crypto.Vault, endpoint_id: uuid.UUID, row: dbmod.Record) -> list[bytes]:
    """The active HMAC keys of an endpoint from ``webhook_delivery_for_attempt``'s arrays, newest first."""
    keys = []
    for version, kek, wrapped, nonce, ciphertext in zip(
        row["secret_versions"] or (),
        row["secret_kek_versions"] or (),
        row["secret_wrapped_deks"] or (),
        row["secret_nonces"] or (),
        row["secret_ciphertexts"] or (),
        strict=True,
    ):
        sealed = crypto.Sealed(
            kek_version=int(kek), wrapped_dek=bytes(wrapped), nonce=bytes(nonce), ciphertext=bytes(ciphertext)
        )
        keys.append(vault.unwrap_blob(sealed, purpose=secret_purpose(endpoint_id, int(version))))
    return keys
