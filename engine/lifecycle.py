"""The credential lifecycle: the transition table as one shared synchronous ``transitions.Machine``.

The machine is only a table and a validator. It holds no model and runs no callbacks (``AsyncMachine``
swallows ``CancelledError`` and cancels a running trigger when a second arrives: docs/design.md §2.2).
The database row is the truth and the concurrency control: every change is a guarded update of the store
(``WHERE status = ANY(sources(trigger)) AND secret_version = $fence``). A caller asks :func:`target` first, on
the row it locked (:class:`errors.InvalidTransition` when the status forbids the trigger); a job whose guarded
update matches no row learns that the credential moved on since it read it (revoked, rotated) and does nothing.

    trigger              from                      to
    create               (new)                     PENDING
    verify_succeeded     PENDING VERIFIED FAILED   VERIFIED
    verify_rejected      PENDING VERIFIED FAILED   FAILED      permanent causes only
    rotate               PENDING VERIFIED FAILED   unchanged   new keys staged, verification enqueued
    rotate_immediately   PENDING VERIFIED FAILED   PENDING     compromised key: old material destroyed now
    rotation_succeeded   PENDING VERIFIED FAILED   VERIFIED    staged version promoted, old material destroyed
    rotation_rejected    PENDING VERIFIED FAILED   unchanged   staged version discarded
    revoke               PENDING VERIFIED FAILED   REVOKED     terminal; material destroyed; accounts disabled
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from transitions import Machine

from engine import errors
from engine.models import CredentialStatus

NEW: Final = "NEW"  # the state before ``create``; never stored
P, V, F, R = (
    CredentialStatus.PENDING,
    CredentialStatus.VERIFIED,
    CredentialStatus.FAILED,
    CredentialStatus.REVOKED,
)
LIVE: Final = (P, V, F)
SAME: Final = "="  # transitions' reflexive destination

TRANSITIONS: Final[tuple[tuple[str, tuple[str, ...], str], ...]] = (
    ("create", (NEW,), P),
    ("verify_succeeded", LIVE, V),
    ("verify_rejected", LIVE, F),
    ("rotate", LIVE, SAME),
    ("rotate_immediately", LIVE, P),
    ("rotation_succeeded", LIVE, V),
    ("rotation_rejected", LIVE, SAME),
    ("revoke", LIVE, R),
)

TRIGGERS: Final = tuple(name for name, _, _ in TRANSITIONS)

MACHINE: Final = Machine(
    model=None,
    states=[NEW, *[s.value for s in CredentialStatus]],
    transitions=[
        {"trigger": name, "source": [str(s) for s in sources], "dest": str(dest)}
        for name, sources, dest in TRANSITIONS
    ],
    initial=NEW,
    auto_transitions=False,
    send_event=False,
)


def _table() -> Mapping[str, Mapping[str, str]]:
    """trigger -> {source: destination}, read back from the machine so the machine is the one table."""
    table: dict[str, dict[str, str]] = {}
    for name in TRIGGERS:
        event = MACHINE.events[name]
        table[name] = {}
        for source, transitions in event.transitions.items():
            (transition,) = transitions
            dest = transition.dest
            table[name][source] = source if dest is None or dest == SAME else dest
    return table


TABLE: Final = _table()


def sources(trigger: str) -> list[str]:
    """The statuses ``trigger`` may fire from (for the guarded UPDATE's ``status = ANY($n)``)."""
    return [s for s in TABLE[trigger] if s != NEW]


def target(trigger: str, status: str) -> CredentialStatus:
    """Where ``trigger`` takes a credential in ``status``; :class:`errors.InvalidTransition` if it may not fire."""
    dests = TABLE.get(trigger)
    if dests is None:
        raise ValueError(f"unknown trigger {trigger!r}")
    dest = dests.get(str(status))
    if dest is None:
        raise errors.InvalidTransition(trigger, str(status))
    return CredentialStatus(dest)


def allowed(trigger: str, status: str) -> bool:
    return str(status) in TABLE.get(trigger, {})


def triggers_from(status: str) -> list[str]:
    """Every trigger that may fire from ``status`` (REVOKED: none)."""
    return [name for name in TRIGGERS if allowed(name, status)]


def mermaid() -> str:
    """The machine drawn as a Mermaid state diagram (README "Lifecycle"; ``python -m engine.lifecycle``).

    Read from ``MACHINE`` like :data:`TABLE`, so the picture cannot drift from the rules: one arrow per
    (source, destination) pair, labelled with every trigger that takes it, sources in status order.
    """
    order = [NEW, *[s.value for s in CredentialStatus]]
    arrows: dict[tuple[str, str], list[str]] = {}
    for name in TRIGGERS:
        for source, dest in TABLE[name].items():
            arrows.setdefault((source, dest), []).append(name)
    lines = ["stateDiagram-v2"]
    for (source, dest), names in sorted(
        arrows.items(), key=lambda a: (order.index(a[0][0]), order.index(a[0][1]))
    ):
        start = "[*]" if source == NEW else source
        lines.append(f"    {start} --> {dest}: {', '.join(names)}")
    lines.append(f"    {R.value} --> [*]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(mermaid(), end="")
