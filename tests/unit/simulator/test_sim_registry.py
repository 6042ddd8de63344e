"""The key registry: key material in each venue's format, secrets kept out of reprs, accounts and changes."""

from __future__ import annotations

import base64
import re
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from venues.base import ApiKeys, Venue
from venues.simulator import Simulator


def test_binance_material() -> None:
    """Binance keys and secrets are 64 alphanumerics."""
    key = Simulator().add_key(Venue.BINANCE)
    assert re.fullmatch(r"[A-Za-z0-9]{64}", key.api_key)
    assert re.fullmatch(r"[A-Za-z0-9]{64}", key.api_secret)
    assert key.api_passphrase is None
    assert key.uid.isdigit()


def test_okx_material() -> None:
    """OKX: UUID key, 32 upper-hex secret, a passphrase, a numeric uid."""
    key = Simulator().add_key(Venue.OKX)
    uuid.UUID(key.api_key)
    assert re.fullmatch(r"[0-9A-F]{32}", key.api_secret)
    assert key.api_passphrase is not None
    assert 8 <= len(key.api_passphrase) <= 32
    assert key.uid.isdigit()


def test_bybit_material() -> None:
    """Bybit: 18-character key, 36-character secret."""
    key = Simulator().add_key(Venue.BYBIT)
    assert len(key.api_key) == 18
    assert len(key.api_secret) == 36


def test_coinbase_cdp_material() -> None:
    """CDP ES256 keys: organizations/{uuid}/apiKeys/{uuid} + a SEC1 EC P-256 PEM."""
    key = Simulator().add_key(Venue.COINBASE)
    match = re.fullmatch(r"organizations/([0-9a-f-]{36})/apiKeys/([0-9a-f-]{36})", key.api_key)
    assert match
    assert key.api_secret.startswith("-----BEGIN EC PRIVATE KEY-----\n")
    private = serialization.load_pem_private_key(key.api_secret.encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp256r1"
    assert key.kind == "cdp"


def test_coinbase_ed25519_and_exchange_material() -> None:
    """CDP Ed25519: UUID id + base64 of 64 bytes; Exchange: 32 hex + base64 64 bytes + passphrase."""
    sim = Simulator()
    ed = sim.add_key(Venue.COINBASE, kind="cdp_ed25519")
    uuid.UUID(ed.api_key)
    assert len(base64.b64decode(ed.api_secret)) == 64
    assert ed.api_passphrase is None
    exchange = sim.add_key(Venue.COINBASE, kind="exchange")
    assert re.fullmatch(r"[0-9a-f]{32}", exchange.api_key)
    assert len(base64.b64decode(exchange.api_secret)) == 64
    assert exchange.api_passphrase


@pytest.mark.parametrize("kind", ["spot", "futures"])
def test_kraken_material(kind: str) -> None:
    """Kraken keys: 56-character base64 key, base64 of a 64-byte secret."""
    key = Simulator().add_key(Venue.KRAKEN, kind=kind)
    assert len(key.api_key) == 56
    assert len(base64.b64decode(key.api_secret)) == 64
    assert key.identities == (kind,)


def test_same_uid_means_same_account() -> None:
    """Keys added with one uid share it (and CDP keys share the organization); others get their own."""
    sim = Simulator()
    first = sim.add_key(Venue.COINBASE)
    second = sim.add_key(Venue.COINBASE, uid=first.uid)
    other = sim.add_key(Venue.COINBASE)
    assert second.uid == first.uid != other.uid
    assert first.api_key.split("/")[1] == second.api_key.split("/")[1] != other.api_key.split("/")[1]
    assert first.api_key != second.api_key


def test_repr_hides_secret_and_passphrase() -> None:
    """TestKey's repr and str show neither the secret, the passphrase nor the whole API key."""
    key = Simulator().add_key(Venue.OKX)
    for text in (repr(key), str(key), repr(key.api_keys)):
        assert key.api_secret not in text
        assert str(key.api_passphrase) not in text
        assert key.api_key not in text


def test_api_keys_carries_the_material() -> None:
    """.api_keys is the ApiKeys a probe gets."""
    key = Simulator().add_key(Venue.COINBASE, kind="exchange")
    assert key.api_keys == ApiKeys(key.api_key, key.api_secret, key.api_passphrase)


def test_default_identities_are_the_venue_set() -> None:
    """identities=None gives the venue's whole (sorted) identity set."""
    sim = Simulator()
    assert sim.add_key(Venue.BINANCE).identities == ("futures", "margin", "spot")
    assert sim.add_key(Venue.OKX).identities == ("funding", "trading")
    assert sim.add_key(Venue.BYBIT).identities == ("contract", "spot", "unified")
    assert sim.add_key(Venue.COINBASE).identities == ("default",)


@pytest.mark.parametrize(
    ("venue", "kwargs"),
    [
        (Venue.BINANCE, {"identities": ["moon"]}),
        (Venue.BINANCE, {"kind": "cdp"}),
        (Venue.COINBASE, {"kind": "spot"}),
        (Venue.OKX, {"ip_allowlist": ["not-an-ip"]}),
        (Venue.OKX, {"ip_allowlist": "10.0.0.1"}),
        (Venue.BYBIT, {"environment": "staging"}),
        (Venue.KRAKEN, {"kind": "futures", "identities": ["spot"]}),
    ],
)
def test_invalid_registrations_are_refused(venue: Venue, kwargs: dict[str, object]) -> None:
    """add_key refuses unknown identities, kinds, environments and malformed allow-lists."""
    with pytest.raises(ValueError):  # noqa: PT011 - the message is what users read
        Simulator().add_key(venue, **kwargs)  # type: ignore[arg-type]


def test_update_and_remove() -> None:
    """update_key changes permissions and returns the new key; fixed fields and unknown keys are refused."""
    sim = Simulator()
    key = sim.add_key(Venue.BYBIT)
    updated = sim.update_key(key.api_key, withdraw=True, ip_allowlist=["10.0.0.0/8"])
    assert (updated.withdraw, updated.ip_allowlist) == (True, ("10.0.0.0/8",))
    assert updated.api_secret == key.api_secret
    with pytest.raises(ValueError, match="api_secret"):
        sim.update_key(key.api_key, api_secret="x")
    sim.remove_key(key.api_key)
    assert sim.list_keys() == []
    with pytest.raises(KeyError):
        sim.remove_key(key.api_key)
    with pytest.raises(KeyError):
        sim.update_key(key.api_key, read=False)


def test_seed_demo_accounts() -> None:
    """Demo accounts: per venue a good key, a second key of the same account and a withdraw key."""
    sim = Simulator()
    keys = sim.seed_demo_accounts()
    for venue in Venue:
        good, second, withdraw = [k for k in keys if k.venue is venue][:3]
        assert (good.read, good.trade, good.withdraw) == (True, True, False)
        assert second.uid == good.uid
        assert second.api_key != good.api_key
        assert withdraw.withdraw is True
    assert {k.kind for k in keys if k.venue is Venue.COINBASE} == {"cdp", "cdp_ed25519", "exchange"}
    assert {k.kind for k in keys if k.venue is Venue.KRAKEN} == {"spot", "futures"}


def test_venue_names_are_accepted_in_any_case() -> None:
    """The Python API takes a Venue or its name, in any case."""
    sim = Simulator()
    assert sim.add_key("okx").venue is Venue.OKX
    sim.set_clock_offset("binance", 5)
    assert sim.stats("Kraken").venue is Venue.KRAKEN
