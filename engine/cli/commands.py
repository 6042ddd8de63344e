"""The command line's commands. Each is ``async def name(args) -> int`` (the exit status).

Lifecycle commands use the library directly (``EngineConfig.from_env()``: the same database as the
service), as the owner named by ``--owner``. They run no workers unless told to wait (``--wait``): then
this process works the queue too until the outcome is known, so it works with or without a running service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine import environment, errors
from engine.api import ApiConfig, ApiServer, auth
from engine.api.metrics import MetricsServer
from engine.cli import output as out
from engine.cli import sandbox
from engine.config import EngineConfig
from engine.engine import CredentialEngine
from engine.environment import settings_view
from engine.models import Credential, CredentialStatus
from venues.base import Venue

SECRET_ENV = "ENGINE_CLI_API_SECRET"  # noqa: S105 - the variable's name, not a secret
PASSPHRASE_ENV = "ENGINE_CLI_API_PASSPHRASE"  # noqa: S105 - a name
WAIT_POLL = 0.2  # seconds between looks at a credential being waited for
PAGE = 500  # credentials per page when a command walks all of them
BULK = 20  # above this many credentials to watch, read them page by page instead of one by one


# ---- plumbing ------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened(workers: int = 0) -> AsyncIterator[CredentialEngine]:
    async with CredentialEngine(EngineConfig.from_env(workers=workers)) as eng:
        yield eng


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(signum, stop.set)
    return stop


def _read_secret(path: str | None, env: str, field: str, flag: str, *, required: bool) -> str | None:
    """A secret from a file (``-`` = stdin), an environment variable, or a prompt; never from argv."""
    if path is not None:
        if path == "-":
            return sys.stdin.read().strip("\n") or None
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip("\n") or None
    if os.environ.get(env):
        return os.environ[env]
    if required and sys.stdin.isatty():
        return getpass.getpass(f"{field}: ") or None
    if required:
        raise errors.InvalidRequest(
            field, f"give it with {flag} FILE ('-' reads stdin) or the {env} variable"
        )
    return None


def _keys(args: argparse.Namespace, venue: str | None) -> tuple[str | None, str | None]:
    secret = _read_secret(args.api_secret_file, SECRET_ENV, "apiSecret", "--api-secret-file", required=True)
    passphrase = _read_secret(
        args.api_passphrase_file, PASSPHRASE_ENV, "apiPassphrase", "--api-passphrase-file", required=False
    )
    ask = args.ask_passphrase or (venue is not None and venue.upper() == Venue.OKX.value)
    if passphrase is None and ask and sys.stdin.isatty():
        passphrase = getpass.getpass("apiPassphrase: ") or None
    return secret, passphrase


def _show_credential(args: argparse.Namespace, cred: Credential) -> None:
    if args.json:
        out.dump_json(cred.public_dict())
    else:
        print(out.fields(cred.public_dict(), out.CREDENTIAL_FIELDS))


def _snapshot(cred: Credential) -> tuple[Any, ...]:
    return (cred.status, cred.verified_at_ms, cred.updated_at_ms, cred.secret_version, cred.pending_rotation)


async def _wait(
    eng: CredentialEngine,
    owner: str,
    before: dict[uuid.UUID, tuple[Any, ...]],
    settled: Callable[[Credential, tuple[Any, ...]], bool],
    seconds: float,
    label: str,
) -> dict[uuid.UUID, Credential]:
    """Poll (woken by events) until every credential of ``before`` is ``settled``, with a progress bar."""
    changed = asyncio.Event()

    async def poke(_event: Any) -> None:
        changed.set()

    unsubscribe = eng.subscribe(poke)
    bar = out.Progress(label, len(before)) if len(before) > 1 else None
    done: dict[uuid.UUID, Credential] = {}
    deadline = time.monotonic() + seconds
    try:
        while True:
            for cred in await _current(eng, owner, [cid for cid in before if cid not in done]):
                if settled(cred, before[cred.credential_id]) or cred.status is CredentialStatus.REVOKED:
                    done[cred.credential_id] = cred
            if bar is not None:
                bar.update(len(done))
            if len(done) == len(before):
                return done
            if time.monotonic() >= deadline:
                raise errors.WaitTimeout(
                    f"{len(before) - len(done)} credential(s) still undecided after {seconds:g}s "
                    "(is a worker running? `credential-engine worker`)"
                )
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), WAIT_POLL)
    finally:
        unsubscribe()
        if bar is not None:
            bar.close()


async def _current(eng: CredentialEngine, owner: str, ids: list[uuid.UUID]) -> list[Credential]:
    """These credentials as they are now: one by one for a few, page by page for many."""
    if len(ids) <= BULK:
        return [await eng.get_credential(owner, cid) for cid in ids]
    wanted = set(ids)
    return [c for c in await _every(eng, owner, None) if c.credential_id in wanted]


def _decided(cred: Credential, snap: tuple[Any, ...]) -> bool:
    """A verification finished: the status, or when the keys were last checked, moved."""
    return cred.status is not CredentialStatus.PENDING and _snapshot(cred)[:3] != snap[:3]


def _rotation_done(cred: Credential, snap: tuple[Any, ...]) -> bool:
    return cred.pending_rotation is None and cred.status is not CredentialStatus.PENDING


def _failed(creds: list[Credential]) -> int:
    return 1 if any(c.status is CredentialStatus.FAILED for c in creds) else 0


# ---- service -------------------------------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> int:
    """API + workers (``--sandbox``: with the exchange simulator and test accounts)."""
    stop = _stop_event()
    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    config = EngineConfig.from_env(**overrides)
    if args.sandbox:
        async with (
            sandbox.running(config, host=_host(args), port=_port(args, 8080)) as live,
            _metrics_listener(live.engine, args) as metrics_url,
        ):
            print(sandbox.banner(live), flush=True)
            if metrics_url:
                print(f"metrics on {metrics_url}", flush=True)
            await stop.wait()
        return 0
    api_overrides: dict[str, Any] = {}
    if args.host:
        api_overrides["host"] = args.host
    if args.port is not None:
        api_overrides["port"] = args.port
    api_config = ApiConfig.from_env(**api_overrides)
    async with CredentialEngine(config) as eng, _metrics_listener(eng, args) as metrics_url:
        server = ApiServer(eng, api_config)
        await server.start()
        shown = f"; metrics on {metrics_url}" if metrics_url else ""
        print(f"credential-engine listening on {server.url} (workers: {config.workers}){shown}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.close()
    return 0


@contextlib.asynccontextmanager
async def _metrics_listener(eng: CredentialEngine, args: argparse.Namespace) -> AsyncIterator[str | None]:
    """``--metrics-port``: a listener answering /metrics while the command runs; yields its URL (or None)."""
    if args.metrics_port is None:
        yield None
        return
    server = MetricsServer(eng, host=args.metrics_host, port=args.metrics_port)
    await server.start()
    try:
        yield server.url
    finally:
        await server.close()


def _host(args: argparse.Namespace) -> str:
    return str(
        args.host or environment.setting(ApiConfig, ("host",), settings_view(os.environ)) or "127.0.0.1"
    )


def _port(args: argparse.Namespace, default: int) -> int:
    """``--port``, else ``ENGINE_API_PORT`` (read as ``ApiConfig`` reads it: a bad value is an error), else
    ``default``."""
    if args.port is not None:
        return int(args.port)
    port = environment.setting(ApiConfig, ("port",), settings_view(os.environ))
    return default if port is None else int(port)


def simulator(args: argparse.Namespace) -> int:
    """``credential-engine simulator ...``: the exchange simulator's own command line (its options after it)."""
    from venues.simulator.__main__ import main as simulator_main

    try:
        return simulator_main(list(args.simulator_args))
    except SystemExit as exc:  # its own --help and usage errors
        return int(exc.code) if isinstance(exc.code, int) else 2  # 2: a usage error, as everywhere


async def worker(args: argparse.Namespace) -> int:
    """Queue workers only (scale out: run more of these against the same database)."""
    stop = _stop_event()
    async with opened(workers=args.workers) as eng, _metrics_listener(eng, args) as metrics_url:
        shown = f"; metrics on {metrics_url}" if metrics_url else ""
        print(f"credential-engine worker running {eng.config.workers} job(s) at a time{shown}", flush=True)
        await stop.wait()
    return 0


async def migrate(args: argparse.Namespace) -> int:
    """Apply schema.sql even if the recorded digest matches (starts apply it only when it changed)."""
    async with opened() as eng:
        await eng.db.apply_schema(force=True)
    print("schema applied")
    return 0


async def rewrap_keys(args: argparse.Namespace) -> int:
    """Re-wrap every data key under the current master key; exit 1 naming what is left (kinds and counts)."""
    async with opened() as eng:
        bar = out.Progress("rewrap", 0)
        report = await eng.rewrap_keys(
            batch_size=args.batch_size,
            lock_timeout=args.lock_timeout,
            progress=lambda done, total: bar.update(done, total),
        )
        bar.close()
    print(f"{report.total} data key(s) re-wrapped under master key version {report.current_version}")
    if report.complete:
        return 0
    print(
        f"credential-engine: error: still under an old master key: {report.describe_left()}; "
        "keep the old master key versions and run rewrap-keys again",
        file=sys.stderr,
    )
    return 1


def token(args: argparse.Namespace) -> int:
    secret = environment.setting(ApiConfig, ("jwt_secret",), settings_view(os.environ))  # or ..._FILE
    if not secret:
        raise errors.ConfigurationError(f"{auth.SECRET_ENV} is not set (the server's token secret)")
    granted = None if not args.scope else [name for given in args.scope for name in given.split()]
    print(auth.mint_token(secret, args.owner, ttl=args.ttl, scopes=granted))
    return 0


# ---- credentials ---------------------------------------------------------------------------------------------


async def create(args: argparse.Namespace) -> int:
    secret, passphrase = await asyncio.to_thread(_keys, args, args.venue)  # files, prompts
    async with opened(workers=4 if args.wait else 0) as eng:
        cred = await eng.create_credential(
            args.owner, venue=args.venue, api_key=args.api_key, api_secret=secret or "",
            api_passphrase=passphrase, credential_type=args.type, nickname=args.name,
        )  # fmt: skip
        if args.wait:
            cred = (
                await _wait(
                    eng, args.owner, {cred.credential_id: _snapshot(cred)}, _decided, args.wait, "verify"
                )
            )[cred.credential_id]
    _show_credential(args, cred)
    return _failed([cred])


async def list_credentials(args: argparse.Namespace) -> int:
    async with opened() as eng:
        page = await eng.list_credentials(
            args.owner, status=args.status, credential_type=args.type, venue=args.venue,
            offset=args.offset, limit=args.limit,
        )  # fmt: skip
    rows = [c.public_dict() for c in page.items]
    if args.json:
        out.dump_json(rows)
    else:
        print(out.table(rows, out.CREDENTIAL_COLUMNS))
        print(f"({len(rows)} of {page.total}, offset {page.offset})", file=sys.stderr)
    return 0


async def get(args: argparse.Namespace) -> int:
    async with opened() as eng:
        cred = await eng.get_credential(args.owner, args.credential_id)
    _show_credential(args, cred)
    return 0


async def verify(args: argparse.Namespace) -> int:
    """Re-verify some credentials, or ``--all`` of the owner's (with a progress bar)."""
    if bool(args.credential_ids) == bool(args.all):
        raise errors.InvalidRequest("credentialId", "name credential ids or use --all, not both")
    async with opened(workers=4 if args.wait else 0) as eng:
        ids: list[uuid.UUID | str] = list(args.credential_ids)
        if args.all:
            ids = [c.credential_id for c in await _every(eng, args.owner, args.status)]
        before: dict[uuid.UUID, tuple[Any, ...]] = {}
        bar = out.Progress("enqueue", len(ids)) if len(ids) > 1 else None
        for n, cid in enumerate(ids, 1):
            cred = await eng.get_credential(args.owner, cid)
            if cred.status is CredentialStatus.REVOKED:
                continue
            before[cred.credential_id] = _snapshot(cred)
            await eng.verify_credential(args.owner, cred.credential_id)
            if bar is not None:
                bar.update(n)
        if bar is not None:
            bar.close()
        if not args.wait:
            print(f"{len(before)} verification(s) enqueued")
            return 0
        done = await _wait(eng, args.owner, before, _decided, args.wait, "verify")
    creds = list(done.values())
    rows = [c.public_dict() for c in creds]
    if args.json:
        out.dump_json(rows)
    else:
        print(out.table(rows, out.CREDENTIAL_COLUMNS))
    return _failed(creds)


async def _every(eng: CredentialEngine, owner: str, status: str | None) -> list[Credential]:
    found: list[Credential] = []
    offset = 0
    while True:
        page = await eng.list_credentials(owner, status=status, offset=offset, limit=PAGE)
        found.extend(page.items)
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return found


async def rotate(args: argparse.Namespace) -> int:
    if args.automatic:
        if args.api_key is not None or args.immediate or args.wait:
            raise errors.InvalidRequest(
                "automatic", "takes no keys, --immediate or --wait (the engine's jobs rotate)"
            )
        async with opened() as eng:
            cred = await eng.rotate_credential(args.owner, args.credential_id, automatic=True)
        _show_credential(args, cred)
        return 0
    if args.api_key is None:
        raise errors.InvalidRequest("apiKey", "is required (--api-key), unless --automatic")
    async with opened(workers=4 if args.wait else 0) as eng:
        current = await eng.get_credential(args.owner, args.credential_id)
        secret, passphrase = await asyncio.to_thread(_keys, args, current.venue.value)
        cred = await eng.rotate_credential(
            args.owner, args.credential_id, api_key=args.api_key, api_secret=secret or "",
            api_passphrase=passphrase, immediate=args.immediate,
        )  # fmt: skip
        if args.wait:
            snap = {cred.credential_id: _snapshot(cred)}
            cred = (await _wait(eng, args.owner, snap, _rotation_done, args.wait, "rotate"))[
                cred.credential_id
            ]
    _show_credential(args, cred)
    if not args.wait:
        return 0
    promoted = args.immediate or cred.secret_version != current.secret_version
    if cred.status is CredentialStatus.VERIFIED and promoted:
        return 0
    print(
        "rotation rejected: " + ("the old keys stay in use" if not promoted else cred.status.value),
        file=sys.stderr,
    )
    return 1


async def mint(args: argparse.Namespace) -> int:
    async with opened(workers=4 if args.wait else 0) as eng:
        cred = await eng.mint_credential(
            args.owner, args.broker_credential_id, sub_account=args.sub_account,
            permissions={"read": not args.no_read, "trade": not args.no_trade}, ip_allowlist=args.ip,
            nickname=args.name,
        )  # fmt: skip
        if args.wait:
            cred = (
                await _wait(
                    eng, args.owner, {cred.credential_id: _snapshot(cred)}, _decided, args.wait, "mint"
                )
            )[cred.credential_id]
    _show_credential(args, cred)
    return _failed([cred])


async def reconcile_keys(args: argparse.Namespace) -> int:
    async with opened() as eng:
        count = await eng.reconcile_broker_keys()
    print(f"reconciliation enqueued for {count} sub-account(s)", file=sys.stderr)
    return 0


async def revoke(args: argparse.Namespace) -> int:
    async with opened() as eng:
        cred = await eng.revoke_credential(args.owner, args.credential_id, cascade=not args.no_cascade)
    _show_credential(args, cred)
    return 0


# ---- trading accounts ----------------------------------------------------------------------------------------


async def connect(args: argparse.Namespace) -> int:
    if (args.credential_id is None) == (args.venue is None):
        raise errors.InvalidRequest("credentialId", "give --credential ID, or --venue with --api-key")
    secret = passphrase = None
    if args.venue is not None:
        secret, passphrase = await asyncio.to_thread(_keys, args, args.venue)  # files, prompts
    async with opened(workers=4 if args.venue else 0) as eng:
        account = await eng.connect_trading_account(
            args.owner, credential_id=args.credential_id, account_type=args.account_type, name=args.name,
            venue=args.venue, api_key=args.api_key, api_secret=secret, api_passphrase=passphrase,
            wait_timeout=args.wait,
        )  # fmt: skip
    _show_account(args, account.public_dict())
    return 0


async def disconnect(args: argparse.Namespace) -> int:
    async with opened() as eng:
        account = await eng.disconnect_trading_account(args.owner, args.trading_account_id)
    _show_account(args, account.public_dict())
    return 0


async def accounts(args: argparse.Namespace) -> int:
    async with opened() as eng:
        page = await eng.list_trading_accounts(
            args.owner, credential_id=args.credential, status=args.status, venue=args.venue,
            offset=args.offset, limit=args.limit,
        )  # fmt: skip
    rows = [a.public_dict() for a in page.items]
    if args.json:
        out.dump_json(rows)
    else:
        print(out.table(rows, out.ACCOUNT_COLUMNS))
    return 0


def _show_account(args: argparse.Namespace, account: dict[str, Any]) -> None:
    if args.json:
        out.dump_json(account)
    else:
        print(out.table([account], out.ACCOUNT_COLUMNS))


# ---- jobs ----------------------------------------------------------------------------------------------------


JOB_COLUMNS: list[out.Column] = [
    ("ID", lambda j: j["id"]),
    ("KIND", lambda j: j["kind"]),
    ("STATE", lambda j: j["state"]),
    ("TRIES", lambda j: j["tries"]),
    ("RUN AT", lambda j: j["runAt"]),
    ("LAST ERROR", lambda j: j["lastError"]),
]


async def jobs_list(args: argparse.Namespace) -> int:
    async with opened() as eng:
        found = await eng.queue.list_jobs(state=args.state, kind=args.kind, limit=args.limit)
    rows = [
        {"id": j.id, "kind": j.kind, "state": j.state, "tries": j.tries, "attempt": j.attempt,
         "runAt": j.run_at.isoformat(timespec="seconds"), "lastError": j.last_error}
        for j in found
    ]  # fmt: skip
    if args.json:
        out.dump_json(rows)
    elif not rows:
        print(f"no jobs in state {args.state}" if args.state else "no jobs")
    else:
        print(out.table(rows, JOB_COLUMNS))
    return 0


async def jobs_retry(args: argparse.Namespace) -> int:
    failed = 0
    async with opened() as eng:
        for job_id in args.job_ids:
            if await eng.retry_job(job_id):
                print(f"job {job_id} queued again")
            else:
                print(f"job {job_id} is not dead (nothing done)", file=sys.stderr)
                failed = 1
    return failed
