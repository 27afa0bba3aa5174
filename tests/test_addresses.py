"""The SSRF classifier: only global unicast addresses may be connected to by default."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.addresses import refusal_reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        # loopback
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        # RFC 1918
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        # carrier-grade NAT 100.64.0.0/10
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        # unique local fc00::/7
        ("fc00::1", "private"),
        ("fd12:3456:789a::1", "private"),
        # link-local, including the cloud metadata endpoint
        ("169.254.169.254", "link-local"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("febf::1", "link-local"),
        # unspecified
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        # multicast
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        # IPv4-mapped IPv6 is judged by the IPv4 address it carries
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:100.64.0.1", "carrier-grade NAT"),
        ("::ffff:0.0.0.0", "unspecified"),
        # NAT64 well-known prefix embedding a private IPv4 address
        ("64:ff9b::10.0.0.1", "private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        # 6to4 (2002::/16) carries an IPv4 address in bits 16-48
        ("2002:a00:1::1", "private"),
        ("2002:7f00:1::", "loopback"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2002:c0a8:101::", "private"),
        # deprecated site-local
        ("fec0::1", "site-local"),
    ],
)
def test_refused_addresses_and_their_reason(address: str, reason: str) -> None:
    assert refusal_reason(address) == reason


@pytest.mark.parametrize(
    "address",
    [
        "255.255.255.255",  # limited broadcast
        "240.0.0.1",  # reserved
        "192.0.2.1",  # documentation (TEST-NET-1)
        "198.51.100.7",  # documentation (TEST-NET-2)
        "203.0.113.9",  # documentation (TEST-NET-3)
        "198.18.0.1",  # benchmarking
        "2001:db8::1",  # documentation
        "100::1",  # discard-only
        "::a00:1",  # deprecated IPv4-compatible
        "::ffff:255.255.255.255",
        "64:ff9b::ffff:ffff",  # NAT64 of the broadcast address
    ],
)
def test_other_special_purpose_addresses_are_refused(address: str) -> None:
    assert refusal_reason(address) is not None


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.63.255.255",  # just below CGNAT
        "100.128.0.1",  # just above CGNAT
        "172.15.255.255",  # just below 172.16/12
        "172.32.0.1",  # just above 172.16/12
        "169.253.255.255",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",  # mapped public IPv4
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "64:ff9b::1.1.1.1",
        "2002:808:808::1",  # 6to4 of 8.8.8.8
    ],
)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(address) is None


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        (ipaddress.IPv4Address("10.1.2.3"), True),
        (ipaddress.IPv6Address("::ffff:192.168.0.1"), True),
        (ipaddress.IPv4Address("8.8.4.4"), False),
        (ipaddress.IPv6Address("2606:4700::6810:85e5"), False),
    ],
)
def test_address_objects_are_accepted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, refused: bool
) -> None:
    assert (refusal_reason(address) is not None) == refused
    assert refusal_reason(address) == refusal_reason(str(address))


@pytest.mark.parametrize("address", ["example.com", "10.0.0", "256.1.1.1", ""])
def test_non_addresses_raise(address: str) -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        refusal_reason(address)
