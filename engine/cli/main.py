"""``credential-engine``'s entry point: parse the command line, run the command, and turn every outcome into
an exit status (errors: one line on stderr, never a traceback). The commands are listed in :mod:`engine.cli`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import structlog

from engine import errors, logs
from engine.cli import commands
from engine.cli.parser import build_parser

log = structlog.get_logger("engine.cli")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _log_level(command: str) -> str:
    if command in ("serve", "worker"):
        return os.environ.get("ENGINE_LOG_LEVEL", "INFO")
    return os.environ.get("ENGINE_LOG_LEVEL", "WARNING")  # lifecycle commands: their output is the answer


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Returns the exit status (see :mod:`engine.cli`)."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["simulator"]:  # everything after it is the simulator's (its --help included)
        return commands.simulator(argparse.Namespace(simulator_args=given[1:]))
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
