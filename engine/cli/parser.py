"""The command line's parser: every command, its options, and the function that runs it (``func``).

The commands and their exit statuses are listed in :mod:`engine.cli`."""

from __future__ import annotations

import argparse
import os

from engine.api import auth, scopes
from engine.cli import commands, webhooks
from engine.cli import keys as keys_cli
from engine.keys import rewrap


def _owner_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    owner = os.environ.get("ENGINE_OWNER")
    parent.add_argument(
        "--owner", default=owner, required=owner is None, help="the owner acting (default: $ENGINE_OWNER)"
    )
    parent.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parent


def _keys_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--api-secret-file", metavar="FILE", help="read the API secret from FILE ('-' = stdin)"
    )
    parent.add_argument("--api-passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    parent.add_argument("--ask-passphrase", action="store_true", help="prompt for a passphrase")
    return parent


def _page(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=50)


def _metrics_options(parser: argparse.ArgumentParser, port_help: str) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,  # argparse converts a string default too: a bad $ENGINE_METRICS_PORT is a usage error
        default=os.environ.get("ENGINE_METRICS_PORT") or None,
        metavar="PORT",
        help=f"{port_help} (default $ENGINE_METRICS_PORT; none: no such listener; 0 picks a free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("ENGINE_METRICS_HOST") or "127.0.0.1",
        metavar="ADDRESS",
        help="address of the metrics listener (default $ENGINE_METRICS_HOST or 127.0.0.1; 0.0.0.0 in a container)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credential-engine",
        description="Run the credential-engine service, and operate on credentials from a shell.",
        epilog="Run `credential-engine COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    owner, keys = _owner_parent(), _keys_parent()

    p = sub.add_parser("serve", help="run the REST API and the workers")
    p.add_argument("--sandbox", action="store_true", help="in-process exchange simulator with test accounts")
    p.add_argument("--host", help="address to listen on (default $ENGINE_API_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default $ENGINE_API_PORT or 8080)")
    p.add_argument(
        "--workers", type=int, help="concurrent jobs in this process (default $ENGINE_WORKERS or 10)"
    )
    _metrics_options(p, "a listener of its own for /metrics, besides the API's /metrics route")
    p.set_defaults(func=commands.serve)

    p = sub.add_parser("worker", help="run queue workers only (scale out)")
    p.add_argument("--workers", type=int, default=10, help="concurrent jobs in this process")
    _metrics_options(p, "serve Prometheus metrics on this port (GET /metrics), so every worker is scraped")
    p.set_defaults(func=commands.worker)

    p = sub.add_parser(
        "simulator", help="run the exchange simulator (options: simulator --help)", add_help=False
    )
    p.add_argument("simulator_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=commands.simulator)

    p = sub.add_parser("token", help="mint a development bearer token (needs ENGINE_API_JWT_SECRET)")
    p.add_argument("--owner", required=True, help="the token's sub")
    p.add_argument(
        "--ttl", type=float, default=auth.DEFAULT_TTL, help="seconds it stays valid (default 3600)"
    )
    p.add_argument(
        "--scope",
        action="append",
        metavar="SCOPE",
        help="grant only these scopes (repeatable or space-separated; default: every scope: "
        f"{' '.join(scopes.ALL_SCOPES)})",
    )
    p.set_defaults(func=commands.token)

    p = sub.add_parser("create", parents=[owner, keys], help="store exchange API keys")
    p.add_argument("--venue", required=True, help="BINANCE, OKX, BYBIT, COINBASE or KRAKEN")
    p.add_argument("--api-key", required=True, help="the API key (the public half)")
    p.add_argument("--type", default="EXCHANGE", help="EXCHANGE (default) or BROKER")
    p.add_argument("--name", help="a nickname")
    p.add_argument(
        "--wait", type=float, nargs="?", const=30.0, metavar="SECONDS", help="wait for the verification"
    )
    p.set_defaults(func=commands.create)

    p = sub.add_parser("list", parents=[owner], help="list credentials")
    p.add_argument("--status", help="PENDING, VERIFIED, FAILED or REVOKED")
    p.add_argument("--type", help="EXCHANGE or BROKER")
    p.add_argument("--venue")
    _page(p)
    p.set_defaults(func=commands.list_credentials)

    p = sub.add_parser("get", parents=[owner], help="show one credential")
    p.add_argument("credential_id")
    p.set_defaults(func=commands.get)

    p = sub.add_parser("verify", parents=[owner], help="re-verify credentials (one, several, or --all)")
    p.add_argument("credential_ids", nargs="*", metavar="CREDENTIAL_ID")
    p.add_argument("--all", action="store_true", help="every credential of the owner (bulk re-verification)")
    p.add_argument("--status", help="with --all: only credentials of this status")
    p.add_argument(
        "--wait", type=float, nargs="?", const=60.0, metavar="SECONDS", help="wait for the outcomes"
    )
    p.set_defaults(func=commands.verify)

    p = sub.add_parser("rotate", parents=[owner, keys], help="replace a credential's keys")
    p.add_argument("credential_id")
    p.add_argument("--api-key", help="the new API key (required unless --automatic)")
    p.add_argument("--immediate", action="store_true", help="compromised key: destroy the old keys now")
    p.add_argument(
        "--automatic",
        action="store_true",
        help="a credential minted through a BROKER credential: the engine mints the new key itself (no keys)",
    )
    p.add_argument(
        "--wait", type=float, nargs="?", const=30.0, metavar="SECONDS", help="wait for the outcome"
    )
    p.set_defaults(func=commands.rotate)

    p = sub.add_parser(
        "mint", parents=[owner], help="create a sub-account key through a BROKER credential's master key"
    )
    p.add_argument("broker_credential_id", metavar="BROKER_CREDENTIAL_ID")
    p.add_argument(
        "--sub-account", required=True, help="the sub-account's id at the venue (sub:<id> identity)"
    )
    p.add_argument(
        "--no-read", action="store_true", help="a key that cannot read (where the venue allows it)"
    )
    p.add_argument("--no-trade", action="store_true", help="a read-only key")
    p.add_argument(
        "--ip", action="append", metavar="ADDRESS", help="restrict the key to this IP (repeatable; default: "
        "ENGINE_MINT_IP_ALLOWLIST)",
    )  # fmt: skip
    p.add_argument("--name", help="a nickname")
    p.add_argument(
        "--wait", type=float, nargs="?", const=60.0, metavar="SECONDS", help="wait until minted and verified"
    )
    p.set_defaults(func=commands.mint)

    p = sub.add_parser(
        "reconcile-keys", help="delete the venue keys labelled by the engine that no credential holds (jobs)"
    )
    p.set_defaults(func=commands.reconcile_keys)

    p = sub.add_parser("revoke", parents=[owner], help="revoke a credential for good")
    p.add_argument("credential_id")
    p.add_argument("--no-cascade", action="store_true", help="refuse while ACTIVE trading accounts exist")
    p.set_defaults(func=commands.revoke)

    p = sub.add_parser("connect", parents=[owner, keys], help="connect a trading account")
    p.add_argument("--credential", dest="credential_id", help="a VERIFIED credential's id")
    p.add_argument(
        "--venue", help="or: the venue of new keys (docs/api-dialect.md §8: stored, verified and connected)"
    )
    p.add_argument("--api-key", help="with --venue: the API key")
    p.add_argument("--account-type", help="spot, margin, futures, ... (default: the first identity)")
    p.add_argument("--name", help="the account's name")
    p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS", help="verification wait (new keys)")
    p.set_defaults(func=commands.connect)

    p = sub.add_parser("disconnect", parents=[owner], help="disconnect a trading account")
    p.add_argument("trading_account_id")
    p.set_defaults(func=commands.disconnect)

    p = sub.add_parser("accounts", parents=[owner], help="list trading accounts")
    p.add_argument("--credential", help="only accounts of this credential")
    p.add_argument("--status", help="ACTIVE or DISABLED")
    p.add_argument("--venue")
    _page(p)
    p.set_defaults(func=commands.accounts)

    webhooks.add_parsers(sub, owner)

    jobs = sub.add_parser("jobs", help="the job queue: list dead jobs, retry them")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    p = jobs_sub.add_parser("list", help="list jobs (dead ones by default)")
    p.add_argument("--state", default="dead", help="queued, running, done, dead or cancelled (default dead)")
    p.add_argument("--kind", help="only jobs of this kind")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.jobs_list)
    p = jobs_sub.add_parser("retry", help="send dead jobs back to the queue")
    p.add_argument("job_ids", type=int, nargs="+", metavar="JOB_ID")
    p.set_defaults(func=commands.jobs_retry)

    p = sub.add_parser(
        "rewrap-keys",
        help="re-wrap every data key under the current master key (exit 1 naming what is left)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=rewrap.DEFAULT_BATCH_SIZE,
        help=f"rows per transaction (default {rewrap.DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=rewrap.DEFAULT_LOCK_TIMEOUT,
        metavar="SECONDS",
        help="how long the last pass waits, in all, for rows other transactions hold "
        f"(default {rewrap.DEFAULT_LOCK_TIMEOUT:g})",
    )
    p.set_defaults(func=commands.rewrap_keys)

    keys_cli.add_parsers(sub)

    p = sub.add_parser("migrate", help="apply the database schema again (idempotent; repairs drift)")
    p.set_defaults(func=commands.migrate)
    return parser
