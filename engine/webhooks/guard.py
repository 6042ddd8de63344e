"""The SSRF guard for webhook URLs: which URLs an endpoint may have and which addresses a delivery may reach.

An endpoint URL is an address that users choose and the engine then calls from inside the platform's
network, so it is checked twice:

* **at creation** (:func:`check_url`): https only, no user info, a sane length; an IP literal must be public;
  a hostname must resolve, and every address it resolves to must be public;
* **at delivery** (:class:`GuardedResolver`): the webhook session's connector resolves hostnames through this
  resolver, which refuses the whole answer when any address is not public, and the connector then connects to
  exactly the addresses that were checked. A name that resolved to a public address at creation and to
  127.0.0.1 at delivery (DNS rebinding) is refused without a connection; IP literals never reach a resolver,
  so :func:`check_url` runs again before each attempt.

"Not public" is: loopback, private (RFC 1918, ULA), link-local, multicast, reserved, unspecified, shared
(100.64/10), documentation and benchmarking ranges (whatever :mod:`ipaddress` does not call global); the
ranges that some Python versions call global but are not (:data:`SPECIAL_IPV6`: deprecated site-local
fec0::/10, documentation 3fff::/20, local-use NAT64, IPv4-compatible and IPv4-translated forms, SRv6 SIDs;
:data:`SPECIAL_IPV4`: the deprecated 6to4 relay anycast); IPv6 forms of a non-public IPv4 address
(IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16: judged by the IPv4 address they reach); every Teredo
address (2001::/32, a client-side NAT traversal tunnel, never a receiver); and the cloud metadata services,
some of which sit on public addresses (Azure's 168.63.129.16). ``allow_private=True``
(``EngineConfig.allow_private_webhook_urls``, for tests and sandboxes) lifts the address rules and allows
http; the URL shape rules stay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from engine import errors

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT = 5.0  # seconds for the creation-time DNS lookup

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean ... instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::23",  # AWS Nitro DNS / time
        "168.63.129.16",  # Azure wire server (a public address)
        "100.100.100.200",  # Alibaba Cloud metadata
        "192.0.0.192",  # Oracle Cloud metadata
    )
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
_NAT64 = ipaddress.ip_network(
    "64:ff9b::/96"
)  # RFC 6052 well-known prefix: the IPv4 address is the last 32 bits
# IPv6 ranges that are not public but that ipaddress calls global in some or all Python versions (3.11 judges
# IPv6 is_global as "not is_private"; site-local is in no version's private list), from the IANA IPv6
# Special-Purpose Address Registry and the RFCs named
SPECIAL_IPV6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("fec0::/10", "a site-local address (deprecated by RFC 3879, still routed inside some networks)"),
        ("3fff::/20", "a documentation address (RFC 9637)"),
        ("2001:db8::/32", "a documentation address (RFC 3849)"),
        ("64:ff9b:1::/48", "a local-use NAT64 address (RFC 8215)"),
        ("::/96", "an IPv4-compatible address (deprecated, RFC 4291 2.5.5.1)"),
        ("::ffff:0:0:0/96", "an IPv4-translated address (RFC 2765)"),
        ("100::/64", "a discard-only address (RFC 6666)"),
        ("5f00::/16", "an SRv6 segment identifier (RFC 9602)"),
    )
)
SPECIAL_IPV4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("192.88.99.0/24"), "a 6to4 relay anycast address (deprecated, RFC 7526)"),
)


class AddressRefused(Exception):
    """A delivery target resolved to an address the guard refuses. The message names host and reason only."""


def address_problem(address: str | IPAddress) -> str | None:
    """Why ``address`` may not be called (e.g. ``"loopback"``), or None when it is a public address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    except ValueError:
        return "not an IP address"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            return "a Teredo tunnel address"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            problem = address_problem(embedded)
            return None if problem is None else f"{problem} (inside an IPv6 address)"
    for name, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if flag:
            return f"a {name} address"
    # separate tables: ipaddress's "in" does not check the version (an IPv4 address is "in" ::/96)
    specials = SPECIAL_IPV6 if isinstance(ip, ipaddress.IPv6Address) else SPECIAL_IPV4
    for network, why in specials:
        if ip in network:
            return why
    if not ip.is_global:
        return "not a public address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches: IPv4-mapped, NAT64 (well-known prefix) or 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: its host (IDNA-encoded, no brackets) and port, and whether the host is an IP literal."""

    url: URL
    host: str
    port: int
    is_ip: bool


def parse_url(url: object, *, allow_private: bool) -> Target:
    """Check the URL's shape (not its addresses). :class:`errors.InvalidRequest` naming ``url`` otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise errors.InvalidRequest("url", "is required")
    text = url.strip()
    if len(text) > MAX_URL_LENGTH:
        raise errors.InvalidRequest("url", f"must be at most {MAX_URL_LENGTH} characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in text):
        raise errors.InvalidRequest("url", "must not contain spaces or control characters")
    try:
        parsed = URL(text)
        host = parsed.raw_host
        port = parsed.port
    except (ValueError, UnicodeError):
        raise errors.InvalidRequest("url", "is not a valid URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in schemes:
        raise errors.InvalidRequest(
            "url", "must use https" if not allow_private else "must use http or https"
        )
    if not host or port is None:
        raise errors.InvalidRequest("url", "must name a host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise errors.InvalidRequest("url", "must not carry user info (user:password@); sign with the secret")
    if parsed.fragment:
        raise errors.InvalidRequest("url", "must not have a fragment")
    host = host.rstrip(".").lower()
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        is_ip = True
    except ValueError:
        is_ip = False
    return Target(url=parsed, host=host, port=port, is_ip=is_ip)


def refusal(host: str, addresses: Iterable[str]) -> str | None:
    """Why a host with these resolved addresses is refused (the first bad one), or None."""
    if host in METADATA_HOSTS or host.endswith(".metadata.google.internal"):
        return f"{host} is a cloud metadata service"
    for address in addresses:
        problem = address_problem(address)
        if problem is not None:
            return f"{host} resolves to {problem}"
    return None


async def check_url(url: object, *, allow_private: bool, resolver: AbstractResolver) -> str:
    """The URL an endpoint may have (trimmed), checked as the module docstring says, resolving its host."""
    target = parse_url(url, allow_private=allow_private)
    if allow_private:
        return str(target.url)
    if target.is_ip:
        addresses = [target.host]
    else:
        try:
            answers = await _resolve(resolver, target.host, target.port)
        except (OSError, TimeoutError):
            raise errors.InvalidRequest("url", f"the host {target.host} does not resolve") from None
        addresses = [a["host"] for a in answers]
        if not addresses:
            raise errors.InvalidRequest("url", f"the host {target.host} does not resolve")
    why = refusal(target.host, addresses)
    if why is not None:
        raise errors.InvalidRequest("url", f"must reach a public address: {why}")
    return str(target.url)


async def _resolve(resolver: AbstractResolver, host: str, port: int) -> list[ResolveResult]:
    async with asyncio.timeout(RESOLVE_TIMEOUT):
        return await resolver.resolve(host, port, family=socket.AF_UNSPEC)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses a whole answer when any address in it is not public.

    ``allow_private`` passes every answer through. ``base`` does the lookups (aiohttp's threaded resolver by
    default; tests give a fake one). It does not close ``base`` unless it made it.
    """

    def __init__(self, *, allow_private: bool, base: AbstractResolver | None = None) -> None:
        from aiohttp.resolver import ThreadedResolver

        self.allow_private = allow_private
        self._owns_base = base is None
        self.base: AbstractResolver = base if base is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self.base.resolve(host, port, family)
        if not self.allow_private:
            why = refusal(host.rstrip(".").lower(), [a["host"] for a in answers])
            if why is not None:
                raise AddressRefused(why)
        return answers

    async def close(self) -> None:
        if self._owns_base:
            await self.base.close()
