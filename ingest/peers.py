"""Who may send studies to the listener: the ``BONEWATCH_DICOM_PEERS`` allow-list.

The list is ``AET`` or ``AET@host`` entries, comma-separated, or ``*`` for any caller. An empty
list accepts callers on loopback only, so a listener started without configuration cannot be fed
from the network. Host names are resolved once, when the listener starts.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ANY = "*"


class PeerListError(ValueError):
    """An entry of the allow-list cannot be used (empty, too long, or a host that is unknown)."""


@dataclass(frozen=True)
class Peer:
    """One allowed caller: an AE title (None for any) from a host (None for any host)."""

    ae_title: str | None
    host: str | None = None

    def __str__(self) -> str:
        name = self.ae_title or ANY
        return f"{name}@{self.host}" if self.host else name


@dataclass(frozen=True)
class PeerPolicy:
    """The parsed allow-list, hosts resolved to addresses.

    ``peers`` None means any caller; an empty tuple means callers on loopback only.
    """

    peers: tuple[Peer, ...] | None
    addresses: dict[str, frozenset[str]]

    def allows(self, calling_ae: str, address: str) -> bool:
        """Whether a caller with AE title ``calling_ae`` at IP ``address`` may associate."""
        if self.peers is None:
            return True
        if not self.peers:
            return is_loopback(address)
        ip = normal_ip(address)
        for peer in self.peers:
            if peer.ae_title is not None and peer.ae_title != calling_ae.strip():
                continue
            if peer.host is None or ip in self.addresses.get(peer.host, frozenset()):
                return True
        return False

    def describe(self) -> str:
        """The list as a log line shows it."""
        if self.peers is None:
            return "any caller (BONEWATCH_DICOM_PEERS=*)"
        if not self.peers:
            return "callers on loopback only (BONEWATCH_DICOM_PEERS is empty)"
        return ", ".join(str(p) for p in self.peers)


def parse_peers(text: str) -> tuple[Peer, ...] | None:
    """The entries of an allow-list; None for ``*`` (anyone), () for an empty list.

    Raises:
        PeerListError: an entry with an empty or over-long AE title, or an empty host.
    """
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if ANY in entries:
        if len(entries) > 1:
            raise PeerListError("'*' allows any caller; give it alone")
        return None
    peers = []
    for entry in entries:
        name, at, host = entry.partition("@")
        name, host = name.strip(), host.strip()
        if not name or len(name) > 16:
            raise PeerListError(f"peer {entry!r}: an AE title is 1 to 16 characters")
        if at and not host:
            raise PeerListError(f"peer {entry!r}: nothing after '@'")
        peers.append(Peer(None if name == ANY else name, host or None))
    return tuple(peers)


def resolve_policy(
    text: str,
    resolve: Callable[[str], Iterable[str]] | None = None,
) -> PeerPolicy:
    """Parse ``text`` and resolve each host once.

    Raises:
        PeerListError: a bad entry, or a host name that does not resolve.
    """
    peers = parse_peers(text)
    resolve = resolve or _resolve
    addresses: dict[str, frozenset[str]] = {}
    for peer in peers or ():
        if peer.host is not None and peer.host not in addresses:
            try:
                addresses[peer.host] = frozenset(normal_ip(a) for a in resolve(peer.host))
            except OSError as exc:
                raise PeerListError(f"peer {peer}: host {peer.host!r} does not resolve") from exc
    return PeerPolicy(peers, addresses)


def _resolve(host: str) -> list[str]:
    try:
        return [normal_ip(host)]
    except ValueError:
        pass
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})


def normal_ip(address: str) -> str:
    """An IP address in one spelling: IPv4-mapped IPv6 (``::ffff:10.0.0.1``) as IPv4.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(normal_ip(address)).is_loopback
    except ValueError:
        return False
