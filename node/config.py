"""What a node is told: :class:`NodeConfig`, and the address helpers it needs.

Everything listens on 127.0.0.1 by default, so a node started without thinking reaches no other
machine. To accept peers from other machines, listen on all interfaces and say which address
they should dial: ``--host 0.0.0.0 --announce-host <public IP or DNS name> --port P --dht-port Q``
(and open TCP ports P and Q in the firewall).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, model_validator

from umm import paths
from umm.configfile import Strict
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


class NodeConfig(Strict):
    """Options of one node; see ``umm-node join --help`` for each. Frozen: derive a changed copy
    with ``model_copy(update=...)``."""

    model: Path = Field(description="Hugging Face model folder (safetensors) to contribute.")
    domains: list[str] = Field(description="Domains the model is an expert in (at least one).")
    name: str | None = Field(None, description="Name shown on the network (default: folder name).")
    network: str = Field(DEFAULT_NETWORK, description="Network name: peers of different networks ignore each other.")
    data_dir: Path = Field(default_factory=default_data_dir,
                           description="This node's directory: identity key, model store, logs.")
    identity_path: Path | None = Field(None, description="Identity key file (default: <data dir>/identity.key).")
    initial_peers: list[str] = Field(default_factory=list, description="Multiaddrs of running peers to bootstrap from.")
    coordinator_public_key: bytes | None = Field(
        None, description="The coordinator's public key; only merged models and scores it signed are trusted.")
    host: str = Field("127.0.0.1", description="Listen address of gRPC and the DHT. 0.0.0.0 (with --announce-host, "
                      "--port, --dht-port) accepts other machines.")
    port: int = Field(0, description="gRPC port (0: any free port).")
    dht_port: int = Field(0, description="DHT (libp2p TCP) port (0: any free port).")
    announce_host: str | None = Field(None, description="Address others dial (default: host).")
    refresh_period: float = Field(DEFAULT_REFRESH_PERIOD,
                                  description="Seconds between re-announcements; records expire after twice this.")
    watch_period: float | None = Field(None, description="Merged-model polling period (default: refresh_period / 2).")
    max_merged_bytes: int = Field(DEFAULT_MAX_MERGED_BYTES, description="Largest merged model to download.")
    max_model_bytes: int = Field(DEFAULT_MAX_MODEL_BYTES, description="Admission size limit for our own model.")
    self_scores: dict[str, float] = Field(default_factory=dict, description="Self-reported scores, task: score.")
    base_model: str | None = Field(None, description="The base model this expert was tuned from.")
    show_progress: bool = Field(True, description="Show progress bars of downloads.")

    @model_validator(mode="after")
    def _fits_together(self) -> NodeConfig:
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
        return self

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
