"""What the command line prints: plain tables for people, JSON for scripts, a progress bar on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def when(ms: Any) -> str:
    """Milliseconds since the epoch as a short UTC time (``-`` for none)."""
    if not isinstance(ms, int):
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())  # one line per row, whatever the value holds


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    cells = [[cell(get(row)) for _, get in columns] for row in rows]
    headers = [name for name, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def fields(row: dict[str, Any], names: Iterable[tuple[str, str]]) -> str:
    """``label: value`` lines for one object (``get`` and friends)."""
    pairs = [(label, row.get(key)) for label, key in names]
    width = max(len(label) for label, _ in pairs)
    lines = []
    for label, value in pairs:
        shown = when(value) if key_is_time(label) else cell(value)
        lines.append(f"{label.ljust(width)}  {shown}")
    return "\n".join(lines)


def key_is_time(label: str) -> bool:
    return label.endswith(("created", "updated", "verified", "revoked"))


def dump_json(value: Any, stream: IO[str] | None = None) -> None:
    print(json.dumps(value, indent=2, sort_keys=False), file=stream or sys.stdout)


CREDENTIAL_COLUMNS: list[Column] = [
    ("ID", lambda c: c["credentialId"]),
    ("VENUE", lambda c: c["venue"]),
    ("TYPE", lambda c: c["credentialType"]),
    ("NAME", lambda c: c["nickname"]),
    ("STATUS", lambda c: c["status"] + (" (rotating)" if c.get("pendingRotation") else "")),
    ("API KEY", lambda c: c["apiKey"]),
    ("IDENTITIES", lambda c: c["identities"]),
    ("REASON", lambda c: c.get("failureReason")),
    ("UPDATED", lambda c: when(c["updatedAt"])),
]
CREDENTIAL_FIELDS = [
    ("id", "credentialId"), ("owner", "userId"), ("venue", "venue"), ("type", "credentialType"),
    ("name", "nickname"), ("status", "status"), ("api key", "apiKey"), ("identities", "identities"),
    ("venue account", "venueAccountId"), ("failure reason", "failureReason"), ("warnings", "warnings"),
    ("secret version", "secretVersion"), ("created", "createdAt"), ("updated", "updatedAt"),
    ("verified", "verifiedAt"), ("revoked", "revokedAt"),
]  # fmt: skip
ACCOUNT_COLUMNS: list[Column] = [
    ("ID", lambda a: a["tradingAccountId"]),
    ("VENUE", lambda a: a["venue"]),
    ("TYPE", lambda a: a["accountType"]),
    ("NAME", lambda a: a["name"]),
    ("STATUS", lambda a: a["status"]),
    ("CREDENTIAL", lambda a: a["credentialId"]),
    ("UPDATED", lambda a: when(a["updatedAt"])),
]


class Progress:
    """A progress bar drawn by hand on a terminal (stderr); elsewhere only the final line is written."""

    def __init__(self, label: str, total: int, *, stream: IO[str] | None = None, width: int = 30) -> None:
        self.label = label
        self.total = max(0, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._tty = _isatty(self.stream)

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(total, done)
        self.done = done
        now = time.monotonic()
        if self._tty and (now - self._drawn_at >= 0.1 or done >= self.total):
            self._drawn_at = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        total = max(self.total, 1)
        share = min(1.0, self.done / total) if self.total else 1.0
        filled = round(share * self.width)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {share:4.0%} {rate:,.0f}/s"

    def close(self) -> None:
        self.stream.write(("\r" if self._tty else "") + self.line() + "\n")
        self.stream.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
