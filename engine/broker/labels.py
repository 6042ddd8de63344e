"""How the engine marks the keys it creates at a venue: the key's label (note) names the credential.

``ce-`` and the credential id's 32 hex digits (35 characters: within Binance's, OKX's and Bybit's label limits,
docs/venues.md). Reconciliation touches only keys whose label parses here, and of those only keys of
credentials this database knows: another deployment's keys, or keys people made, are left alone.
"""

from __future__ import annotations

import re
import uuid

PREFIX = "ce-"
_LABEL = re.compile(r"ce-([0-9a-f]{32})")


def label_for(credential_id: uuid.UUID) -> str:
    """The venue label of the keys minted for ``credential_id``."""
    return PREFIX + credential_id.hex


def credential_of(label: str) -> uuid.UUID | None:
    """The credential a venue label names, or None when the engine did not write it."""
    match = _LABEL.fullmatch(label.strip())
    return uuid.UUID(hex=match.group(1)) if match else None
