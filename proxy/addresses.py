"""SSRF guard: which resolved addresses an upstream connection may use.

Only global unicast addresses are allowed unless a policy opts in with
``allow_private_addresses``. IPv6 forms that carry an IPv4 address (mapped
``::ffff:10.0.0.1``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by
the IPv4 address they carry, so they cannot be used to sneak past the check.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal_reason(address: str | IPAddress) -> str | None:
    """Why `address` is not a public unicast address, or None when it is."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None
        embedded = ip.ipv4_mapped or nat64 or ip.sixtofour
        if embedded is not None:
            return refusal_reason(embedded)
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "carrier-grade NAT"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not global unicast"),
    )
    return next((reason for failed, reason in checks if failed), None)


def is_loopback_literal(host: str) -> bool:
    """`host` is an IP literal on the loopback (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
