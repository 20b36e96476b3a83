"""Peer addresses: what a record may name, and what a client may dial.

A record's address is untrusted: a peer could name a unix socket (``unix:``, ``unix-abstract:``),
another resolver (``dns:``), or a cloud metadata service (``169.254.169.254``) and make whoever
reads the record connect there. So an address is accepted only as ``host:port`` over TCP:

- ``host`` is an IPv4 literal, an IPv6 literal in brackets (``[::1]:5000``) or a plain DNS
  hostname (letters, digits, ``-`` and dots, RFC 1123 labels); nothing else (no scheme, path,
  user, spaces);
- ``port`` is 1-65535;
- an IP (given, or each one a hostname resolves to) must lie in the policy's allowed networks and
  outside its denied ones. :data:`DEFAULT_DENIED` holds the ranges no peer has a reason to name:
  unspecified, "this network", link-local (which holds the metadata services), multicast,
  reserved/broadcast and the known metadata addresses outside link-local. Loopback, private and
  public unicast stay allowed, so a local network on 127.0.0.1 works.

:func:`check_address` is the syntax and literal-IP check (records use it); :func:`dial_target`
checks again right before dialling, resolves a hostname itself (with a time limit) and returns a
gRPC target with an explicit ``ipv4:``/``ipv6:`` scheme, so what is dialled is exactly the IP that
was checked (no second resolution, no scheme read from the record).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from umm.net.errors import AddressError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_ADDRESS_CHARS = 256
DEFAULT_ALLOWED = ("0.0.0.0/0", "::/0")
DEFAULT_DENIED = (
    "0.0.0.0/8",  # "this network", unspecified
    "169.254.0.0/16",  # IPv4 link-local: 169.254.169.254 is the metadata service of most clouds
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the broadcast 255.255.255.255
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "::/128",  # unspecified
    "fe80::/10",  # IPv6 link-local
    "ff00::/8",  # multicast
    "fd00:ec2::254/128",  # AWS metadata over IPv6
)
DEFAULT_RESOLVE_TIMEOUT = 5.0

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
# gRPC reads "name:rest" as a URI when "name" is a scheme it knows; refuse such hostnames outright
_GRPC_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p"})


def _networks(specs: Iterable[str], what: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(s, strict=False) for s in specs)
    except (TypeError, ValueError) as e:
        raise AddressError(f"invalid {what} network: {e}") from None


@dataclass(frozen=True)
class AddressPolicy:
    """Which IPs may be dialled: in ``allowed`` and not in ``denied`` (CIDR strings)."""

    allowed: tuple[str, ...] = DEFAULT_ALLOWED
    denied: tuple[str, ...] = DEFAULT_DENIED
    resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", _networks(self.allowed, "allowed"))
        object.__setattr__(self, "_denied", _networks(self.denied, "denied"))
        if not self.resolve_timeout > 0:
            raise AddressError("resolve_timeout must be positive")

    def check_ip(self, ip: IPAddress, address: str) -> None:
        """:class:`AddressError` naming the reason when ``ip`` may not be dialled."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # judge ::ffff:a.b.c.d as a.b.c.d
        for net in self._denied:  # type: ignore[attr-defined]
            if ip.version == net.version and ip in net:
                raise AddressError(f"address {address!r}: {ip} is in the forbidden range {net}")
        if not any(ip.version == n.version and ip in n for n in self._allowed):  # type: ignore[attr-defined]
            raise AddressError(f"address {address!r}: {ip} is not in an allowed range ({', '.join(self.allowed)})")


DEFAULT_POLICY = AddressPolicy()


def split_address(address: object) -> tuple[str, IPAddress | None, int]:
    """``(host, ip or None for a hostname, port)`` of a ``host:port`` string; AddressError if malformed."""
    if not isinstance(address, str):
        raise AddressError(f"address {address!r} is not a string")
    if not 3 <= len(address) <= MAX_ADDRESS_CHARS:
        raise AddressError(f"address {address[:60]!r} is not 3-{MAX_ADDRESS_CHARS} characters long")
    host, sep, port = address.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise AddressError(f"address {address!r} is not host:port with a TCP port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return host, ipaddress.IPv6Address(host[1:-1]), int(port)
        except ValueError:
            raise AddressError(f"address {address!r}: {host} is not an IPv6 address") from None
    try:
        return host, ipaddress.IPv4Address(host), int(port)
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise AddressError(
            f"address {address!r}: {host!r} is not an IPv4 address, a bracketed IPv6 address or a hostname "
            "(only host:port over TCP is accepted: no scheme such as unix: or dns:)"
        )
    if host.lower() in _GRPC_SCHEMES:
        raise AddressError(f"address {address!r}: {host!r} is a gRPC target scheme, not a host")
    return host, None, int(port)


def check_address(address: object, policy: AddressPolicy = DEFAULT_POLICY) -> str:
    """``address`` if it is an acceptable ``host:port`` (a literal IP must pass ``policy``)."""
    _, ip, _ = split_address(address)
    if ip is not None:
        policy.check_ip(ip, str(address))
    return str(address)


def _resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """The IPs of ``host`` (TCP), looked up in a daemon thread so the wait is bounded."""
    out: list = []

    def lookup() -> None:
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except OSError as e:
            out.append(e)

    t = threading.Thread(target=lookup, name="umm-resolve", daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise AddressError(f"cannot resolve {host!r} within {timeout:.0f} s")
    if isinstance(out[0], OSError):
        raise AddressError(f"cannot resolve {host!r}: {out[0]}")
    ips = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in out[0]))
    if not ips:
        raise AddressError(f"{host!r} resolves to no address")
    return ips


def dial_target(address: str, policy: AddressPolicy = DEFAULT_POLICY) -> str:
    """The gRPC target to dial for ``address``, checked now (see module docstring)."""
    host, ip, port = split_address(address)
    ips = [ip] if ip is not None else _resolve(host, port, policy.resolve_timeout)
    for one in ips:  # every resolved IP must pass: a name must not smuggle in a forbidden one
        policy.check_ip(one, address)
    first = ips[0]
    return f"ipv4:{first}:{port}" if first.version == 4 else f"ipv6:[{first}]:{port}"
