"""The coordinator's configuration: a frozen pydantic model read from a commented YAML file.

Every key has one owner, its field here: its default and its description. ``umm-coordinator
init`` writes :func:`config_template` (generated from those fields: each key with its default
and what it does) plus a key pair; ``umm-coordinator run --config FILE`` reads it with
:func:`load_config`. Unknown keys are an error that lists the valid ones. Relative paths resolve
against the file.

The ``evolve`` and ``fusion`` sections and ``margin`` are the library's own settings of
:func:`umm.combine.run.run_combine` (:class:`umm.combine.config.CombineSettings`, with the
coordinator's defaults; the round decides the experts, pivot, tasks, device and seed); a round's
job nests them unchanged (:mod:`coordinator.jobspec`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import to_jsonable_python

from umm import configfile
from umm.atomic import write_text_atomic
from umm.checkpoints.budget import ModelBudget
from umm.combine.config import CombineSettings, FusionStageSettings
from umm.errors import UmmError
from umm.eval.backends import Backend
from umm.eval.generate import DEFAULT_BACKEND
from umm.evolve.config import Budget
from umm.evolve.config import EvolveSettings as LibraryEvolveSettings
from umm.fusion.settings import TrainingSettings
from umm.net.addresses import DEFAULT_DENIED as _DEFAULT_DENIED
from umm.net.addresses import AddressPolicy

logger = logging.getLogger(__name__)

CONFIG_NAME = "coordinator.yaml"
KEY_NAME = "coordinator.key"


class CoordinatorConfigError(UmmError):
    """The coordinator config is missing, unreadable or invalid."""


class EvolveSettings(LibraryEvolveSettings):
    """The CMA-ES merge of a round's pivot family: the library's
    :class:`umm.evolve.config.EvolveSettings`, with the coordinator's default ``budget``. The round
    decides the rest (experts, tasks, device, seed)."""

    budget: Budget = Field(default_factory=lambda: Budget(evaluations=40),
                           description="Candidates (evaluations) and wall time (seconds) of one search.")


class FusionSettings(FusionStageSettings):
    """The pairwise fusion of a round's experts of other families into the pivot's family: the
    library's :class:`umm.combine.config.FusionStageSettings`, with the coordinator's defaults."""

    data: Path | None = Field(None, description=(
        "Instruction-response JSONL for fusion when the best experts have different architectures "
        "(null: such rounds only verify and rank)."))
    max_length: int = Field(512, ge=2, description="Longest training sequence (prompt + response) in tokens.")


def _section(title: str) -> dict[str, Any]:
    """Marks the first field of a group of keys: the template writes ``# --- title ---`` above it."""
    return {"section": title}


class CoordinatorConfig(configfile.Strict):
    """Everything a coordinator needs; each field's description says what it does."""

    network: str = Field("umm", pattern=r"^[A-Za-z0-9_-]{1,64}$", description=(
        "Name of the network (letters, digits, '-', '_'). Nodes join with the same name."))
    data_dir: Path = Field(Path("data"), description=(
        "Everything the coordinator writes: model store, partial downloads, state.db, job runs, logs."))
    key_path: Path = Field(Path(KEY_NAME), description=(
        "RSA key: the coordinator's libp2p identity and the key that signs scores and merged records. "
        "Nodes must be given its public key (printed by `init`)."))
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"], description=(
        "Listen addresses; use /ip4/0.0.0.0/tcp/31337 to accept peers from other machines."),
        json_schema_extra=_section("DHT (hivemind / libp2p)"))
    announce_maddrs: list[str] = Field(default_factory=list, description=(
        "Addresses announced to peers (empty: the listen addresses)."))
    initial_peers: list[str] = Field(default_factory=list, description=(
        "Multiaddrs of running peers to join (empty: this coordinator starts the network)."))
    grpc_host: str = Field("127.0.0.1", description=(
        "Host of the checkpoint service (serves merged models) and the status service."),
        json_schema_extra=_section("gRPC"))
    grpc_port: int = Field(0, ge=0, le=65535, description="Port of the checkpoint service (0: a free port).")
    status_port: int = Field(0, ge=0, le=65535, description="Port of the status service (0: a free port).")
    dashboard: str | None = Field(None, description=(
        "HOST:PORT of the read-only web dashboard (null: off; a bare :PORT binds 127.0.0.1; "
        "`run --dashboard` overrides it)."))
    public_address: str = Field("", description=(
        "host:port that peers dial for the checkpoint service, written into records "
        "(empty: grpc_host and the bound port)."))
    tasks: list[str] = Field(default_factory=lambda: ["synth-math", "synth-code"], min_length=1, description=(
        "Evaluator task names (`umm eval --list`); each task's domain groups the leaderboard."),
        json_schema_extra=_section("verification: the coordinator's own benchmark "
                                   "(self-reported scores are never trusted)"))
    eval_limit: int | None = Field(64, ge=1, description="Items per task on the `search` split, for experts.")
    test_limit: int | None = Field(64, ge=1, description="Items per task on the `test` split, for merge results.")
    max_new_tokens: int | None = Field(None, ge=1, description=(
        "Override the tasks' generation length (null: each task's own)."))
    eval_batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    eval_backend: Backend = Field(DEFAULT_BACKEND, description=(
        "Who generates the benchmark's completions: loop (PyTorch, umm's decoding), hf, vllm (umm[vllm], a CUDA "
        "GPU; else the evaluation fails with the reason) or auto (vllm when it can run, else loop). "
        "The evolve section has its own backend key."))
    eval_seed: int = Field(0, description="Seed of the evaluated subsets (and, plus the round number, of a search).")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, auto")
    max_model_bytes: int = Field(64 * 10**9, ge=1, description=(
        "Models larger than this many bytes are rejected before download."),
        json_schema_extra=_section("admission"))
    fetch_retries: int = Field(3, ge=1, description="Attempts per provider and file.")
    fetch_timeout: float = Field(30.0, gt=0, description=(
        "Seconds without data before a stream is abandoned (and resumed later or elsewhere); also the "
        "window over which a provider must keep fetch_min_rate bytes/s, else it is dropped. Each file "
        "must arrive within fetch_timeout + size / fetch_min_rate seconds."))
    fetch_min_rate: float = Field(64 * 1024, gt=0, description="Bytes/s a provider must keep (see fetch_timeout).")
    fetch_concurrency: int = Field(4, ge=1, le=64, description=(
        "Experts fetched at once in a round (each from its own providers)."))
    allowed_networks: list[str] = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"], description=(
        "Provider addresses (host:port over TCP) are dialled only inside allowed_networks and outside "
        "denied_networks (CIDR)."))
    denied_networks: list[str] = Field(default_factory=lambda: list(_DEFAULT_DENIED), description=(
        "The default denies link-local (cloud metadata 169.254.169.254), multicast, unspecified and "
        "reserved ranges; loopback, private and public addresses are allowed."))
    model_budget: ModelBudget = Field(default_factory=ModelBudget, description=(
        "What an expert's config.json may ask for, checked before anything is built from it; over any "
        "bound, the expert is rejected with the key and the bound named. The defaults admit every public "
        "model we know of (e.g. 126 layers, hidden 16384, 10M positions, a 256k vocabulary)."))
    expert_memory_limit: int | None = Field(None, ge=256 * 2**20, description=(
        "Admission and evaluation of each expert run in a worker process. On device cpu its address "
        "space is limited to expert_memory_limit bytes (null: 2 x max_model_bytes + 4 GiB); a worker "
        "that runs out of memory, is killed or exceeds its timeout (seconds) rejects that expert only."))
    admission_timeout: float = Field(1800.0, gt=0, description="Seconds one expert's admission may take.")
    evaluation_timeout: float = Field(7200.0, gt=0, description="Seconds one model's evaluation may take.")
    max_new_experts_per_round: int = Field(8, ge=1, description=(
        "Work per round is bounded, whatever is announced: at most this many experts without a verdict "
        "are fetched (then admitted and evaluated) per round, at most max_new_experts_per_owner per "
        "contributor key and max_new_experts_per_address per announced host:port. Order: fewest failed "
        "fetches, then highest self-reported score, then newest. The others wait for later rounds."))
    max_new_experts_per_owner: int = Field(1, ge=1, description="See max_new_experts_per_round.")
    max_new_experts_per_address: int = Field(1, ge=1, description="See max_new_experts_per_round.")
    max_new_experts_per_host: int | None = Field(None, ge=1, description=(
        "Also at most this many per announced host (IP or name; any port). null: no cap, as on a local "
        "network where every node is 127.0.0.1. On a public network, 1-2 stops one machine that "
        "announces many experts on many ports from filling the budget."))
    fetch_backoff: float = Field(600.0, ge=0, description=(
        "An expert whose fetch failed is retried at the next round once, then only after "
        "fetch_backoff * (2^(failures-1) - 1) seconds (600, 1800, 4200, ...), at most fetch_backoff_max."))
    fetch_backoff_max: float = Field(86400.0, ge=0, description="See fetch_backoff.")
    max_published_verdicts: int = Field(2000, ge=1, description=(
        "Verdicts in the published scores record (ranked experts first). It is paged in the DHT: at "
        "most 128 pages of 32 KiB; verdicts that do not fit are left out."))
    dht_timeout: float = Field(30.0, gt=0, description=(
        "Seconds a DHT read or write may take before it fails (the round goes on or fails cleanly)."))
    round_interval: float = Field(600.0, ge=0, description=(
        "Seconds between the end of one round and the start of the next."),
        json_schema_extra=_section("rounds"))
    refresh_period: float = Field(60.0, gt=0, description=(
        "DHT records are re-stored every refresh_period seconds and expire after twice that."))
    merge: bool = Field(True, description=(
        "Plan and run a merge job each round (fuse other families into the pivot's, then a CMA-ES merge "
        "of the family); false: only verify and rank."))
    base_model: Path | None = Field(None, description=(
        "Folder of the base model the experts were fine-tuned from (their task vectors are taken from it "
        "when it has the pivot's architecture and tokenizer; null or another family: the pivot is the base)."))
    margin: float = Field(0.0, description=(
        "A merged model is published only when the 95% paired-bootstrap lower bound of its test objective "
        "minus the best source's, and minus the previously published model's, is above this."))
    evolve: EvolveSettings = Field(default_factory=EvolveSettings, description=(
        "The merge search for compatible experts: the keys of `umm evolve`'s config (examples/evolve.yaml) "
        "that a round does not decide itself (models, tasks, device, seed are the round's)."))
    fusion: FusionSettings = Field(default_factory=FusionSettings, description=(
        "Pairwise fusion into the pivot's family of the best experts of other architectures "
        "(the keys of `umm fuse`'s config that a round does not decide)."))
    job_timeout: float = Field(6 * 3600.0, gt=0, description=(
        "A job running longer than this many seconds is stopped and recorded as failed."))

    @field_validator("allowed_networks", "denied_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"{net!r} is not an IP network in CIDR form: {e}") from None
        return v

    @field_validator("dashboard")
    @classmethod
    def _dashboard(cls, v: str | None) -> str | None:
        from coordinator.dashboard.address import DashboardError, parse_bind

        if v is not None:
            try:
                parse_bind(v)
            except DashboardError as e:
                raise ValueError(str(e)) from None
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
        """A copy whose paths follow the path rule of :mod:`umm.configfile` (relative: against ``base_dir``)."""
        def fix(p: Path) -> Path:
            return Path(configfile.resolve_path(p, base_dir))

        update: dict[str, Any] = {"data_dir": fix(self.data_dir), "key_path": fix(self.key_path)}
        if self.base_model is not None:
            update["base_model"] = fix(self.base_model)
        if self.fusion.data is not None:
            update["fusion"] = self.fusion.model_copy(update={"data": fix(self.fusion.data)})
        return self.model_copy(update=update)

    def combine_settings(self) -> CombineSettings:
        """The library's settings of a round's job: these ``evolve``, ``fusion`` and ``margin``."""
        return CombineSettings(evolve=self.evolve, fusion=self.fusion, margin=self.margin)

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


#: each section's model, so that an unknown key lists the valid keys of its own section
_SECTIONS: dict[str, type[BaseModel]] = {
    "": CoordinatorConfig, "model_budget": ModelBudget, "evolve": EvolveSettings, "budget": Budget,
    "fusion": FusionSettings, "training": TrainingSettings,
}


def parse_config(data: Any, *, source: str = "<dict>", base_dir: Path | None = None) -> CoordinatorConfig:
    """Validate ``data`` (a mapping; None: every default); :class:`CoordinatorConfigError` lists every
    problem, naming the key (and for an unknown key the valid ones of its section)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CoordinatorConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        config = CoordinatorConfig.model_validate(data)
    except ValidationError as e:
        raise CoordinatorConfigError(configfile.explain(e, f"invalid coordinator config {source}:", _SECTIONS)) from None
    return config.resolved(base_dir) if base_dir is not None else config


def load_config(path: str | os.PathLike[str]) -> CoordinatorConfig:
    """Read and validate a coordinator YAML file (relative paths: against its folder)."""
    return configfile.load_config(path, parse_config, CoordinatorConfigError,
                                  missing_hint="; create one with `umm-coordinator init`")


_TEMPLATE_HEADER = """\
# umm coordinator configuration (written by `umm-coordinator init`).
# Relative paths are relative to this file. Unknown keys are an error."""


def config_template(config: CoordinatorConfig | None = None) -> str:
    """``config`` (default: every default) as commented YAML: each key with its value under its
    field's description, nested sections indented. It loads back into ``config``."""
    return "\n".join([_TEMPLATE_HEADER, *_template_lines(config or CoordinatorConfig(), "")]) + "\n"


def _template_lines(model: BaseModel, indent: str) -> Iterator[str]:
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not indent and (extra.get("section") or name == next(iter(type(model).model_fields))):
            yield ""
            if extra.get("section"):
                yield f"# --- {extra['section']} ---"
        for line in textwrap.wrap(field.description or "", width=100 - len(indent)):
            yield f"{indent}# {line}"
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield f"{indent}{name}:"
            yield from _template_lines(value, indent + "  ")
        else:
            yield f"{indent}{name}: {_yaml_value(value)}"


def _yaml_value(value: Any) -> str:
    """``value`` as one line of YAML (flow style)."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...")


def write_config(folder: str | os.PathLike[str], *, network: str = "umm", overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``coordinator.yaml`` (:func:`config_template` with ``network``) and a fresh key pair
    into ``folder``; returns (config, key) paths."""
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
    text = config_template(parse_config({"network": network}))  # validates the name before writing anything
    write_text_atomic(config_path, text)
    if key_path.exists():
        key_path.chmod(0o600)
    save_key(generate_key(), key_path)
    return config_path, key_path
