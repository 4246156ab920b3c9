"""Which address a request comes from, for per-IP limits and the admin listing.

The peer address, unless the peer is a trusted proxy (``HERALD_TRUSTED_PROXIES``): then
``X-Forwarded-For`` is read from the right, skipping trusted hops, and the first
untrusted address is the client. Everything left of it was written by that client and
proves nothing. A client not behind a trusted proxy cannot change its address by
sending the header.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence

from aiohttp import web

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN = "unknown"
# A real chain is a few hops; a header longer than this is only someone's padding.
MAX_HOPS = 32


def parse_ip(text: str) -> IPAddress | None:
    """An address from a peer name or a header entry: ``1.2.3.4``, ``1.2.3.4:5678``,
    ``::1``, ``[::1]:443``; IPv4-mapped IPv6 becomes IPv4. Anything else: None."""
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_trusted(addr: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


def resolve(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client address as a normalised string (interned: many streams share one)."""
    peer_addr = parse_ip(peer) if peer else None
    if peer_addr is None:
        return UNKNOWN
    client = peer_addr
    if trusted and is_trusted(peer_addr, trusted) and forwarded_for:
        hops = [h for value in forwarded_for for h in value.split(",")][-MAX_HOPS:]
        for hop in reversed(hops):
            addr = parse_ip(hop)
            if addr is None:
                # Garbage in the chain: nothing left of it can be believed; the last
                # address a trusted hop vouched for is the best we know.
                break
            client = addr
            if not is_trusted(addr, trusted):
                break
    return sys.intern(str(client))


def client_ip(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    host = peer[0] if isinstance(peer, tuple) and peer else None
    return resolve(host, request.headers.getall("X-Forwarded-For", []), trusted)
