"""How the engine marks the keys it creates at a venue: the key's label (note) names the credential.

``ce-``, the credential id's 32 hex digits, ``-`` and 8 random hex digits (44 characters: within OKX's and
Bybit's label limits; Binance Link takes no label, docs/venues.md §0.1). The random part makes every key's
label new: OKX refuses a label a key of the sub-account already has (59502), and a retried creation must not
collide with a key an earlier attempt made but never recorded. Reconciliation touches only keys whose label
parses here, and of those only keys of credentials this database knows: another deployment's keys, or keys
people made, are left alone.
"""

from __future__ import annotations

import re
import secrets
import uuid

PREFIX = "ce-"
_LABEL = re.compile(r"ce-([0-9a-f]{32})(?:-[0-9a-f]{1,16})?")


def label_for(credential_id: uuid.UUID) -> str:
    """A new venue label for a key minted for ``credential_id`` (a fresh random part each call)."""
    return f"{PREFIX}{credential_id.hex}-{secrets.token_hex(4)}"


def credential_of(label: str) -> uuid.UUID | None:
    """The credential a venue label names, or None when the engine did not write it."""
    match = _LABEL.fullmatch(label.strip())
    return uuid.UUID(hex=match.group(1)) if match else None
