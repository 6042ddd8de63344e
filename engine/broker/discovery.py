"""A BROKER credential's verification: after the probe, its sub-accounts and whether it may manage their keys.

The sub-accounts become identities ``sub:<id>`` next to the account types the probe found, and
``permissions.subAccountKeys`` says whether the master key may mint. A master key the venue refuses to list
sub-accounts for (a permanent refusal, such as a missing permission) is still a verified key: it just may not
mint. Transient failures propagate (the verification job retries). On venues without a sub-account key API
(Coinbase, Kraken) the probe's result is kept as it is.
"""

from __future__ import annotations

import dataclasses
import inspect

import structlog

from engine.broker.managers import Managers
from venues.base import ApiKeys, ProbeFailure, ProbeResult, Venue, release_frames

log = structlog.get_logger("engine.broker")

SUB_PREFIX = "sub:"


def sub_identity(sub_id: str) -> str:
    """The identity of sub-account ``sub_id`` on a BROKER credential."""
    return SUB_PREFIX + sub_id


class Discovery:
    """``await discovery(venue, keys, result)``: ``result`` with the sub-accounts and the permission flag."""

    def __init__(self, managers: Managers) -> None:
        self._managers = managers

    async def __call__(self, venue: Venue, keys: ApiKeys, result: ProbeResult) -> ProbeResult:
        if not self._managers.supports(venue):
            return result
        manager = self._managers.get(venue)
        try:
            subs = await manager.list_sub_accounts(keys)
            allowed = True
            check = getattr(manager, "can_manage_keys", None)  # a venue module may say more than "it lists"
            if check is not None:
                answer = check(keys)
                allowed = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
        except ProbeFailure as failure:
            if failure.transient:
                raise
            release_frames(failure)  # dropped: its frames hold the master's keys
            log.info("broker_sub_accounts_refused", venue=venue.value, outcome=failure.outcome.value)
            return dataclasses.replace(
                result, permissions=dataclasses.replace(result.permissions, sub_account_keys=False)
            )
        identities = tuple(result.identities) + tuple(sub_identity(s.sub_id) for s in subs)
        return dataclasses.replace(
            result,
            identities=identities,
            permissions=dataclasses.replace(result.permissions, sub_account_keys=allowed),
        )
