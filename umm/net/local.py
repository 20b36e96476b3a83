"""``umm net local``: a whole umm network on 127.0.0.1, as real processes.

:func:`run_local_network` starts ``N`` ``umm-node join`` processes serving the tiny experts
(node ``i`` serves the expert of domain ``i mod (math, code, list)``: Llama experts that merge
layer-wise, and a GPT-NeoX one that needs fusion), then ``umm-coordinator run --rounds R
--linger`` bootstrapped from the first node's DHT address. It watches the coordinator's status
service (:func:`umm.net.status.fetch_status`), waits until every node's store holds the published
merged model and verifies it against its manifest, then sends SIGTERM to every process (SIGKILL
to the process groups of those that do not leave in time).

``umm`` never imports ``node`` or ``coordinator``: they are driven through typed contracts only.
Their command lines start them; each writes a ready-file (:mod:`umm.net.ready`) once it serves,
which says where it is; the coordinator's config is a dict that its strict pydantic config checks
when it loads the file (unknown keys are an error; ``tests/test_net_local.py`` loads it); round
results come from its status service. Layout of the work dir (each run starts it afresh, unless
``keep_state``: then the coordinator's state, key and store and the nodes' data are kept, so its
next round sees the same experts and the model it published)::

    <workdir>/.umm-net-local        marker: the folder may be cleared by the next run
    <workdir>/coordinator/          coordinator.yaml, coordinator.key, coordinator.pub, data/
    <workdir>/node-<i>/             the node's data dir (identity, models/, logs/)
    <workdir>/fusion.jsonl          instruction-response data for fusion rounds
    <workdir>/ready/<process>.json  each process's ready-file, while it serves
    <workdir>/logs/<process>.log    stdout + stderr of each process
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from umm.configfile import Strict
from umm.errors import UmmError
from umm.net.errors import NetError
from umm.progress import ProgressSink

if TYPE_CHECKING:  # the rest loads when a network starts: `umm` reads LocalNetConfig for its flags
    from umm.net.proto import umm_coordinator_pb2 as pb
    from umm.net.ready import Ready
    from umm.net.status import CoordinatorView

logger = logging.getLogger(__name__)

MARKER = ".umm-net-local"
EXPERT_ORDER = ("math", "code", "list")
#: where the coordinator writes its dashboard's URL in its data dir (coordinator.dashboard.address.URL_FILE)
DASHBOARD_URL_FILE = "dashboard_url"
_NODE_CMD = "from node.cli import main; main()"


class LocalNetError(UmmError):
    """The local network cannot be set up as asked (bad options, a work dir that is not ours)."""


class LocalNetConfig(Strict):
    """What ``umm net local`` runs; small limits so a round takes minutes on 2 CPU cores."""

    workdir: Path = Field(description="Folder for every process's data and logs, cleared at the start.")
    nodes: int = Field(3, description="Node processes; node i serves the expert of math, code, list (i mod 3).")
    rounds: int = Field(1, description="Coordinator rounds to run.")
    variant: str = Field("small", description="Tiny expert suite: small (seconds) or full (minutes).")
    experts_root: Path | None = Field(None, description="Where the expert suites live (default: <umm home>/experts).")
    network: str = Field("umm-local", description="Network name of the coordinator and the nodes.")
    device: str = Field("cpu", description="Device of the coordinator's evaluation and jobs.")
    eval_limit: int = Field(8, description="Items per task when ranking experts and searching merges.")
    test_limit: int = Field(8, description="Items per task when comparing the merged model to its sources.")
    max_new_tokens: int | None = Field(None, description="Cap on generated tokens per item (default: each task's own).")
    evolve_evaluations: int = Field(4, description="CMA-ES candidates per merge search.")
    evolve_population: int = Field(2, description="CMA-ES candidates per generation.")
    fusion_records: int = Field(32, description="Instruction-response records per domain for fusion rounds.")
    fusion_max_steps: int | None = Field(4, description="Training steps of each pairwise fusion (None: fusion_epochs).")
    fusion_epochs: int = Field(1, description="Passes over the fusion data of each pairwise fusion (within fusion_max_steps).")
    fusion_lr: float = Field(3e-4, description="Learning rate of the pairwise fusions.")
    margin: float = Field(0.0, description="A merged model is published only when the 95% CI lower bounds of its gain "
                          "over the best source and the previous merged model exceed this.")
    keep_state: bool = Field(False, description="Keep the previous run's coordinator state and the nodes' data in the "
                             "work dir: the next round sees the same experts and the model published before.")
    round_interval: float = Field(1.0, description="Seconds the coordinator waits between rounds.")
    refresh_period: float = Field(10.0, description="Nodes' re-announcement period; they poll for merged models "
                                  "every half of this.")
    start_timeout: float = Field(180.0, description="Seconds to wait for each process to be ready.")
    round_timeout: float = Field(1800.0, description="Seconds to wait for all the rounds.")
    fetch_timeout: float = Field(180.0, description="Seconds to wait for every node to hold the merged model.")
    stop_timeout: float = Field(30.0, description="Seconds all processes have, in all, to leave after SIGTERM before they are killed.")
    dashboard: str | None = Field(None, description="HOST:PORT of the coordinator's web dashboard (:PORT binds "
                                  "127.0.0.1; port 0 a free port); off when not given.")
    linger: bool = Field(False, description="After the rounds and checks, keep the network and its dashboard up "
                         "until Ctrl-C.")

    @model_validator(mode="after")
    def _fits_together(self) -> LocalNetConfig:
        if self.nodes < 1:
            raise LocalNetError(f"--nodes must be at least 1, got {self.nodes}")
        if self.rounds < 1:
            raise LocalNetError(f"--rounds must be at least 1, got {self.rounds}")
        if self.evolve_evaluations < self.evolve_population + 1:
            raise LocalNetError(f"--evolve-evaluations {self.evolve_evaluations} does not fit one CMA-ES generation: "
                                f"give at least {self.evolve_population + 1} (the start + {self.evolve_population})")
        return self


@dataclass
class NodeOutcome:
    """One node: what it served and whether it ends up holding the verified merged model."""

    name: str
    expert: str
    data_dir: Path
    holds_merged: bool = False
    problem: str = ""


@dataclass
class LocalNetResult:
    """What happened; ``ok`` only when every check passed (``problems`` says what did not).

    ``rounds``: the numbers of this run's rounds (a ``keep_state`` run also sees the earlier ones in
    ``view``); ``merged_hash``: the network's published merged model (this run's or an earlier one);
    ``comparison``: merged vs sources of the round that published it."""

    view: CoordinatorView | None = None  # the coordinator's status service, last read
    rounds: list[int] = field(default_factory=list)
    dashboard_url: str = ""  # the coordinator's dashboard, when asked for
    merged_hash: str = ""
    comparison: pb.RoundComparison | None = None
    nodes: list[NodeOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def this_run(self) -> list[pb.Round]:
        """This run's rounds, oldest first."""
        if self.view is None:
            return []
        return sorted((r for r in self.view.rounds if r.number in self.rounds), key=lambda r: r.number)

    @property
    def published(self) -> bool:
        """Whether one of this run's rounds published a merged model."""
        return any(r.published for r in self.this_run())


class ModelFigures(Strict):
    """A model of a round's test comparison (``--summary-json``)."""

    name: str = ""
    hash: str
    family: str = ""
    scores: dict[str, float]
    objective: float


class DiffFigures(Strict):
    """Merged minus another model: test objective difference and its paired-bootstrap 95% CI."""

    diff: float
    ci_low: float
    ci_high: float


class PlanFigures(Strict):
    """A round's plan: its kind, stages in order, and the models (names or short hashes)."""

    kind: str
    stages: list[str]
    pivot: str
    previous: str
    models: list[str]


class NetSummary(Strict):
    """``umm net local --summary-json FILE``: how this run ended. ``merged``/``sources``/``plan``/
    ``diff_vs_best_source`` are those of this run's last round that compared a merged model with its
    sources (None when none did, e.g. a round that had no new expert to merge)."""

    ok: bool
    published: bool
    decision: str
    plan: PlanFigures | None
    merged: ModelFigures | None
    sources: list[ModelFigures]
    diff_vs_best_source: DiffFigures | None
    diff_vs_previous: DiffFigures | None
    network_merged_hash: str
    nodes_holding_merged: int
    problems: list[str]


def summarize(result: LocalNetResult) -> NetSummary:
    """The :class:`NetSummary` of ``result``."""
    rounds = result.this_run()
    names = result.view.expert_names() if result.view is not None else {}
    compared = [r for r in rounds if r.HasField("comparison")]
    last = compared[-1] if compared else (rounds[-1] if rounds else None)

    def name(h: str) -> str:
        return names.get(h, h[:12])

    def model(m: pb.ModelScores) -> ModelFigures:
        return ModelFigures(name=name(m.manifest_hash), hash=m.manifest_hash, family=m.family, scores=dict(m.scores),
                            objective=m.objective)

    def diff(d: pb.Difference) -> DiffFigures:
        return DiffFigures(diff=d.diff, ci_low=d.ci_low, ci_high=d.ci_high)

    decision = "" if last is None else (last.decision.text if last.HasField("decision") else last.reason)
    plan = None if last is None or not last.plan else PlanFigures(
        kind=last.plan, stages=list(last.stages), pivot=name(last.pivot_manifest_hash),
        previous=name(last.previous_manifest_hash) if last.previous_manifest_hash else "",
        models=[name(h) for h in last.source_manifest_hashes])
    has = last is not None and last.HasField("comparison")
    d = last.decision if last is not None and last.HasField("decision") else None
    return NetSummary(
        ok=result.ok, published=result.published, decision=decision, plan=plan,
        merged=model(last.comparison.merged) if has else None,
        sources=[model(m) for m in last.comparison.sources] if has else [],
        diff_vs_best_source=diff(d.vs_best_source) if d is not None and d.HasField("vs_best_source") else None,
        diff_vs_previous=diff(d.vs_previous) if d is not None and d.HasField("vs_previous") else None,
        network_merged_hash=result.merged_hash, nodes_holding_merged=sum(n.holds_merged for n in result.nodes),
        problems=list(result.problems),
    )


# ----------------------------------------------------------------------------- processes


class Proc:
    """A child process in its own session, output to a log. ``dht_pids``: the pid file of its DHT
    (``<data dir>/dht.pids``), whose processes live in a process group of their own; ``ready_file``:
    where it writes its :class:`~umm.net.ready.Ready` (its ``--ready-file``)."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str], dht_pids: Path | None = None,
                 ready_file: Path | None = None):
        self.name, self.cmd, self.log, self.dht_pids, self.ready_file = name, cmd, log, dht_pids, ready_file
        log.parent.mkdir(parents=True, exist_ok=True)
        #: when it was started (wall clock, as the coordinator's round times)
        self.started_at = time.time()
        with open(log, "wb") as fh:
            self.popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        logger.info("started %s (pid %d): %s", name, self.popen.pid, " ".join(cmd))

    def output(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ready(self) -> Ready | None:
        """Its ready-file, once written (None before)."""
        if self.ready_file is None:
            raise ValueError(f"{self.name} was started without a ready-file")
        from umm.net.ready import read_ready

        try:
            return read_ready(self.ready_file)
        except NetError as e:
            raise LocalNetError(f"{self.name}: {e}") from None

    def wait_ready(self, timeout: float) -> Ready:
        """Its ready-file, once written; :class:`LocalNetError` (with its last output) if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            ready = self.ready()
            if ready is not None:
                return ready
            if not self.alive():
                raise LocalNetError(f"{self.name} exited with code {self.popen.returncode} before it was ready; "
                                    f"its last output ({self.log}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise LocalNetError(f"{self.name} was not ready after {timeout:.0f} s; its last output ({self.log}):\n"
                                    f"{self.tail()}")
            time.sleep(0.2)

    def terminate(self) -> None:
        if self.alive():
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float) -> int:
        """Wait for the exit after :meth:`terminate`; SIGKILL the process group if it or a helper lingers."""
        try:
            rc = self.popen.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
            rc = None
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # whatever else is left in its process group
        except (ProcessLookupError, PermissionError):
            pass
        if rc is None:
            rc = self.popen.wait()
        if self.dht_pids is not None:  # a DHT that outlived its process (it follows it, but only on Linux)
            from umm.net.dht import end_orphaned_dht

            end_orphaned_dht(self.dht_pids)
        return rc


def child_env() -> dict[str, str]:
    """The environment of a process of the local network: no progress bars, unbuffered output, wide logs."""
    return {**os.environ, "UMM_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- planning


#: what a ``keep_state`` run keeps of the previous run's work dir
KEPT = ("coordinator", "fusion.jsonl") + tuple(f"node-{i}" for i in range(64))


def prepare_workdir(workdir: Path, keep_state: bool = False) -> Path:
    """Create ``workdir`` or clear a previous run's (``keep_state``: all but :data:`KEPT`); refuse a
    non-empty folder that is not ours."""
    workdir = Path(workdir).expanduser().absolute()
    if workdir.exists():
        if not workdir.is_dir():
            raise LocalNetError(f"--workdir {workdir} is a file; give a folder")
        if any(workdir.iterdir()) and not (workdir / MARKER).is_file():
            raise LocalNetError(f"--workdir {workdir} is not empty and was not made by `umm net local`; "
                                "give an empty or new folder")
        for child in workdir.iterdir():
            if child.name == MARKER or (keep_state and child.name in KEPT):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `umm net local`; cleared by its next run\n")
    return workdir


def node_experts(suite: Any, nodes: int) -> list[str]:
    """The expert model each node serves: domain ``i mod (math, code, list)`` of ``suite``."""
    available = [suite.expert_for(d) for d in EXPERT_ORDER if d in suite.info.get("domains", {})]
    if not available:
        raise LocalNetError(f"expert suite {suite.variant!r} has no expert of {', '.join(EXPERT_ORDER)}")
    return [available[i % len(available)] for i in range(nodes)]


def node_join_command(suite: Any, expert: str, *, name: str, network: str, data_dir: Path, coordinator_key: Path,
                      refresh_period: float, initial_peers: list[str], ready_file: Path) -> list[str]:
    """The ``umm-node join`` command line of a local node serving ``expert`` of ``suite``."""
    cmd = [sys.executable, "-c", _NODE_CMD, "join", "--model", str(suite.path(expert)), "--name", name,
           "--network", network, "--data-dir", str(data_dir), "--coordinator-key", str(coordinator_key),
           "--refresh-period", str(refresh_period), "--ready-file", str(ready_file)]
    for d in suite.models[expert]["domains"]:
        cmd += ["--domain", d]
    if suite.base_of(expert):
        cmd += ["--base-model", suite.base_of(expert)]
    for p in initial_peers:
        cmd += ["--initial-peers", p]
    return cmd


def coordinator_command(config: Path, *, rounds: int, ready_file: Path, dashboard: str | None = None) -> list[str]:
    """The ``umm-coordinator run`` command line of the local coordinator (it lingers after its rounds;
    ``dashboard``: HOST:PORT of its web dashboard)."""
    return [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config), "--rounds", str(rounds),
            "--linger", "--ready-file", str(ready_file), *(["--dashboard", dashboard] if dashboard else [])]


def coordinator_settings(cfg: LocalNetConfig, suite: Any, experts: list[str], fusion_data: Path) -> dict[str, Any]:
    """The coordinator.yaml content: the served domains' synthetic tasks, small limits, loopback only.

    Only what differs from the coordinator's defaults, plus the file names this module reads;
    the coordinator's strict config refuses any key it does not know when it loads the file."""
    tasks = []
    for name in dict.fromkeys(experts):
        for d in suite.models[name]["domains"]:
            task = suite.info["domains"][d]["task"]
            if task not in tasks:
                tasks.append(task)
    bases = sorted({b for b in (suite.base_of(e) for e in experts) if b})
    return {
        "network": cfg.network, "data_dir": "data", "key_path": "coordinator.key", "tasks": tasks,
        "eval_limit": cfg.eval_limit, "test_limit": cfg.test_limit, "max_new_tokens": cfg.max_new_tokens,
        "eval_batch_size": max(cfg.eval_limit, cfg.test_limit), "device": cfg.device,
        "round_interval": cfg.round_interval, "refresh_period": cfg.refresh_period,
        # the experts' common base, when they have one: task vectors are taken from it
        "base_model": str(suite.path(bases[0])) if len(bases) == 1 else None, "margin": cfg.margin,
        "evolve": {"budget": {"evaluations": cfg.evolve_evaluations}, "population": cfg.evolve_population},
        # the tiny suite's models learned raw prompt -> answer text, short sequences
        "fusion": {"data": str(fusion_data), "layout": "raw", "max_length": 128,
                   "training": {"max_steps": cfg.fusion_max_steps, "epochs": cfg.fusion_epochs, "lr": cfg.fusion_lr,
                                "batch_size": 16}},
    }


# ----------------------------------------------------------------------------- observing


def check_node_store(data_dir: Path, manifest_hash: str) -> None:
    """Raise unless ``data_dir``'s store holds ``manifest_hash`` with every file matching its manifest."""
    from umm.checkpoints.manifest import Manifest, verify_folder
    from umm.net.store import MANIFEST_NAME

    folder = data_dir / "models" / manifest_hash
    raw_path = folder / MANIFEST_NAME
    if not raw_path.is_file():
        raise LocalNetError(f"{folder} does not exist: the node has not fetched the merged model")
    raw = raw_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_hash:
        raise LocalNetError(f"{raw_path} does not hash to {manifest_hash[:12]}")
    verify_folder(folder, Manifest.from_json(raw))


# ----------------------------------------------------------------------------- the run


def run_local_network(cfg: LocalNetConfig, *, suite: Any = None, say: Any = None,
                      on_progress: ProgressSink | None = None) -> LocalNetResult:
    """Start the network, run the rounds, check every node, stop everything (see module docstring).

    ``suite``: an :class:`umm.experts.build.ExpertSuite` (default: ``ensure_suite(cfg.variant,
    cfg.experts_root)``, built if missing; its bars go to ``on_progress``). ``say(text)`` reports
    progress (default: logging).
    Never raises for a failed check: those are in ``result.problems``; raises
    :class:`LocalNetError` only for a set-up the caller must fix.
    """
    say = say or logger.info
    if suite is None:
        from umm.experts.build import ensure_suite

        say(f"preparing the {cfg.variant!r} expert suite (cached after the first run) ...")
        suite = ensure_suite(cfg.variant, cfg.experts_root, device=cfg.device, on_progress=on_progress)
    workdir = prepare_workdir(cfg.workdir, cfg.keep_state)
    experts = node_experts(suite, cfg.nodes)
    settings = _prepare_coordinator(cfg, suite, experts, workdir)
    result = LocalNetResult()
    procs: list[Proc] = []
    try:
        bootstrap = _start_nodes(cfg, suite, experts, workdir, result, procs, say)
        coord_dir = workdir / "coordinator"
        write_coordinator_config(coord_dir / "coordinator.yaml", {**settings, "initial_peers": bootstrap})
        coord = _start(procs, "coordinator", coordinator_command(coord_dir / "coordinator.yaml", rounds=cfg.rounds,
                                                                 ready_file=workdir / "ready" / "coordinator.json",
                                                                 dashboard=cfg.dashboard),
                       workdir, data_dir=coord_dir / "data")
        address = coord.wait_ready(cfg.start_timeout).status_address
        if cfg.dashboard:
            result.dashboard_url = (coord_dir / "data" / DASHBOARD_URL_FILE).read_text().strip()
            say(f"dashboard: {result.dashboard_url}")
        say(f"coordinator up (status at {address}); running {cfg.rounds} round(s) on {', '.join(settings['tasks'])}")
        _wait_rounds(cfg, coord, address, result, say)
        if not result.problems:
            _check_nodes(cfg, result, procs, say)
        result.comparison = _published_comparison(result)
        if cfg.linger:
            _linger(procs, result, say)
    except (LocalNetError, NetError) as e:
        result.problems.append(str(e))
    finally:
        _stop_all(cfg, procs, result, say)
    return result


def _prepare_coordinator(cfg: LocalNetConfig, suite: Any, experts: list[str], workdir: Path) -> dict[str, Any]:
    """The coordinator's key pair and fusion data in the work dir; its settings (without its initial peers)."""
    from umm.experts.instruction_data import write_instruction_data
    from umm.net.keys import load_or_create_key, public_key_text

    coord_dir = workdir / "coordinator"
    coord_dir.mkdir(exist_ok=True)
    key = load_or_create_key(coord_dir / "coordinator.key")
    (coord_dir / "coordinator.pub").write_text(public_key_text(key) + "\n")
    domains = [d for d in EXPERT_ORDER if d in suite.info["domains"]]
    fusion = write_instruction_data(workdir / "fusion.jsonl", {d: cfg.fusion_records for d in domains})
    return coordinator_settings(cfg, suite, experts, fusion)


def write_coordinator_config(path: Path, settings: dict[str, Any]) -> None:
    """``settings`` as the coordinator's YAML config file."""
    import yaml

    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def _start(procs: list[Proc], name: str, cmd: list[str], workdir: Path, *, data_dir: Path) -> Proc:
    """Start ``cmd`` as process ``name`` (log and ready-file in the work dir, its data in ``data_dir``),
    added to ``procs``."""
    from umm.net.dht import DHT_PIDS

    proc = Proc(name, cmd, workdir / "logs" / f"{name}.log", child_env(), dht_pids=data_dir / DHT_PIDS,
                ready_file=workdir / "ready" / f"{name}.json")
    procs.append(proc)
    return proc


def _start_nodes(cfg: LocalNetConfig, suite: Any, experts: list[str], workdir: Path, result: LocalNetResult,
                 procs: list[Proc], say: Any) -> list[str]:
    """Start a node per expert, the others bootstrapped from the first; wait until all serve.
    Returns the first node's DHT addresses (the coordinator's initial peers)."""
    bootstrap: list[str] = []
    for i, expert in enumerate(experts):
        name = f"node-{i}-{expert}"
        data_dir = workdir / f"node-{i}"
        result.nodes.append(NodeOutcome(name, expert, data_dir))
        cmd = node_join_command(suite, expert, name=name, network=cfg.network, data_dir=data_dir,
                                coordinator_key=workdir / "coordinator" / "coordinator.pub",
                                refresh_period=cfg.refresh_period, initial_peers=bootstrap,
                                ready_file=workdir / "ready" / f"{name}.json")
        proc = _start(procs, name, cmd, workdir, data_dir=data_dir)
        if i == 0:  # the others join through the first node
            bootstrap = proc.wait_ready(cfg.start_timeout).initial_peers
            say(f"{name} serves {expert}; bootstrap peer {bootstrap[0] if bootstrap else '?'}")
    for p in procs[1:]:
        p.wait_ready(cfg.start_timeout)
        say(f"{p.name} joined")
    return bootstrap


def _published_comparison(result: LocalNetResult) -> pb.RoundComparison | None:
    """Merged vs sources of the round that published ``result.merged_hash`` (None if none did)."""
    if result.view is None or not result.merged_hash:
        return None
    for r in result.view.rounds:
        if r.published and r.merged_manifest_hash == result.merged_hash and r.HasField("comparison"):
            return r.comparison
    return None


def _linger(procs: list[Proc], result: LocalNetResult, say: Any) -> None:
    """Keep every process up until Ctrl-C (or until one of them exits)."""
    say("rounds done; the network" + (f" and its dashboard ({result.dashboard_url})" if result.dashboard_url else "")
        + " stay up until Ctrl-C")
    try:
        while all(p.alive() for p in procs):
            time.sleep(0.5)
        say("a process exited: " + ", ".join(p.name for p in procs if not p.alive()))
    except KeyboardInterrupt:
        say("interrupted")


def _stop_all(cfg: LocalNetConfig, procs: list[Proc], result: LocalNetResult, say: Any) -> None:
    """SIGTERM every process, wait ``cfg.stop_timeout`` in all, then kill what is left; record bad exits."""
    say("stopping every process ...")
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + cfg.stop_timeout
    for p in reversed(procs):
        rc = p.finish(deadline - time.monotonic())
        if rc not in (0, -signal.SIGTERM):
            result.problems.append(f"{p.name} exited with code {rc}; see {p.log}")


def _wait_rounds(cfg: LocalNetConfig, coord: Proc, address: str, result: LocalNetResult, say: Any) -> None:
    """Follow the coordinator's status service until ``cfg.rounds`` rounds finished; record failures."""
    from umm.net.status import fetch_status

    deadline = time.monotonic() + cfg.round_timeout
    last_phase = ""
    # this run's rounds end after the coordinator started (a keep_state run also sees the earlier ones;
    # a round with nothing new to do can end before the first answer of the status service)
    started = coord.started_at
    while True:
        try:
            result.view = view = fetch_status(address, limit=0)
        except NetError as e:  # a busy coordinator may miss one call; a dead one is caught below
            if not coord.alive() or time.monotonic() > deadline:
                raise
            logger.info("%s; asking again", e)
            time.sleep(2.0)
            continue
        result.rounds = sorted(r.number for r in view.rounds if r.state != "running" and r.finished_at >= started)
        if len(result.rounds) >= cfg.rounds:
            break
        phase = f"round {view.status.current_round}: {view.status.phase}"
        if phase != last_phase:
            say(phase)
            last_phase = phase
        if not coord.alive():
            raise LocalNetError(f"the coordinator exited with code {coord.popen.returncode} during the rounds; "
                                f"its last output ({coord.log}):\n{coord.tail()}")
        if time.monotonic() > deadline:
            raise LocalNetError(f"the rounds did not finish within {cfg.round_timeout:.0f} s ({phase})")
        time.sleep(1.0)
    _record_rounds(view, result, say)


def _record_rounds(view: CoordinatorView, result: LocalNetResult, say: Any) -> None:
    """Say how each of this run's rounds ended; the network's merged model, or why there is none (a
    round that ends ``no_improvement`` is not a failure when the network already has a better model)."""
    for r in result.this_run():
        say(f"round {r.number}: {r.state}: {r.reason}")
        if r.state == "failed":
            result.problems.append(f"round {r.number} failed: {r.reason}")
    result.merged_hash = view.status.merged_manifest_hash
    if not result.merged_hash and not result.problems:
        result.problems.append("no merged model was published: " +
                               "; ".join(f"round {r.number} {r.state}: {r.reason}" for r in result.this_run()))


def _check_nodes(cfg: LocalNetConfig, result: LocalNetResult, procs: list[Proc], say: Any) -> None:
    """Wait (``cfg.fetch_timeout``) until every live node fetched the merged model, then verify each store."""
    from umm.net.store import MANIFEST_NAME

    h = result.merged_hash
    deadline = time.monotonic() + cfg.fetch_timeout
    pending = list(range(len(result.nodes)))
    while pending:
        for i in list(pending):
            node = result.nodes[i]
            if (node.data_dir / "models" / h / MANIFEST_NAME).is_file():
                pending.remove(i)
            elif not procs[i].alive():
                node.problem = f"exited with code {procs[i].popen.returncode}: {procs[i].tail(5)}"
                pending.remove(i)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for node in result.nodes:
        if node.problem:  # the node process died: its store is not checked
            continue
        try:
            check_node_store(node.data_dir, h)
            node.holds_merged = True
            say(f"{node.name}: merged model {h[:12]} verified")
        except UmmError as e:
            node.problem = str(e) if (node.data_dir / "models" / h).exists() else \
                f"no merged model {h[:12]} after {cfg.fetch_timeout:.0f} s ({e})"
        if node.problem:
            result.problems.append(f"{node.name}: {node.problem}")
