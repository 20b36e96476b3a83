"""What a node is told: :class:`NodeConfig`, and the address helpers it needs.

Everything listens on 127.0.0.1 by default, so a node started without thinking reaches no other
machine. To accept peers from other machines, listen on all interfaces and say which address
they should dial: ``--host 0.0.0.0 --announce-host <public IP or DNS name> --port P --dht-port Q``
(and open TCP ports P and Q in the firewall).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from umm import paths
from umm.errors import UmmError
from umm.net.records import DEFAULT_REFRESH_PERIOD

DEFAULT_NETWORK = "umm"
DEFAULT_MAX_MERGED_BYTES = 64 * 10**9
DEFAULT_MAX_MODEL_BYTES = 64 * 10**9
IDENTITY_NAME = "identity.key"


class NodeConfigError(UmmError):
    """The node's options do not fit together (e.g. a public listen address with nothing to announce)."""


def default_data_dir() -> Path:
    """``<umm home>/node``: identity key, model store and logs of the local node."""
    return paths.home() / "node"


@dataclass
class NodeConfig:
    """Options of one node; see ``umm-node join --help`` for each."""

    model: Path
    domains: list[str]
    name: str | None = None
    network: str = DEFAULT_NETWORK
    data_dir: Path = field(default_factory=default_data_dir)
    identity_path: Path | None = None  # default: <data_dir>/identity.key
    initial_peers: list[str] = field(default_factory=list)
    coordinator_public_key: bytes | None = None
    host: str = "127.0.0.1"  # gRPC and DHT listen address
    port: int = 0  # gRPC port (0: any free port)
    dht_port: int = 0  # DHT (libp2p) port (0: any free port)
    announce_host: str | None = None  # address others dial (default: host)
    refresh_period: float = DEFAULT_REFRESH_PERIOD  # records expire after twice this
    watch_period: float | None = None  # merged-model polling period (default: refresh_period / 2)
    max_merged_bytes: int = DEFAULT_MAX_MERGED_BYTES
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES  # admission limit for our own model
    self_scores: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.data_dir = Path(self.data_dir)
        if not self.domains:
            raise NodeConfigError("give at least one --domain the model is an expert in (e.g. --domain math)")
        if self.refresh_period <= 0:
            raise NodeConfigError(f"--refresh-period must be positive, got {self.refresh_period}")
        if self.watch_period is not None and self.watch_period <= 0:
            raise NodeConfigError(f"watch period must be positive, got {self.watch_period}")
        if self.max_merged_bytes <= 0:
            raise NodeConfigError("--max-merged-bytes must be positive")
        for p in (self.port, self.dht_port):
            if not 0 <= p <= 65535:
                raise NodeConfigError(f"port {p} is out of range 0-65535")
        _ip(self.host, "--host")
        if self.announce_host is None and _ip(self.host, "--host").is_unspecified:
            raise NodeConfigError(
                f"--host {self.host} listens on every interface: also give --announce-host, the address "
                "other machines reach this one at"
            )
        if self.announce_host is not None and self.announce_host != self.host and self.dht_port == 0:
            raise NodeConfigError("with --announce-host, give a fixed --dht-port so the announced DHT address is right")

    @property
    def identity(self) -> Path:
        return Path(self.identity_path) if self.identity_path is not None else self.data_dir / IDENTITY_NAME

    @property
    def poll_period(self) -> float:
        return self.watch_period if self.watch_period is not None else self.refresh_period / 2

    @property
    def advertised_host(self) -> str:
        return self.announce_host or self.host

    def host_maddrs(self) -> list[str]:
        return [maddr(self.host, self.dht_port)]

    def announce_maddrs(self) -> list[str] | None:
        if self.announce_host is None or self.announce_host == self.host:
            return None
        return [maddr(self.announce_host, self.dht_port)]


def _ip(host: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise NodeConfigError(f"{what} {host!r} is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)") from None


def maddr(host: str, port: int) -> str:
    """The libp2p multiaddr of ``host`` (IPv4, IPv6 or DNS name) and TCP ``port``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"/dns/{host}/tcp/{port}"
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC dials it (IPv6 in brackets)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"
