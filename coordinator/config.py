"""The coordinator's configuration: a frozen pydantic model read from a commented YAML file.

``umm-coordinator init`` writes :data:`CONFIG_TEMPLATE` (every key with its default and what it
does) plus a key pair; ``umm-coordinator run --config FILE`` reads it with :func:`load_config`.
Unknown keys are an error that lists the valid ones. Relative paths resolve against the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from umm import configfile
from umm.atomic import write_text_atomic
from umm.checkpoints.budget import ModelBudget
from umm.errors import UmmError
from umm.net.addresses import DEFAULT_DENIED as _DEFAULT_DENIED
from umm.net.addresses import AddressPolicy

logger = logging.getLogger(__name__)

CONFIG_NAME = "coordinator.yaml"
KEY_NAME = "coordinator.key"


class CoordinatorConfigError(UmmError):
    """The coordinator config is missing, unreadable or invalid."""


class CoordinatorConfig(BaseModel):
    """Everything a coordinator needs; see :data:`CONFIG_TEMPLATE` for each key's meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    network: str = Field(default="umm", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    data_dir: Path = Path("data")
    key_path: Path = Path(KEY_NAME)
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    initial_peers: list[str] = Field(default_factory=list)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)
    status_port: int = Field(default=0, ge=0, le=65535)
    #: host:port written into records (what peers dial); empty: grpc_host and the bound port
    public_address: str = ""
    tasks: list[str] = Field(default_factory=lambda: ["synth-math", "synth-code"], min_length=1)
    eval_limit: int | None = Field(default=64, ge=1)
    test_limit: int | None = Field(default=64, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    eval_batch_size: int = Field(default=16, ge=1)
    eval_seed: int = 0
    device: str = "cpu"
    max_model_bytes: int = Field(default=64 * 10**9, ge=1)
    fetch_retries: int = Field(default=3, ge=1)
    fetch_timeout: float = Field(default=30.0, gt=0)
    fetch_min_rate: float = Field(default=64 * 1024, gt=0)
    fetch_concurrency: int = Field(default=4, ge=1, le=64)
    allowed_networks: list[str] = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    denied_networks: list[str] = Field(default_factory=lambda: list(_DEFAULT_DENIED))
    max_new_experts_per_round: int = Field(default=8, ge=1)
    max_new_experts_per_owner: int = Field(default=1, ge=1)
    max_new_experts_per_address: int = Field(default=1, ge=1)
    max_new_experts_per_host: int | None = Field(default=None, ge=1)
    fetch_backoff: float = Field(default=600.0, ge=0)
    fetch_backoff_max: float = Field(default=86400.0, ge=0)
    max_published_verdicts: int = Field(default=2000, ge=1)
    dht_timeout: float = Field(default=30.0, gt=0)
    round_interval: float = Field(default=600.0, ge=0)
    refresh_period: float = Field(default=60.0, gt=0)
    merge: bool = True
    evolve_method: str = "linear"
    evolve_evaluations: int = Field(default=40, ge=1)
    evolve_population: int | None = Field(default=None, ge=2)
    fusion_data: Path | None = None
    fusion_max_steps: int | None = Field(default=None, ge=1)
    job_timeout: float = Field(default=6 * 3600.0, gt=0)
    #: what an expert's config.json may ask for (layers, sizes, positions, vocabulary, parameters, buffers)
    model_budget: ModelBudget = Field(default_factory=ModelBudget)
    #: address-space limit (bytes) of the worker that admits or evaluates one expert; null: see expert_memory_bytes
    expert_memory_limit: int | None = Field(default=None, ge=256 * 2**20)
    admission_timeout: float = Field(default=1800.0, gt=0)
    evaluation_timeout: float = Field(default=7200.0, gt=0)

    @field_validator("allowed_networks", "denied_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"{net!r} is not an IP network in CIDR form: {e}") from None
        return v

    def address_policy(self) -> AddressPolicy:
        """Which provider addresses may be dialled (see :mod:`umm.net.addresses`)."""
        return AddressPolicy(allowed=tuple(self.allowed_networks), denied=tuple(self.denied_networks))

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        from umm.eval import list_tasks

        known = list_tasks()
        bad = [t for t in v if t not in known]
        if bad:
            raise ValueError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError("a task is listed twice")
        return v

    def resolved(self, base_dir: Path) -> CoordinatorConfig:
        """A copy whose relative paths are made absolute against ``base_dir``."""
        def fix(p: Path) -> Path:
            p = Path(os.path.expanduser(str(p)))
            return p if p.is_absolute() else (base_dir / p).resolve()

        update = {"data_dir": fix(self.data_dir), "key_path": fix(self.key_path)}
        if self.fusion_data is not None:
            update["fusion_data"] = fix(self.fusion_data)
        return self.model_copy(update=update)

    def expert_memory_bytes(self) -> int:
        """The expert workers' memory limit: ``expert_memory_limit``, else 2 × max_model_bytes + 4 GiB
        (the weights once loaded, a copy while they are converted, and the runtime itself)."""
        if self.expert_memory_limit is not None:
            return self.expert_memory_limit
        return 2 * self.max_model_bytes + 4 * 2**30

    def domains(self) -> dict[str, list[str]]:
        """Tasks by domain (the coordinator's benchmark)."""
        from umm.eval import get_task

        out: dict[str, list[str]] = {}
        for name in self.tasks:
            out.setdefault(get_task(name).domain, []).append(name)
        return out


def _valid_keys() -> str:
    return ", ".join(CoordinatorConfig.model_fields)


def parse_config(data: Any, *, source: str = "<dict>", base_dir: Path | None = None) -> CoordinatorConfig:
    """Validate ``data`` (a mapping); :class:`CoordinatorConfigError` names the bad key and lists valid ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CoordinatorConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    unknown = sorted(set(data) - set(CoordinatorConfig.model_fields))
    if unknown:
        raise CoordinatorConfigError(
            f"{source}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {_valid_keys()}"
        )
    try:
        config = CoordinatorConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: invalid coordinator config:"]
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top)"
            lines.append(f"  {where}: {err['msg']}")
        raise CoordinatorConfigError("\n".join(lines)) from None
    return config.resolved(base_dir) if base_dir is not None else config


def load_config(path: str | os.PathLike[str]) -> CoordinatorConfig:
    """Read and validate a coordinator YAML file (relative paths: against its folder)."""
    return configfile.load_config(path, parse_config, CoordinatorConfigError,
                                  missing_hint="; create one with `umm-coordinator init`")


CONFIG_TEMPLATE = """\
# umm coordinator configuration (written by `umm-coordinator init`).
# Relative paths are relative to this file. Unknown keys are an error.

# Name of the network (letters, digits, '-', '_'). Nodes join with the same name.
network: {network}
# Everything the coordinator writes: model store, partial downloads, state.db, job runs, logs.
data_dir: data
# RSA key: the coordinator's libp2p identity and the key that signs scores and merged records.
# Nodes must be given its public key (printed by `init`).
key_path: {key_name}

# --- DHT (hivemind / libp2p) ---
# Listen addresses; use /ip4/0.0.0.0/tcp/31337 to accept peers from other machines.
host_maddrs: ["/ip4/127.0.0.1/tcp/0"]
# Addresses announced to peers (empty: the listen addresses).
announce_maddrs: []
# Multiaddrs of running peers to join (empty: this coordinator starts the network).
initial_peers: []

# --- gRPC ---
# Checkpoint service (serves merged models) and status service; port 0 picks a free port.
grpc_host: 127.0.0.1
grpc_port: 0
status_port: 0
# host:port that peers dial for the checkpoint service (empty: grpc_host and the bound port).
public_address: ""

# --- verification: the coordinator's own benchmark (self-reported scores are never trusted) ---
# Evaluator task names (`umm eval --list`); each task's domain groups the leaderboard.
tasks: [synth-math, synth-code]
# Items per task on the `search` split for experts, and on the `test` split for merge results.
eval_limit: 64
test_limit: 64
# Override the tasks' generation length (null: each task's own).
max_new_tokens: null
eval_batch_size: 16
eval_seed: 0
# cpu, cuda, cuda:1, auto
device: cpu

# --- admission ---
# Models larger than this many bytes are rejected before download.
max_model_bytes: 64000000000
fetch_retries: 3
# Seconds without data before a stream is abandoned (and resumed later or elsewhere); also the
# window over which a provider must keep fetch_min_rate bytes/s, else it is dropped. Each file
# must arrive within fetch_timeout + size / fetch_min_rate seconds.
fetch_timeout: 30.0
fetch_min_rate: 65536
# Experts fetched at once in a round (each from its own providers).
fetch_concurrency: 4
# Provider addresses (host:port over TCP) are dialled only inside allowed_networks and outside
# denied_networks (CIDR). The default denies link-local (cloud metadata 169.254.169.254),
# multicast, unspecified and reserved ranges; loopback, private and public addresses are allowed.
allowed_networks: ["0.0.0.0/0", "::/0"]
denied_networks: [0.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4, 240.0.0.0/4, 100.100.100.200/32, "::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128"]
# What an expert's config.json may ask for, checked before anything is built from it; over any
# bound, the expert is rejected with the key and the bound named. The defaults admit every public
# model we know of (e.g. 126 layers, hidden 16384, 10M positions, a 256k vocabulary).
model_budget:
  max_layers: 1024
  max_hidden_size: 65536          # also bounds head_dim and the embedding width
  max_intermediate_size: 1048576
  max_attention_heads: 4096       # attention and key/value heads
  max_positions: 16777216         # max_position_embeddings, n_positions, n_ctx
  max_vocab_size: 2097152
  max_experts: 4096               # MoE experts per layer
  max_parameters: 2000000000000   # parameters stored in the safetensors files
  # Bytes of buffers the built model allocates but never stores (e.g. GPT-Neo's
  # max_position_embeddings^2 attention mask per layer), measured on the meta device.
  max_buffer_bytes: 536870912
# Admission and evaluation of each expert run in a worker process. On device cpu its address
# space is limited to expert_memory_limit bytes (null: 2 x max_model_bytes + 4 GiB); a worker
# that runs out of memory, is killed or exceeds its timeout (seconds) rejects that expert only.
expert_memory_limit: null
admission_timeout: 1800.0
evaluation_timeout: 7200.0
# Work per round is bounded, whatever is announced: at most this many experts without a verdict
# are fetched (then admitted and evaluated) per round, at most max_new_experts_per_owner per
# contributor key and max_new_experts_per_address per announced host:port. Order: fewest failed
# fetches, then highest self-reported score, then newest. The others wait for later rounds.
max_new_experts_per_round: 8
max_new_experts_per_owner: 1
max_new_experts_per_address: 1
# Also at most this many per announced host (IP or name; any port). null: no cap, as on a local
# network where every node is 127.0.0.1. On a public network, 1-2 stops one machine that
# announces many experts on many ports from filling the budget.
max_new_experts_per_host: null
# An expert whose fetch failed is retried at the next round once, then only after
# fetch_backoff * (2^(failures-1) - 1) seconds (600, 1800, 4200, ...), at most fetch_backoff_max.
fetch_backoff: 600.0
fetch_backoff_max: 86400.0
# Verdicts in the published scores record (ranked experts first). It is paged in the DHT: at
# most 128 pages of 32 KiB; verdicts that do not fit are left out.
max_published_verdicts: 2000
# Seconds a DHT read or write may take before it fails (the round goes on or fails cleanly).
dht_timeout: 30.0

# --- rounds ---
# Seconds between the end of one round and the start of the next.
round_interval: 600.0
# DHT records are re-stored every refresh_period seconds and expire after twice that.
refresh_period: 60.0
# Plan and run a merge (evolve) or fusion job each round; false: only verify and rank.
merge: true
# Merge method searched by CMA-ES for compatible experts (linear needs no base model).
evolve_method: linear
evolve_evaluations: 40
evolve_population: null
# Instruction-response JSONL for fusion when the best experts have different architectures
# (null: such rounds only verify and rank). fusion_max_steps bounds the pivot's training.
fusion_data: null
fusion_max_steps: null
# A job running longer than this many seconds is stopped and recorded as failed.
job_timeout: 21600.0
"""


def write_config(folder: str | os.PathLike[str], *, network: str = "umm", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``coordinator.yaml`` and a fresh key pair into ``folder``; returns (config, key) paths."""
    from umm.net.keys import generate_key, save_key

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_NAME
    key_path = folder / KEY_NAME
    if not overwrite and (config_path.exists() or key_path.exists()):
        raise CoordinatorConfigError(
            f"{config_path if config_path.exists() else key_path} already exists; "
            "pass --force to overwrite (a new key changes the coordinator's identity)"
        )
    parse_config({"network": network})  # validate the name before writing anything
    text = CONFIG_TEMPLATE.format(network=network, key_name=KEY_NAME)
    write_text_atomic(config_path, text)
    if key_path.exists():
        key_path.chmod(0o600)
    save_key(generate_key(), key_path)
    return config_path, key_path
