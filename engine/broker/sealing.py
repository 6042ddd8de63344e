"""The purpose a retired broker key is sealed under (``Vault.wrap_blob``): it binds the ciphertext to its
credential, so a row copied to another credential does not open. Shared by the retirement and the master-key
rewrap (engine/keys/rewrap.py), which imports nothing else of the broker."""

from __future__ import annotations

import uuid


def retired_purpose(credential_id: uuid.UUID) -> str:
    return f"broker-retired:{credential_id}"
