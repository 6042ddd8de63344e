"""Leak canary: one run through every path with planted secrets, then every output is scanned for them.

Two halves share one database and one log capture:

* the library, the REST API and webhooks with FakeVenue: every permanent failure reason, every transient one,
  every policy rule, staged and immediate rotations (promoted, refused, mismatched), revoke with its cascade,
  revealed keys, refused requests of every kind (duplicate, bad format, missing fields, oversized, another
  owner's id, malformed JSON), webhook deliveries (some answered 500 first);
* the real venue modules against the exchange simulator over loopback HTTP, run by worker *processes*: good
  and bad keys of every kind, IP allow-lists, expiry, wrong environment, a skewed clock, injected faults
  (timeouts, 5xx, malformed bodies, ...), and a worker SIGKILLed while probing.

Then the logs (this process's and the workers' stderr, crashed or not), the events (heard and stored), webhook
requests (bodies and headers), API responses, exception texts and every row of every table must hold none of
the secrets: plain, hex, base64 (standard or URL-safe), JSON-escaped, or any line of a PEM.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from reliability_support import Canaries, EventLog, WebhookReceiver, WorkerProcess, database_text, fetch

from engine import CredentialEngine, Venue, VerificationPolicy, errors
from engine import logs as logsmod
from engine.api import ApiConfig, ApiServer, auth
from engine.testing import FakeVenue, settle
from venues.base import Outcome
from venues.simulator import Faults, Simulator, TestKey

OWNER = "owner-canary"
PERMANENT = [o for o in Outcome if o is not Outcome.OK and not o.transient]
TRANSIENT = [o for o in Outcome if o.transient]
DAY_MS = 86_400_000


def canary(purpose: str) -> str:
    return f"CANARY-{purpose}-{secrets.token_hex(12)}"


class Run:
    """What the run planted and what it collected."""

    def __init__(self) -> None:
        self.canaries = Canaries()
        self.texts: dict[str, list[str]] = {"exceptions": [], "api": [], "reprs": []}

    def secret(self, purpose: str) -> str:
        value = canary(purpose)
        self.canaries.add(value)
        return value

    def failed(self, where: str, exc: BaseException) -> None:
        self.texts["exceptions"].append(f"{where}: {type(exc).__name__}: {exc} {exc.args!r} {exc!r}")


async def library_half(eng: CredentialEngine, fake: FakeVenue, run: Run) -> None:
    """FakeVenue: every failure reason, policy rule, rotation outcome, revoke, reveal and refused call."""
    keys: dict[str, str] = {}  # API key -> its (canary) secret
    for outcome in PERMANENT:
        name = f"key-{outcome.value.lower()}"
        keys[name] = run.secret(outcome.value)
        fake.fail_key(name, outcome, api_secret=keys[name])
    for transient in TRANSIENT:
        name = f"key-{transient.value.lower()}"
        keys[name] = run.secret(transient.value)
        fake.flaky_key(
            name, keys[name], transient=2, outcome=transient, retry_after=0.01, account_id="uid-" + name
        )
    now = int(time.time() * 1000)
    policy_keys = {
        "key-withdraw": {"withdraw": True},
        "key-no-trade": {"trade": False},
        "key-no-ip-list": {"ip_allowlist": ()},
        "key-expired": {"expires_at_ms": now - DAY_MS},
        "key-expiring": {"expires_at_ms": now + 2 * DAY_MS},
        "key-good": {"identities": ("spot", "margin")},
    }
    for name, options in policy_keys.items():
        keys[name] = run.secret(name)
        fake.add_key(name, keys[name], account_id="uid-" + name, **options)  # type: ignore[arg-type]
    creds = {}
    for name, secret in keys.items():
        cred = await eng.create_credential(
            OWNER, venue=Venue.BINANCE, api_key=name, api_secret=secret, nickname=name
        )
        creds[name] = cred.credential_id
        run.texts["reprs"] += [repr(cred), str(cred.public_dict())]
    passphrase = run.secret("passphrase")
    okx_secret = run.secret("okx")
    fake.add_key("key-okx", okx_secret, passphrase=passphrase, account_id="uid-okx")
    wrong_pass = run.secret("wrong-passphrase")
    okx = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="key-okx", api_secret=okx_secret, api_passphrase=passphrase
    )
    await eng.create_credential(
        OWNER, venue=Venue.BYBIT, api_key="key-okx", api_secret=okx_secret, api_passphrase=wrong_pass
    )
    await settle(eng)

    # rotations: promoted, refused (other account, bad secret), immediate (promoted, mismatched)
    good = creds["key-good"]
    for name, account in (
        ("rot-same", "uid-key-good"),
        ("rot-other", "uid-other"),
        ("rot-imm", "uid-key-good"),
    ):
        fake.add_key(name, run.secret(name), account_id=account)
    bad_new = run.secret("rot-bad")
    fake.fail_key("rot-bad", Outcome.INVALID_SECRET, api_secret=bad_new)
    await eng.rotate_credential(OWNER, good, api_key="rot-other", api_secret=fake.keys["rot-other"].secret)
    await settle(eng)
    await eng.rotate_credential(OWNER, good, api_key="rot-bad", api_secret=bad_new)
    await settle(eng)
    await eng.rotate_credential(OWNER, good, api_key="rot-same", api_secret=fake.keys["rot-same"].secret)
    await settle(eng)
    await eng.rotate_credential(
        OWNER,
        creds["key-expiring"],
        api_key="rot-imm",
        api_secret=fake.keys["rot-imm"].secret,
        immediate=True,
    )
    fake.add_key("rot-mismatch", run.secret("rot-mismatch"), account_id="uid-elsewhere")
    await eng.rotate_credential(
        OWNER,
        okx.credential_id,
        api_key="rot-mismatch",
        api_secret=fake.keys["rot-mismatch"].secret,
        api_passphrase=passphrase,
        immediate=True,
    )
    await settle(eng)
    revealed = await eng.reveal_keys(OWNER, good, purpose="canary order signing")
    assert revealed.api_secret == fake.keys["rot-same"].secret  # the reveal works: the repr must not show it
    run.texts["reprs"] += [repr(revealed), str(revealed), f"{revealed!s}", format(revealed)]
    await eng.connect_trading_account(OWNER, credential_id=good, account_type="spot")
    await eng.revoke_credential(OWNER, good)
    await settle(eng)

    # refused calls: each error's text is scanned
    dup_secret = fake.keys["key-no-trade"].secret
    binance = Venue.BINANCE
    refused: dict[str, Callable[[], Awaitable[Any]]] = {
        "duplicate": lambda: eng.create_credential(
            OWNER, venue=binance, api_key="key-no-trade", api_secret=dup_secret
        ),
        "bad format": lambda: eng.create_credential(
            OWNER,
            venue=binance,
            api_key="malformed-" + run.secret("format"),
            api_secret=run.secret("format2"),
        ),
        "missing passphrase": lambda: eng.create_credential(
            OWNER, venue=Venue.OKX, api_key="k", api_secret=run.secret("nopass")
        ),
        "oversized secret": lambda: eng.create_credential(
            OWNER, venue=binance, api_key="key-big", api_secret=run.secret("big") * 500
        ),
        "control characters": lambda: eng.create_credential(
            OWNER, venue=binance, api_key="key-ctl", api_secret=run.secret("ctl") + "\x00\x07"
        ),
        "another owner": lambda: eng.rotate_credential(
            "someone-else", creds["key-no-trade"], api_key="x", api_secret=run.secret("other")
        ),
        "revoked": lambda: eng.rotate_credential(OWNER, good, api_key="y", api_secret=run.secret("revoked")),
        "reveal revoked": lambda: eng.reveal_keys(OWNER, good),
        "connect with failing keys": lambda: eng.connect_trading_account(
            OWNER,
            venue=Venue.BINANCE,
            api_key="key-invalid_secret",
            api_secret=fake.keys["key-invalid_secret"].secret,
            wait_timeout=5,
        ),
    }
    for where, call in refused.items():
        with pytest.raises(errors.CredentialEngineError) as info:
            await call()
        run.failed(where, info.value)


async def api_half(eng: CredentialEngine, fake: FakeVenue, run: Run) -> None:
    """The REST API: successes and every kind of refusal, with canary secrets in the requests."""
    jwt_secret = auth.generate_secret()
    server = ApiServer(eng, ApiConfig(jwt_secret=jwt_secret, port=0, connect_wait_timeout=5.0))
    await server.start()
    api_secret = run.secret("api")
    fake.add_key("api-key-good", api_secret, account_id="uid-api")
    new_secret = run.secret("api-rotated")
    fake.add_key("api-key-new", new_secret, account_id="uid-api")
    bad_secret = run.secret("api-bad")
    fake.fail_key("api-key-bad", Outcome.INVALID_SECRET, api_secret=bad_secret)
    token = auth.mint_token(jwt_secret, OWNER)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

            async def post(path: str, body: Any, raw: str | None = None) -> dict[str, Any]:
                data = raw if raw is not None else json.dumps(body)
                async with http.post(
                    server.url + path, data=data, headers={"Content-Type": "application/json"}
                ) as r:
                    text = await r.text()
                    run.texts["api"].append(f"{r.status} {dict(r.headers)} {text}")
                    return json.loads(text) if text.startswith("{") else {}

            created = await post(
                "/api/v3/credential/create",
                {"venue": "BINANCE", "apiKey": "api-key-good", "apiSecret": api_secret},
            )
            cid = created["data"]["credentialId"]
            await settle(eng)
            for body in (
                {"venue": "BINANCE", "apiKey": "api-key-good", "apiSecret": api_secret},  # 409 duplicate
                {"venue": "BINANCE", "apiKey": "malformed-x", "apiSecret": run.secret("api-format")},  # 422
                {
                    "venue": "OKX",
                    "apiKey": "k",
                    "apiSecret": run.secret("api-nopass"),
                },  # 400 missing passphrase
                {"venue": "NOWHERE", "apiKey": "k", "apiSecret": run.secret("api-venue")},  # 400 venue
                {"venue": "BINANCE", "apiKey": "k", "apiSecret": run.secret("api-big") * 400},  # 400 too long
            ):
                await post("/api/v3/credential/create", body)
            await post(
                "/api/v3/credential/create",
                None,
                raw='{"venue": "BINANCE", "apiSecret": "' + run.secret("api-json") + '"',
            )
            await post("/api/v3/credential/create", None, raw="apiSecret=" + run.secret("api-form"))
            await post(
                "/api/v3/credential/rotate",
                {"credentialId": cid, "apiKey": "api-key-new", "apiSecret": new_secret},
            )
            await post(
                "/api/v3/credential/rotate",
                {"credentialId": cid, "apiKey": "api-key-bad", "apiSecret": bad_secret},
            )
            await settle(eng)
            await post(
                "/api/v3/tradingAccount/connect",
                {"venue": "BINANCE", "apiKey": "api-key-bad", "apiSecret": bad_secret},
            )
            await post(
                "/api/v3/credential/rotate",
                {"credentialId": "not-a-uuid", "apiKey": "k", "apiSecret": run.secret("api-id")},
            )
            for path in (
                "/api/v3/credential/list",
                f"/api/v3/credential/get?credentialId={cid}",
                "/api/v3/webhook/list",
            ):
                async with http.get(server.url + path) as r:
                    run.texts["api"].append(f"{r.status} {await r.text()}")
            await post("/api/v3/credential/revoke", {"credentialId": cid})
        anonymous_body = {"venue": "BINANCE", "apiKey": "k", "apiSecret": run.secret("api-anon")}
        async with (
            aiohttp.ClientSession() as anonymous,
            anonymous.post(server.url + "/api/v3/credential/create", json=anonymous_body) as r,
        ):
            run.texts["api"].append(f"{r.status} {await r.text()}")
    finally:
        await server.close()


async def real_probes_half(
    eng: CredentialEngine, sim: Simulator, run: Run, env: dict[str, str], folder: Path
) -> list[Path]:
    """The venue modules against the simulator, run by worker processes; one is SIGKILLed mid-probe."""
    kinds = [
        (Venue.BINANCE, None),
        (Venue.OKX, None),
        (Venue.BYBIT, None),
        (Venue.COINBASE, "cdp"),
        (Venue.COINBASE, "cdp_ed25519"),
        (Venue.COINBASE, "exchange"),
        (Venue.KRAKEN, "spot"),
        (Venue.KRAKEN, "futures"),
    ]
    created: list[tuple[TestKey, Any]] = []

    async def create(key: TestKey, passphrase: str | None = None) -> Any:
        passphrase = passphrase or key.api_passphrase
        for value in (key.api_key, key.api_secret, key.api_passphrase, passphrase):
            run.canaries.add(value)
        cred = await eng.create_credential(
            OWNER + "-real",
            venue=key.venue,
            api_key=key.api_key,
            api_secret=key.api_secret,
            api_passphrase=passphrase,
        )
        created.append((key, cred))
        return cred

    for venue, kind in kinds:
        good = sim.add_key(venue, kind=kind)
        await create(good)
        await create(sim.add_key(venue, kind=kind, withdraw=True))
        await create(sim.add_key(venue, kind=kind, ip_allowlist=("10.9.8.7",)))
        await create(sim.add_key(venue, kind=kind, expires_at_ms=int(time.time() * 1000) - DAY_MS))
        await create(sim.add_key(venue, kind=kind, environment="testnet"))
        wrong = sim.add_key(venue, kind=kind)
        sim.remove_key(wrong.api_key)
        await create(wrong)  # the venue does not know it
        if good.api_passphrase is not None:
            await create(sim.add_key(venue, kind=kind), passphrase=run.secret("wrong-pass"))
        rotation = sim.add_key(venue, kind=kind, uid=good.uid)
        run.canaries.add(rotation.api_secret)
        run.canaries.add(rotation.api_passphrase)
    sim.set_clock_offset(Venue.OKX, 90_000)
    sim.set_clock_offset(Venue.BYBIT, -90_000)
    for venue in Venue:
        sim.set_faults(venue, Faults(latency=0.2, error_rate=0.4, retry_after=0.2, hang=3.0))
    doomed = WorkerProcess(env, folder / "doomed.stderr")
    await doomed.start()
    deadline = time.monotonic() + 20
    while not await fetch(
        env["DATABASE_URL"],
        "SELECT 1 FROM queue_jobs WHERE state = 'running' AND worker_id = $1",
        doomed.worker_id,
    ):
        assert time.monotonic() < deadline, "the doomed worker never took a job"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # mid-probe
    await doomed.kill()
    sim.clear_faults()
    sim.set_clock_offset(Venue.OKX, 0)
    survivor = WorkerProcess(env, folder / "survivor.stderr")
    await survivor.start()
    try:
        deadline = time.monotonic() + 90
        while await fetch(
            env["DATABASE_URL"],
            "SELECT 1 FROM credentials WHERE status = 'PENDING' AND owner_id = $1",
            OWNER + "-real",
        ):
            assert time.monotonic() < deadline, "real probes did not finish"
            await asyncio.sleep(0.2)
    finally:
        assert await survivor.stop() == 0
    return [doomed.stderr_path, survivor.stderr_path]


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The engine's redacted JSON logs at DEBUG into a buffer; structlog and the root logger restored after."""
    out = io.StringIO()
    logsmod.configure_logging("DEBUG", json=True, stream=out)
    root = logging.getLogger()
    level = root.level
    yield out
    for handler in [h for h in root.handlers if getattr(h, "stream", None) is out]:
        root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.slow
async def test_no_secret_leaks_through_any_path(
    make_engine: Any,
    fake: FakeVenue,
    database_url: str,
    master_keys: str,
    tmp_path: Path,
    captured_logs: io.StringIO,
    report: Any,
) -> None:
    """Planted secrets appear in no log, event, webhook, API answer, exception or database row, crashes included."""
    run = Run()
    log = EventLog()
    receiver = WebhookReceiver(status=lambda path, n: 500 if path == "/flaky" and n % 3 else 200)
    await receiver.start()
    try:
        eng: CredentialEngine = await make_engine(
            workers=4,
            policy=VerificationPolicy(require_trade=True, require_ip_allowlist=True),
            webhook_retry_schedule=(0.0, 0.01, 0.02),
        )
        eng.subscribe(log)
        hooks = [await eng.add_webhook_endpoint(OWNER, receiver.url + path) for path in ("/hooks", "/flaky")]
        for hook in hooks:
            run.canaries.add(hook.secret)
        await library_half(eng, fake, run)
        await api_half(eng, fake, run)
        run.canaries.add(await eng.rotate_webhook_secret(OWNER, hooks[0].endpoint_id))
        await settle(eng)
        await eng.close()  # its FakeVenue must not take the real half's jobs
        async with Simulator(seed=9, enforce_rate_limits=False) as sim:
            real: CredentialEngine = await make_engine(
                probes={}, venue_urls=sim.urls, venue_rate_limits=False
            )
            real.subscribe(log)
            env = {
                "DATABASE_URL": database_url,
                "ENGINE_MASTER_KEYS": master_keys,
                "ENGINE_DATA_DIR": str(tmp_path),
                "ENGINE_VENUE_URLS": ",".join(f"{v.value}={u}" for v, u in sim.urls.items()),
                "ENGINE_WORKERS": "8",
                "ENGINE_LEASE_SECONDS": "2",
                "ENGINE_LOG_LEVEL": "DEBUG",
                "RELIABILITY_OVERRIDES": '{"poll_interval": 0.2, "backoff_base": 0.05, "backoff_max": 0.3, '
                '"venue_rate_limits": false, "probe_timeout": 1.0}',
            }
            stderr_files = await real_probes_half(real, sim, run, env, tmp_path)
            await real.bus.drain()
    finally:
        await receiver.close()

    outputs = {
        "logs": captured_logs.getvalue(),
        "worker stderr (killed, then graceful)": "\n".join(p.read_text() for p in stderr_files),
        "events heard": "\n".join(json.dumps(e.payload()) for e in log.events),
        "webhook requests": receiver.text(),
        "api responses": "\n".join(run.texts["api"]),
        "exceptions": "\n".join(run.texts["exceptions"]),
        "reprs": "\n".join(run.texts["reprs"]),
        "database": await database_text(database_url),
    }
    assert [name for name, text in outputs.items() if not text] == []  # each output was exercised
    assert len(receiver.delivered_ids()) > 10 and any(r[3] == 500 for r in receiver.requests)
    leaks = {name: run.canaries.find(text) for name, text in outputs.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    reasons = {
        r["failure_reason"] for r in await fetch(database_url, "SELECT failure_reason FROM credentials")
    }
    expected = {o.value for o in PERMANENT} | {"POLICY_WITHDRAW_ENABLED", "POLICY_TRADE_REQUIRED"}
    expected |= {"POLICY_IP_ALLOWLIST_REQUIRED", "ACCOUNT_MISMATCH"}
    assert expected <= reasons, expected - reasons
    report(
        "leak canary",
        canaries=len(run.canaries),
        outputs_scanned=len(outputs),
        characters_scanned=sum(len(t) for t in outputs.values()),
        failure_reasons=len(reasons - {None}),
        leaks=0,
    )
