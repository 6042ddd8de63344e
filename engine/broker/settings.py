"""The BROKER settings: the zero-touch rotation policy, the grace periods and the minted keys' IP allow-list.

Read from the environment by the one loop of :mod:`engine.environment` (README's configuration table):

ENGINE_ROTATION_MAX_AGE          seconds a minted key is used before it is rotated (default 30 days)
ENGINE_ROTATION_BEFORE_EXPIRY    rotate this many seconds before the venue's own expiry of the key (3 days)
ENGINE_ROTATION_GRACE            seconds a rotated-out key keeps working before it is deleted at the venue
                                 (default 900): the time every signer needs to pick up the new key
ENGINE_ROTATION_RETRY_AFTER      seconds before a failed automatic rotation is tried again (default 1 day)
ENGINE_BROKER_ORPHAN_GRACE       seconds a key labelled by the engine but held by no credential is left alone
                                 (a venue call may be under way) before reconciliation deletes it (default 900)
ENGINE_BROKER_SWEEP_INTERVAL     seconds between sweeps: the rotation policy, then a reconciliation of every
                                 sub-account the engine minted into (default 3600)
ENGINE_MINT_IP_ALLOWLIST         comma-separated IP addresses minted keys are restricted to (default none)
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engine import environment, errors

DAY = 86_400.0


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """The rotation policy of minted credentials and the bounds of the engine's keys at the venues."""

    rotation_max_age: float = 30 * DAY
    rotation_before_expiry: float = 3 * DAY
    rotation_grace: float = 900.0
    rotation_retry_after: float = DAY
    orphan_grace: float = 900.0
    sweep_interval: float = 3600.0
    ip_allowlist: tuple[str, ...] = ()

    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_",
        names={
            "orphan_grace": "ENGINE_BROKER_ORPHAN_GRACE",
            "sweep_interval": "ENGINE_BROKER_SWEEP_INTERVAL",
            "ip_allowlist": "ENGINE_MINT_IP_ALLOWLIST",
        },
        bounds={"rotation_max_age": environment.POSITIVE, "sweep_interval": environment.POSITIVE},
    )
    SECONDS: ClassVar[tuple[str, ...]] = (
        "rotation_max_age",
        "rotation_before_expiry",
        "rotation_grace",
        "rotation_retry_after",
        "orphan_grace",
        "sweep_interval",
    )
    POSITIVE: ClassVar[frozenset[str]] = frozenset({"rotation_max_age", "sweep_interval"})

    def __post_init__(self) -> None:
        for name in self.SECONDS:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (name in self.POSITIVE and value == 0):
                raise errors.ConfigurationError(
                    f"broker.{name} must be a finite number of seconds ("
                    + ("> 0" if name in self.POSITIVE else ">= 0")
                    + ")",
                    field=name,
                )
        try:
            allowlist = parse_ip_allowlist(self.ip_allowlist, "ip_allowlist")
        except errors.InvalidRequest as problem:
            raise errors.ConfigurationError(f"broker.{problem}", field="ip_allowlist") from None
        object.__setattr__(self, "ip_allowlist", allowlist)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BrokerSettings:
        """The variables of the module docstring (unset: the defaults)."""
        return environment.build(cls, environment.settings_view(env))


MAX_ALLOWLIST = 30  # the smallest per-key allow-list of the three venues (docs/venues.md)


def parse_ip_allowlist(values: Any, field_name: str) -> tuple[str, ...]:
    """IP addresses (v4 or v6; the venues take addresses) in their normal form, without repeats;
    :class:`errors.InvalidRequest` naming ``field_name``."""
    if isinstance(values, str) or not isinstance(values, list | tuple):
        raise errors.InvalidRequest(field_name, "must be a list of IP addresses")
    if len(values) > MAX_ALLOWLIST:
        raise errors.InvalidRequest(field_name, f"at most {MAX_ALLOWLIST} addresses")
    normal: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise errors.InvalidRequest(field_name, "must be a list of IP addresses")
        try:
            text = str(ipaddress.ip_address(value))
        except ValueError:
            raise errors.InvalidRequest(field_name, "holds a value that is not an IP address") from None
        if text not in normal:
            normal.append(text)
    return tuple(normal)
