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

from engine import environment, errors, logs
from engine.cli import commands
from engine.cli.parser import build_parser
from engine.config import EngineConfig
from engine.environment import settings_view

log = structlog.get_logger("engine.cli")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _logging(command: str) -> tuple[str, bool]:
    """(level, json) from ``ENGINE_LOG_LEVEL`` and ``ENGINE_LOG_JSON``, read as ``EngineConfig`` reads them
    (one boolean parser); unset level: INFO for the services, WARNING for lifecycle commands (their output
    is the answer)."""
    env = settings_view(os.environ)
    level = environment.setting(EngineConfig, ("log_level",), env)
    as_json = environment.setting(EngineConfig, ("log_json",), env)
    default = "INFO" if command in ("serve", "worker") else "WARNING"
    return level or default, bool(as_json)


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
        level, as_json = _logging(args.command)
        logs.configure_logging(level, json=as_json)
        result: Any = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except KeyboardInterrupt:
        print("credential-engine: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (errors.InvalidRequest, errors.ConfigurationError) as exc:  # ConfigurationError names the variable
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
