"""The sub-account key managers of an engine: injected ones (tests, ``engine.testing.FakeSubAccounts``) or the
venue modules' (``venues.subaccounts.build_sub_account_keys``), built on first use for the venues in
``buildable``. An engine built with injected probes (a test double of the venue) builds no manager for those
venues: it would call the real exchange next to a fake probe."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from engine import errors
from venues.base import Venue
from venues.subaccounts import SubAccountKeys, SubAccountsUnsupported, supports_sub_account_keys


class Managers:
    """``get(venue)``: the venue's :class:`SubAccountKeys`, or :class:`errors.BrokerUnsupported`."""

    def __init__(
        self,
        build: Callable[[Venue], SubAccountKeys],
        injected: Mapping[Venue, SubAccountKeys] | None = None,
        *,
        buildable: Collection[Venue] = tuple(Venue),
    ) -> None:
        self._build = build
        self._managers: dict[Venue, SubAccountKeys] = dict(injected or {})
        self._buildable = frozenset(buildable) if injected is None else frozenset()

    def supports(self, venue: Venue) -> bool:
        """Whether BROKER credentials of ``venue`` can mint (with injected managers: the venues given)."""
        return venue in self._managers or (venue in self._buildable and supports_sub_account_keys(venue))

    def get(self, venue: Venue) -> SubAccountKeys:
        if not self.supports(venue):
            raise unsupported(venue)
        manager = self._managers.get(venue)
        if manager is None:
            try:
                manager = self._build(venue)
            except SubAccountsUnsupported:
                raise unsupported(venue) from None
            self._managers[venue] = manager
        return manager


def unsupported(venue: Venue) -> errors.BrokerUnsupported:
    return errors.BrokerUnsupported(
        f"{venue.display_name} offers no API to manage sub-account API keys with a master key (docs/venues.md): "
        "minting and automatic rotation are refused there",
        field="venue",
    )
