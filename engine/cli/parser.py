"""``credential-engine``: run the service, and operate on credentials from a shell.

    credential-engine serve [--sandbox]          API + workers (sandbox: simulator with test accounts)
    credential-engine worker                     queue workers only (scale out)
    credential-engine simulator [...]            the exchange simulator alone
    credential-engine token --owner ID           a development bearer token (needs ENGINE_API_JWT_SECRET)
    credential-engine create|list|get|verify|rotate|revoke ...       one command per lifecycle operation
    credential-engine connect|disconnect|accounts ...                trading accounts
    credential-engine webhooks add|list|remove|rotate-secret|deliveries ...
    credential-engine jobs list|retry ...        dead jobs and their retry
    credential-engine rewrap-keys                re-wrap data keys under the current master key (1: some left)
    credential-engine migrate                    apply the schema

Lifecycle commands talk to the database directly (``EngineConfig.from_env()``, the service's environment),
acting for ``--owner`` (or ``ENGINE_OWNER``). Secrets never go on the command line: ``--api-secret-file``
(``-`` for stdin), ``ENGINE_CLI_API_SECRET``, or a prompt. Tables by default, ``--json`` for scripts.

Exit status: 0 done; 1 the operation failed (not found, conflict, a verification that failed, ...);
2 bad usage or invalid input; 130 interrupted. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from engine import auth, cli_commands, cli_webhooks, errors, logs, rewrap

log = structlog.get_logger("engine.cli")

Command = Callable[[argparse.Namespace], Awaitable[int] | int]
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
    p.set_defaults(func=cli_commands.serve)

    p = sub.add_parser("worker", help="run queue workers only (scale out)")
    p.add_argument("--workers", type=int, default=10, help="concurrent jobs in this process")
    p.set_defaults(func=cli_commands.worker)

    p = sub.add_parser(
        "simulator", help="run the exchange simulator (options: simulator --help)", add_help=False
    )
    p.add_argument("simulator_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_simulator)

    p = sub.add_parser("token", help="mint a development bearer token (needs ENGINE_API_JWT_SECRET)")
    p.add_argument("--owner", required=True, help="the token's sub")
    p.add_argument(
        "--ttl", type=float, default=auth.DEFAULT_TTL, help="seconds it stays valid (default 3600)"
    )
    p.set_defaults(func=cli_commands.token)

    p = sub.add_parser("create", parents=[owner, keys], help="store exchange API keys")
    p.add_argument("--venue", required=True, help="BINANCE, OKX, BYBIT, COINBASE or KRAKEN")
    p.add_argument("--api-key", required=True, help="the API key (the public half)")
    p.add_argument("--type", default="EXCHANGE", help="EXCHANGE (default) or BROKER")
    p.add_argument("--name", help="a nickname")
    p.add_argument(
        "--wait", type=float, nargs="?", const=30.0, metavar="SECONDS", help="wait for the verification"
    )
    p.set_defaults(func=cli_commands.create)

    p = sub.add_parser("list", parents=[owner], help="list credentials")
    p.add_argument("--status", help="PENDING, VERIFIED, FAILED or REVOKED")
    p.add_argument("--type", help="EXCHANGE or BROKER")
    p.add_argument("--venue")
    _page(p)
    p.set_defaults(func=cli_commands.list_credentials)

    p = sub.add_parser("get", parents=[owner], help="show one credential")
    p.add_argument("credential_id")
    p.set_defaults(func=cli_commands.get)

    p = sub.add_parser("verify", parents=[owner], help="re-verify credentials (one, several, or --all)")
    p.add_argument("credential_ids", nargs="*", metavar="CREDENTIAL_ID")
    p.add_argument("--all", action="store_true", help="every credential of the owner (bulk re-verification)")
    p.add_argument("--status", help="with --all: only credentials of this status")
    p.add_argument(
        "--wait", type=float, nargs="?", const=60.0, metavar="SECONDS", help="wait for the outcomes"
    )
    p.set_defaults(func=cli_commands.verify)

    p = sub.add_parser("rotate", parents=[owner, keys], help="replace a credential's keys")
    p.add_argument("credential_id")
    p.add_argument("--api-key", required=True, help="the new API key")
    p.add_argument("--immediate", action="store_true", help="compromised key: destroy the old keys now")
    p.add_argument(
        "--wait", type=float, nargs="?", const=30.0, metavar="SECONDS", help="wait for the outcome"
    )
    p.set_defaults(func=cli_commands.rotate)

    p = sub.add_parser("revoke", parents=[owner], help="revoke a credential for good")
    p.add_argument("credential_id")
    p.add_argument("--no-cascade", action="store_true", help="refuse while ACTIVE trading accounts exist")
    p.set_defaults(func=cli_commands.revoke)

    p = sub.add_parser("connect", parents=[owner, keys], help="connect a trading account")
    p.add_argument("--credential", dest="credential_id", help="a VERIFIED credential's id")
    p.add_argument("--venue", help="or: the venue of new keys (seed 05: stored, verified and connected)")
    p.add_argument("--api-key", help="with --venue: the API key")
    p.add_argument("--account-type", help="spot, margin, futures, ... (default: the first identity)")
    p.add_argument("--name", help="the account's name")
    p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS", help="verification wait (new keys)")
    p.set_defaults(func=cli_commands.connect)

    p = sub.add_parser("disconnect", parents=[owner], help="disconnect a trading account")
    p.add_argument("trading_account_id")
    p.set_defaults(func=cli_commands.disconnect)

    p = sub.add_parser("accounts", parents=[owner], help="list trading accounts")
    p.add_argument("--credential", help="only accounts of this credential")
    p.add_argument("--status", help="ACTIVE or DISABLED")
    p.add_argument("--venue")
    _page(p)
    p.set_defaults(func=cli_commands.accounts)

    cli_webhooks.add_parsers(sub, owner)

    jobs = sub.add_parser("jobs", help="the job queue: list dead jobs, retry them")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    p = jobs_sub.add_parser("list", help="list jobs (dead ones by default)")
    p.add_argument("--state", default="dead", help="queued, running, done, dead or cancelled (default dead)")
    p.add_argument("--kind", help="only jobs of this kind")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cli_commands.jobs_list)
    p = jobs_sub.add_parser("retry", help="send dead jobs back to the queue")
    p.add_argument("job_ids", type=int, nargs="+", metavar="JOB_ID")
    p.set_defaults(func=cli_commands.jobs_retry)

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
    p.set_defaults(func=cli_commands.rewrap_keys)

    p = sub.add_parser("migrate", help="apply the database schema again (idempotent; repairs drift)")
    p.set_defaults(func=cli_commands.migrate)
    return parser


def _simulator(args: argparse.Namespace) -> int:
    from venues.simulator.__main__ import main as simulator_main

    try:
        return simulator_main(list(args.simulator_args))
    except SystemExit as exc:  # its own --help and usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE


def _log_level(command: str) -> str:
    if command in ("serve", "worker"):
        return os.environ.get("ENGINE_LOG_LEVEL", "INFO")
    return os.environ.get("ENGINE_LOG_LEVEL", "WARNING")  # lifecycle commands: their output is the answer


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Returns the exit status (see the module docstring)."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["simulator"]:  # everything after it is the simulator's (its --help included)
        return _simulator(argparse.Namespace(simulator_args=given[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(given)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        logs.configure_logging(_log_level(args.command), json=os.environ.get("ENGINE_LOG_JSON") == "1")
        result: Any = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except KeyboardInterrupt:
        print("credential-engine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors.InvalidRequest as exc:
        print(f"credential-engine: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except errors.CredentialEngineError as exc:
        print(f"credential-engine: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # a port in use, an unreadable secret file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"credential-engine: error: {exc.strerror or type(exc).__name__}{where}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug: one line for the user, the details (redacted) in the log
        # text only, never frame locals (they can hold secrets read from files or prompts)
        log.error("cli_failed", command=args.command, traceback="".join(traceback.format_exception(exc)))
        print(f"credential-engine: internal error ({type(exc).__name__}); see the log above", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
