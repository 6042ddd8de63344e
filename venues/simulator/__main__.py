"""``python -m venues.simulator``: run the exchange simulator until SIGINT/SIGTERM.

Prints one JSON document on stdout once it listens: ``{"venues": {venue: url}, "admin": url, "keys": [...],
"masters": [...]}`` (with ``--seed-demo``, ``keys`` holds the demo keys' material and ``masters`` a master
account per venue with a sub-account key API, its key and its sub-accounts; else both are ``[]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from venues.base import Venue
from venues.simulator import faults, server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="credential-engine simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port-base",
        type=int,
        default=0,
        help="venue ports are BASE+0..4 (BINANCE, OKX, BYBIT, COINBASE, KRAKEN), admin BASE+5; 0 = random",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault-picking RNG")
    parser.add_argument(
        "--seed-demo",
        action="store_true",
        help="register the demo accounts (and master accounts) and print their keys",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument(
        "--error-rate", type=float, default=0.0, help="chance per request of an injected fault"
    )
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="count rate-limit violations but answer them normally"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every request (no secrets) on stderr at debug level"
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Run the simulator described by ``args`` until ``stop`` is set."""
    settings = faults.Faults(latency=args.latency, error_rate=args.error_rate)
    sim = server.Simulator(seed=args.seed, enforce_rate_limits=not args.no_rate_limits)
    try:
        await sim.start(args.host, port_base=args.port_base)
        keys = sim.seed_demo_accounts() if args.seed_demo else []
        demo_masters = sim.seed_demo_masters() if args.seed_demo else []
        if settings.latency or settings.error_rate:
            for venue in Venue:
                sim.set_faults(venue, settings)
        document = {
            "venues": {venue.value: url for venue, url in sim.urls.items()},
            "admin": sim.admin_url,
            "keys": [key.as_dict(secrets=True) for key in keys],
            "masters": [master.as_dict(secrets=True) for master in demo_masters],
        }
        print(json.dumps(document, indent=2), flush=True)
        await stop.wait()
    finally:
        await sim.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        faults.Faults(latency=args.latency, error_rate=args.error_rate)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(args, stop)

    try:
        asyncio.run(run())
    except OSError as exc:  # port taken, host not ours
        print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
