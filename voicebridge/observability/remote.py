"""The client's address for log lines (``REMOTE=``), through the proxies the operator trusts.

Behind a proxy (nginx, a TLS terminator) every request comes from the proxy's address.
``server.trusted_proxies`` lists the proxies (addresses or CIDR networks) whose
``X-Forwarded-For`` (or, without it, ``Forwarded: for=``) header is believed: the
client is the right-most address in it that is not itself a trusted proxy, as each
proxy appends the address it received the request from. A peer that is not trusted is
the client, whatever headers it sends (anyone can write them); so is a trusted peer
whose header is missing or unreadable.

Only log lines use this: no decision (admission, rate limits, the ``[edge]`` caps) ever
depends on a header a client can write.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Final

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: At most this many addresses of a header are looked at (a chain of proxies is short;
#: a header that long is made up).
MAX_HOPS: Final = 16


@functools.lru_cache(maxsize=8)
def trusted_networks(trusted: tuple[str, ...]) -> tuple[IpNetwork, ...]:
    """The networks of ``server.trusted_proxies`` (validated by the configuration)."""
    return tuple(ipaddress.ip_network(text, strict=False) for text in trusted)


def client_address(
    peer: str,
    *,
    trusted: tuple[str, ...],
    forwarded_for: str | None = None,
    forwarded: str | None = None,
) -> str:
    """``peer`` (an address, ``host:port`` or ``[v6]:port``), or the client a trusted
    ``peer`` names in ``X-Forwarded-For`` / ``Forwarded``; see the module docstring."""
    if not trusted:
        return peer
    networks = trusted_networks(trusted)
    peer_ip = _ip(_host_of(peer))
    if peer_ip is None or not _is_trusted(peer_ip, networks):
        return peer
    if forwarded_for:
        chain = [part.strip() for part in forwarded_for.split(",")]
    elif forwarded:
        chain = _forwarded_for(forwarded)
    else:
        return peer
    ip = None
    for text in reversed(chain[-MAX_HOPS:]):
        ip = _ip(_host_of(text))
        if ip is None:
            return peer  # "unknown", an obfuscated name, or garbage: no client to name
        if not _is_trusted(ip, networks):
            return str(ip)
    # Every hop is trusted (a client on the proxy's own host or network): the left-most
    # one is the client, as nginx's real_ip_recursive decides.
    return str(ip) if ip is not None else peer


def _is_trusted(ip: IpAddress, networks: Sequence[IpNetwork]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == network.version and ip in network for network in networks)


def _ip(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _host_of(text: str) -> str:
    """The address of ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1`` or ``"[::1]"``."""
    text = text.strip().strip('"')
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def _forwarded_for(header: str) -> list[str]:
    """The ``for=`` values of an RFC 7239 ``Forwarded`` header, in order."""
    found: list[str] = []
    for element in header.split(","):
        for pair in element.split(";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "for":
                found.append(value.strip())
    return found
