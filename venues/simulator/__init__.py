"""An exchange simulator: the private endpoints the probes use, for all five venues, over real HTTP.

It also trades a little (docs/venues.md §x.9): for each of the seven APIs (Binance spot and USD-M, OKX,
Bybit, Coinbase Advanced Trade and Exchange, Kraken Spot and Futures) the public endpoints a ccxt client
needs to load two markets, and signed balances, limit orders, cancels and open orders, with balances that
change (:mod:`venues.simulator.trading`; no matching: orders rest). Every request that claims a key is
recorded with the key, path, time and whether it authenticated (``Simulator.signed_requests``, admin
``GET /requests``), so a test can show that no request was signed with a revoked key after some moment.

It answers with the *same* authentication rules as the exchanges (signatures, timestamp windows, Kraken
nonces, OKX passphrases, Coinbase JWT claims, IP allow-lists, key expiry), their documented answers and
error codes, from a registry of test accounts; faults (latency, errors, timeouts, 429 with Retry-After,
malformed bodies) can be injected per venue. Tests, the demo and the benchmarks run against it; so can
users, as people use moto for AWS::

    from venues import simulator

    async with simulator.Simulator(seed=1) as sim:
        key = sim.add_key(Venue.BINANCE, withdraw=False)
        probe = build_probe(Venue.BINANCE, session, base_url=sim.urls[Venue.BINANCE])
        result = await probe.probe(key.api_keys)

Standalone: ``python -m venues.simulator --seed-demo`` (or ``credential-engine simulator``). Rules the
probes and the simulator share where docs/venues.md is silent are in venues/README.md ("contract").
"""

from __future__ import annotations

from venues.simulator.faults import Faults
from venues.simulator.registry import TestKey
from venues.simulator.server import Simulator
from venues.simulator.signlog import SignedRequest
from venues.simulator.stats import VenueStats

__all__ = ["Faults", "SignedRequest", "Simulator", "TestKey", "VenueStats"]
