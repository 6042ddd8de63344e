"""``credential-engine webhooks add|list|remove|rotate-secret|enable|disable|deliveries``."""

from __future__ import annotations

import argparse
from typing import Any

from engine.cli import output as out
from engine.cli.commands import opened
from engine.webhooks.models import WebhookEndpoint

ENDPOINT_COLUMNS: list[out.Column] = [
    ("ID", lambda e: e["endpointId"]),
    ("URL", lambda e: e["url"]),
    ("EVENTS", lambda e: e["eventTypes"] or "all"),
    ("ENABLED", lambda e: e["enabled"]),
    ("DISABLED WHY", lambda e: e["disabledReason"]),
    ("DESCRIPTION", lambda e: e["description"]),
]
DELIVERY_COLUMNS: list[out.Column] = [
    ("ID", lambda d: d["deliveryId"]),
    ("EVENT", lambda d: d["eventType"]),
    ("SEQ", lambda d: d["sequence"]),
    ("STATE", lambda d: d["state"]),
    ("ATTEMPTS", lambda d: len(d["attempts"])),
    ("LAST STATUS", lambda d: d["lastStatusCode"]),
    ("LAST ERROR", lambda d: d["lastError"]),
    ("CREATED", lambda d: out.when(d["createdAt"])),
]


def add_parsers(sub: Any, owner: argparse.ArgumentParser) -> None:
    """The ``webhooks`` command and its actions, on the main parser's subparsers."""
    hooks = sub.add_parser("webhooks", help="webhook endpoints and their deliveries")
    actions = hooks.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)

    p = actions.add_parser("add", parents=[owner], help="add an endpoint (prints its signing secret once)")
    p.add_argument("url")
    p.add_argument("--events", help="comma-separated event types (default: every type)")
    p.add_argument("--description")
    p.set_defaults(func=add)

    p = actions.add_parser("list", parents=[owner], help="list endpoints")
    p.set_defaults(func=list_endpoints)

    p = actions.add_parser(
        "remove", parents=[owner], help="delete an endpoint with its secrets and deliveries"
    )
    p.add_argument("endpoint_id")
    p.set_defaults(func=remove)

    p = actions.add_parser("rotate-secret", parents=[owner], help="a new signing secret (printed once)")
    p.add_argument("endpoint_id")
    p.set_defaults(func=rotate_secret)

    for name, enabled in (("enable", True), ("disable", False)):
        p = actions.add_parser(name, parents=[owner], help=f"{name} an endpoint")
        p.add_argument("endpoint_id")
        p.set_defaults(func=set_enabled, enabled=enabled)

    p = actions.add_parser("deliveries", parents=[owner], help="deliveries with their attempts, newest first")
    p.add_argument("--endpoint", help="only deliveries to this endpoint")
    p.add_argument("--state", help="pending, waiting, delivered or dead")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=deliveries)


def _show(args: argparse.Namespace, endpoints: list[WebhookEndpoint]) -> None:
    rows = [e.public_dict() for e in endpoints]
    if args.json:
        out.dump_json(rows)
    else:
        print(out.table(rows, ENDPOINT_COLUMNS))


async def add(args: argparse.Namespace) -> int:
    types = [t.strip() for t in args.events.split(",") if t.strip()] if args.events else None
    async with opened() as eng:
        endpoint = await eng.add_webhook_endpoint(args.owner, args.url, types, args.description)
    if args.json:
        out.dump_json({**endpoint.public_dict(), "secret": endpoint.secret})
    else:
        print(out.table([endpoint.public_dict()], ENDPOINT_COLUMNS))
        print(f"\nsigning secret (shown this once; give it to the receiver): {endpoint.secret}")
    return 0


async def list_endpoints(args: argparse.Namespace) -> int:
    async with opened() as eng:
        endpoints = await eng.list_webhook_endpoints(args.owner)
    _show(args, endpoints)
    return 0


async def remove(args: argparse.Namespace) -> int:
    async with opened() as eng:
        await eng.remove_webhook_endpoint(args.owner, args.endpoint_id)
    print(f"endpoint {args.endpoint_id} removed")
    return 0


async def rotate_secret(args: argparse.Namespace) -> int:
    async with opened() as eng:
        secret = await eng.rotate_webhook_secret(args.owner, args.endpoint_id)
    if args.json:
        out.dump_json({"endpointId": args.endpoint_id, "secret": secret})
    else:
        print(f"new signing secret (shown this once; the old one signs for a grace period): {secret}")
    return 0


async def set_enabled(args: argparse.Namespace) -> int:
    async with opened() as eng:
        endpoint = await eng.update_webhook_endpoint(args.owner, args.endpoint_id, enabled=args.enabled)
    _show(args, [endpoint])
    return 0


async def deliveries(args: argparse.Namespace) -> int:
    async with opened() as eng:
        page = await eng.list_webhook_deliveries(
            args.owner, args.endpoint, state=args.state, offset=args.offset, limit=args.limit
        )
    rows = [d.public_dict() for d in page.items]
    if args.json:
        out.dump_json(rows)
    else:
        print(out.table(rows, DELIVERY_COLUMNS))
    return 0
