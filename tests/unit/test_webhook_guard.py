"""The SSRF guard's rules (engine.webhooks.guard): which addresses and URLs a webhook may target."""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from engine import errors
from engine.webhooks import guard


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.0.10", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.251", "multicast"),
        ("239.1.2.3", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to refuse, not one to bind
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.3.4", "not a public address"),  # shared address space (carrier-grade NAT)
        ("192.0.2.55", "private"),  # documentation
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("168.63.129.16", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:127.0.0.1", "loopback address (inside an IPv6 address)"),
        ("::ffff:10.1.1.1", "private address (inside an IPv6 address)"),
        ("64:ff9b::a00:1", "private address (inside an IPv6 address)"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", "loopback address (inside an IPv6 address)"),  # 6to4 of 127.0.0.1
        ("not-an-ip", "not an IP address"),
    ],
)
def test_non_public_addresses_are_named(address: str, problem: str) -> None:
    """Every non-public address is refused, with the reason in its message."""
    found = guard.address_problem(address)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("fec0::1", "site-local"),  # deprecated site-local (RFC 3879), called global
        ("fec0:0:0:1::5", "site-local"),
        ("feff:ffff::1", "site-local"),  # the top of fec0::/10
        ("3fff::1", "documentation"),  # RFC 9637
        ("2001:db8::1", ""),  # RFC 3849 documentation (ipaddress calls it private)
        ("::10.0.0.1", ""),  # IPv4-compatible (deprecated) of a private address
        ("::8.8.8.8", ""),  # IPv4-compatible even of a public one: no stack should route it
        ("::ffff:0:10.0.0.1", ""),  # IPv4-translated (SIIT)
        ("::ffff:169.254.169.254", "metadata address (inside an IPv6 address)"),
        ("64:ff9b::7f00:1", "loopback address (inside an IPv6 address)"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "metadata address (inside an IPv6 address)"),  # NAT64 of 169.254.169.254
        ("64:ff9b::c0a8:101", "private address (inside an IPv6 address)"),  # NAT64 of 192.168.1.1
        ("64:ff9b:1::a00:1", ""),  # local-use NAT64 (RFC 8215): whatever it embeds
        ("64:ff9b:1::808:808", ""),
        ("2002:a00:1::1", "private address (inside an IPv6 address)"),  # 6to4 of 10.0.0.1
        ("2002:a9fe:a9fe::1", "metadata address (inside an IPv6 address)"),  # 6to4 of 169.254.169.254
        ("2002:6440:1::", "not a public address (inside an IPv6 address)"),  # 6to4 of 100.64.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo"),  # Teredo, client 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "Teredo"),  # Teredo, client 8.8.8.8: still refused
        ("100::1", ""),  # discard-only
        ("5f00::1", ""),  # SRv6 SIDs
        ("192.88.99.1", "6to4 relay"),  # deprecated 6to4 relay anycast, called global by ipaddress
    ],
)
def test_special_ipv6_ranges_and_ipv4_inside_ipv6_are_refused(address: str, problem: str) -> None:
    """The IPv6 ranges ipaddress may call global (site-local first of all), and IPv6 forms that reach a
    non-public IPv4 address (mapped, compatible, translated, NAT64, 6to4, Teredo) are refused, in every Python
    version (an empty problem: the reason's wording differs between versions, the refusal does not)."""
    found = guard.address_problem(address)
    assert found is not None and problem in found, found


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "1.1.1.1",
        "8.8.8.8",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:1.1.1.1",  # IPv4-mapped of a public address
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8: how IPv6-only networks reach IPv4 receivers
        "2002:808:808::1",  # 6to4 of 8.8.8.8
    ],
)
def test_public_addresses_pass(address: str) -> None:
    """Public IPv4 and IPv6 addresses (also the IPv6 forms of public IPv4 ones) are allowed."""
    assert guard.address_problem(address) is None


@pytest.mark.parametrize(
    ("url", "allow_private", "reason"),
    [
        ("http://example.com/x", False, "https"),
        ("ftp://example.com/x", True, "http or https"),
        ("https:///x", False, "host"),
        ("https://user:pw@example.com/x", False, "user info"),
        ("https://example.com/x#frag", False, "fragment"),
        ("https://example.com/a b", False, "spaces"),
        ("https://example.com/" + "a" * 3000, False, "2048"),
        (42, False, "required"),
    ],
)
def test_url_shape_rules(url: object, allow_private: bool, reason: str) -> None:
    """URL shape rules hold whatever the flag says (only the scheme rule relaxes to http with it)."""
    with pytest.raises(errors.InvalidRequest) as info:
        guard.parse_url(url, allow_private=allow_private)
    assert info.value.field == "url" and reason in info.value.reason


def test_parse_url_normalizes_host_and_knows_ip_literals() -> None:
    """Hosts are lower-cased without a trailing dot; IPv6 literals lose their brackets; ports are filled in."""
    target = guard.parse_url("https://Hooks.Example.COM./in", allow_private=False)
    assert (target.host, target.port, target.is_ip) == ("hooks.example.com", 443, False)
    literal = guard.parse_url("http://[::1]:8080/x", allow_private=True)
    assert (literal.host, literal.port, literal.is_ip) == ("::1", 8080, True)


class Answers(AbstractResolver):
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_guarded_resolver_refuses_a_whole_answer_with_one_bad_address() -> None:
    """One non-public address among public ones refuses the whole answer (no partial connection)."""
    resolver = guard.GuardedResolver(allow_private=False, base=Answers(["1.1.1.1", "10.0.0.1"]))
    with pytest.raises(guard.AddressRefused, match="private"):
        await resolver.resolve("hooks.example.com", 443)
    fine = guard.GuardedResolver(allow_private=False, base=Answers(["1.1.1.1"]))
    assert [a["host"] for a in await fine.resolve("hooks.example.com", 443)] == ["1.1.1.1"]
    relaxed = guard.GuardedResolver(allow_private=True, base=Answers(["127.0.0.1"]))
    assert [a["host"] for a in await relaxed.resolve("localhost", 80)] == ["127.0.0.1"]


async def test_check_url_resolves_hostnames_only_without_the_flag() -> None:
    """check_url: hostnames are resolved and checked; with allow_private nothing is resolved."""
    assert await guard.check_url(
        "https://a.example/x", allow_private=False, resolver=Answers(["1.1.1.1"])
    ) == ("https://a.example/x")
    with pytest.raises(errors.InvalidRequest, match="loopback"):
        await guard.check_url("https://a.example/x", allow_private=False, resolver=Answers(["127.0.0.1"]))
    with pytest.raises(errors.InvalidRequest, match="does not resolve"):
        await guard.check_url("https://a.example/x", allow_private=False, resolver=Answers([]))
    assert await guard.check_url("http://localhost:1/x", allow_private=True, resolver=Answers([])) == (
        "http://localhost:1/x"
    )
