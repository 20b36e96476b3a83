"""``umm net local``: a whole umm network on 127.0.0.1, as real processes.

:func:`run_local_network` starts ``N`` ``umm-node join`` processes serving the tiny experts
(node ``i`` serves the expert of domain ``i mod (math, code, list)``: Llama experts that merge
layer-wise, and a GPT-NeoX one that needs fusion), then ``umm-coordinator run --rounds R
--linger`` bootstrapped from the first node's printed DHT address. It watches the coordinator's
status service (gRPC stubs of :mod:`umm.net.proto`), waits until every node's store holds the
published merged model and verifies it against its manifest, then sends SIGTERM to every process
(SIGKILL to the process groups of those that do not leave in time).

``umm`` never imports ``node`` or ``coordinator``: they are driven by their command lines only.
Layout of the work dir (each run starts it afresh)::

    <workdir>/.umm-net-local        marker: the folder may be cleared by the next run
    <workdir>/coordinator/          coordinator.yaml, coordinator.key, coordinator.pub, data/
    <workdir>/node-<i>/             the node's data dir (identity, models/, logs/)
    <workdir>/fusion.jsonl          instruction-response data for fusion rounds
    <workdir>/logs/<process>.log    stdout + stderr of each process
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umm.errors import UmmError

logger = logging.getLogger(__name__)

MARKER = ".umm-net-local"
EXPERT_ORDER = ("math", "code", "list")
_PEER_LINE = re.compile(r"--initial-peers\s+(\S+)")
_NODE_CMD = "from node.cli import main; main()"


class LocalNetError(UmmError):
    """The local network cannot be set up as asked (bad options, a work dir that is not ours)."""


@dataclass(frozen=True)
class LocalNetConfig:
    """What ``umm net local`` runs; small limits so a round takes minutes on 2 CPU cores."""

    workdir: Path
    nodes: int = 3
    rounds: int = 1
    variant: str = "small"
    experts_root: Path | None = None  # where the suite lives (default: umm.paths.experts_dir())
    network: str = "umm-local"
    device: str = "cpu"
    eval_limit: int = 8
    test_limit: int = 8
    max_new_tokens: int | None = None
    evolve_evaluations: int = 4
    evolve_population: int = 2
    fusion_records: int = 32  # per domain
    fusion_max_steps: int = 4
    round_interval: float = 1.0
    refresh_period: float = 10.0  # nodes poll for merged models every half of this
    start_timeout: float = 180.0
    round_timeout: float = 1800.0
    fetch_timeout: float = 180.0
    stop_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise LocalNetError(f"--nodes must be at least 1, got {self.nodes}")
        if self.rounds < 1:
            raise LocalNetError(f"--rounds must be at least 1, got {self.rounds}")
        if self.evolve_evaluations < self.evolve_population + 1:
            raise LocalNetError(f"--evolve-evaluations {self.evolve_evaluations} does not fit one CMA-ES generation: "
                                f"give at least {self.evolve_population + 1} (the start + {self.evolve_population})")


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
    """What happened; ``ok`` only when every check passed (``problems`` says what did not)."""

    status: dict[str, Any] = field(default_factory=dict)
    leaderboard: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    merged_hash: str = ""
    comparison: dict[str, Any] = field(default_factory=dict)  # evaluate_result of the published round
    nodes: list[NodeOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------- processes


class Proc:
    """A child process in its own session, output to a log. ``dht_pids``: the pid file of its DHT
    (``<data dir>/dht.pids``), whose processes live in a process group of their own."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str], dht_pids: Path | None = None):
        self.name, self.cmd, self.log, self.dht_pids = name, cmd, log, dht_pids
        log.parent.mkdir(parents=True, exist_ok=True)
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

    def wait_output(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output; :class:`LocalNetError` if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.output())
            if m:
                return m
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


def _env() -> dict[str, str]:
    return {**os.environ, "UMM_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- planning


def prepare_workdir(workdir: Path) -> Path:
    """Create ``workdir`` or clear a previous run's; refuse a non-empty folder that is not ours."""
    workdir = Path(workdir).expanduser().absolute()
    if workdir.exists():
        if not workdir.is_dir():
            raise LocalNetError(f"--workdir {workdir} is a file; give a folder")
        if any(workdir.iterdir()) and not (workdir / MARKER).is_file():
            raise LocalNetError(f"--workdir {workdir} is not empty and was not made by `umm net local`; "
                                "give an empty or new folder")
        for child in workdir.iterdir():
            if child.name == MARKER:
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
                      refresh_period: float, initial_peers: list[str]) -> list[str]:
    """The ``umm-node join`` command line of a local node serving ``expert`` of ``suite``."""
    cmd = [sys.executable, "-c", _NODE_CMD, "join", "--model", str(suite.path(expert)), "--name", name,
           "--network", network, "--data-dir", str(data_dir), "--coordinator-key", str(coordinator_key),
           "--refresh-period", str(refresh_period)]
    for d in suite.models[expert]["domains"]:
        cmd += ["--domain", d]
    if suite.base_of(expert):
        cmd += ["--base-model", suite.base_of(expert)]
    for p in initial_peers:
        cmd += ["--initial-peers", p]
    return cmd


def coordinator_settings(cfg: LocalNetConfig, suite: Any, experts: list[str], fusion_data: Path) -> dict[str, Any]:
    """The coordinator.yaml content: the served domains' synthetic tasks, small limits, loopback only."""
    tasks = []
    for name in dict.fromkeys(experts):
        for d in suite.models[name]["domains"]:
            task = suite.info["domains"][d]["task"]
            if task not in tasks:
                tasks.append(task)
    return {
        "network": cfg.network, "data_dir": "data", "key_path": "coordinator.key", "tasks": tasks,
        "eval_limit": cfg.eval_limit, "test_limit": cfg.test_limit, "max_new_tokens": cfg.max_new_tokens,
        "eval_batch_size": max(cfg.eval_limit, cfg.test_limit), "device": cfg.device, "fetch_retries": 3,
        "round_interval": cfg.round_interval, "refresh_period": cfg.refresh_period,
        "evolve_method": "linear", "evolve_evaluations": cfg.evolve_evaluations,
        "evolve_population": cfg.evolve_population, "fusion_data": str(fusion_data),
        "fusion_max_steps": cfg.fusion_max_steps,
    }


# ----------------------------------------------------------------------------- observing


def read_status(address: str, timeout: float = 10.0) -> dict[str, Any]:
    """``{"status", "leaderboard", "rounds"}`` from a coordinator's status service (plain dicts)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from umm.net.proto import umm_coordinator_pb2 as pb
    from umm.net.proto import umm_coordinator_pb2_grpc as pb_grpc

    kw = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStatusStub(channel)
        try:
            status = stub.GetStatus(pb.StatusRequest(), timeout=timeout)
            board = stub.GetLeaderboard(pb.LeaderboardRequest(), timeout=timeout)
            rounds = stub.ListRounds(pb.ListRoundsRequest(limit=1000), timeout=timeout)
        except grpc.RpcError as e:
            raise LocalNetError(f"the coordinator's status service at {address} does not answer: "
                                f"{e.code().name}: {e.details()}") from None
    out = {"status": MessageToDict(status, **kw), "leaderboard": MessageToDict(board, **kw).get("entries", []),
           "rounds": MessageToDict(rounds, **kw).get("rounds", [])}
    for r in out["rounds"]:
        r["number"] = int(r["number"])  # uint64 comes back as a string
    out["status"]["current_round"] = int(out["status"]["current_round"])
    return out


def round_comparison(db_path: Path, number: int) -> dict[str, Any]:
    """The ``evaluate_result`` step of round ``number`` (merged vs source test scores), read-only."""
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute("SELECT result FROM steps WHERE round=? AND name='evaluate_result' AND status='done'",
                              (number,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        logger.warning("cannot read %s: %s", db_path, e)
        return {}
    return json.loads(row[0]) if row else {}


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


def run_local_network(cfg: LocalNetConfig, *, suite: Any = None, say: Any = None) -> LocalNetResult:
    """Start the network, run the rounds, check every node, stop everything (see module docstring).

    ``suite``: an :class:`umm.experts.build.ExpertSuite` (default: ``ensure_suite(cfg.variant,
    cfg.experts_root)``, built if missing). ``say(text)`` reports progress (default: logging).
    Never raises for a failed check: those are in ``result.problems``; raises
    :class:`LocalNetError` only for a set-up the caller must fix.
    """
    from umm.experts.instruction_data import write_instruction_data
    from umm.net.dht import DHT_PIDS
    from umm.net.keys import load_or_create_key, public_key_text

    say = say or logger.info
    if suite is None:
        from umm.experts.build import ensure_suite

        say(f"preparing the {cfg.variant!r} expert suite (cached after the first run) ...")
        suite = ensure_suite(cfg.variant, cfg.experts_root, device=cfg.device)
    workdir = prepare_workdir(cfg.workdir)
    experts = node_experts(suite, cfg.nodes)
    coord_dir = workdir / "coordinator"
    coord_dir.mkdir()
    key = load_or_create_key(coord_dir / "coordinator.key")
    (coord_dir / "coordinator.pub").write_text(public_key_text(key) + "\n")
    domains = [d for d in EXPERT_ORDER if d in suite.info["domains"]]
    fusion = write_instruction_data(workdir / "fusion.jsonl", {d: cfg.fusion_records for d in domains})
    import yaml

    settings = coordinator_settings(cfg, suite, experts, fusion)

    result = LocalNetResult()
    env = _env()
    procs: list[Proc] = []
    try:
        bootstrap: list[str] = []
        for i, expert in enumerate(experts):
            name = f"node-{i}-{expert}"
            data_dir = workdir / f"node-{i}"
            result.nodes.append(NodeOutcome(name, expert, data_dir))
            cmd = node_join_command(suite, expert, name=name, network=cfg.network, data_dir=data_dir,
                                    coordinator_key=coord_dir / "coordinator.pub",
                                    refresh_period=cfg.refresh_period, initial_peers=bootstrap)
            procs.append(Proc(name, cmd, workdir / "logs" / f"{name}.log", env, dht_pids=data_dir / DHT_PIDS))
            if i == 0:  # the others join through the first node
                procs[0].wait_output(re.compile(r"Ctrl-C to leave"), cfg.start_timeout)
                bootstrap = _PEER_LINE.findall(procs[0].output())
                say(f"{name} serves {expert}; bootstrap peer {bootstrap[0] if bootstrap else '?'}")
        for p in procs[1:]:
            p.wait_output(re.compile(r"Ctrl-C to leave"), cfg.start_timeout)
            say(f"{p.name} joined")
        coord_cmd = [sys.executable, "-m", "coordinator.cli", "run", "--config", str(coord_dir / "coordinator.yaml"),
                     "--rounds", str(cfg.rounds), "--linger"]
        (coord_dir / "coordinator.yaml").write_text(yaml.safe_dump({**settings, "initial_peers": bootstrap},
                                                                   sort_keys=False))
        coord = Proc("coordinator", coord_cmd, workdir / "logs" / "coordinator.log", env,
                     dht_pids=coord_dir / "data" / DHT_PIDS)
        procs.append(coord)
        coord.wait_output(re.compile(r"status service: (\S+)"), cfg.start_timeout)
        address = (coord_dir / "data" / "status_address").read_text().strip()
        say(f"coordinator up (status at {address}); running {cfg.rounds} round(s) on {', '.join(settings['tasks'])}")
        _wait_rounds(cfg, coord, address, result, say)
        if not result.problems:
            _check_nodes(cfg, result, procs, say)
        if result.merged_hash:
            published = [r for r in result.rounds if r["merged_manifest_hash"] == result.merged_hash and r["published"]]
            if published:
                result.comparison = round_comparison(coord_dir / "data" / "state.db", published[0]["number"])
    except LocalNetError as e:
        result.problems.append(str(e))
    finally:
        say("stopping every process ...")
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + cfg.stop_timeout
        for p in reversed(procs):
            rc = p.finish(deadline - time.monotonic())
            if rc not in (0, -signal.SIGTERM):
                result.problems.append(f"{p.name} exited with code {rc}; see {p.log}")
    return result


def _wait_rounds(cfg: LocalNetConfig, coord: Proc, address: str, result: LocalNetResult, say: Any) -> None:
    deadline = time.monotonic() + cfg.round_timeout
    last_phase = ""
    while True:
        try:
            data = read_status(address)
        except LocalNetError as e:  # a busy coordinator may miss one call; a dead one is caught below
            if not coord.alive() or time.monotonic() > deadline:
                raise
            logger.info("%s; asking again", e)
            time.sleep(2.0)
            continue
        result.status, result.leaderboard, result.rounds = data["status"], data["leaderboard"], data["rounds"]
        finished = [r for r in result.rounds if r["state"] != "running"]
        if len(finished) >= cfg.rounds:
            break
        phase = f"round {result.status['current_round']}: {result.status['phase']}"
        if phase != last_phase:
            say(phase)
            last_phase = phase
        if not coord.alive():
            raise LocalNetError(f"the coordinator exited with code {coord.popen.returncode} during the rounds; "
                                f"its last output ({coord.log}):\n{coord.tail()}")
        if time.monotonic() > deadline:
            raise LocalNetError(f"the rounds did not finish within {cfg.round_timeout:.0f} s ({phase})")
        time.sleep(1.0)
    for r in sorted(result.rounds, key=lambda r: r["number"]):
        say(f"round {r['number']}: {r['state']}: {r['reason']}")
        if r["state"] == "failed":
            result.problems.append(f"round {r['number']} failed: {r['reason']}")
    result.merged_hash = result.status.get("merged_manifest_hash", "")
    if not result.merged_hash and not result.problems:
        result.problems.append("no merged model was published: " +
                               "; ".join(f"round {r['number']} {r['state']}: {r['reason']}" for r in result.rounds))


def _check_nodes(cfg: LocalNetConfig, result: LocalNetResult, procs: list[Proc], say: Any) -> None:
    h = result.merged_hash
    deadline = time.monotonic() + cfg.fetch_timeout
    pending = list(range(len(result.nodes)))
    while pending:
        for i in list(pending):
            node = result.nodes[i]
            if (node.data_dir / "models" / h / ".umm-manifest.json").is_file():
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
