"""How long a coordinator and a node take to exit after SIGINT / SIGTERM, optionally under CPU load.

    python bench/bench_shutdown.py                 # idle machine
    python bench/bench_shutdown.py --burners 2     # two `while True: pass` processes beside it
    python bench/bench_shutdown.py --repeat 3 --burners 2

Two loopback networks per repeat: a coordinator (``umm-coordinator run``, a tiny random model,
synthetic math task) and nodes (``umm-node join``) bootstrapped from it and trusting its key. Each
says it serves through its ``--ready-file`` (:mod:`umm.net.ready`); the coordinator's progress is
read from its status service (:func:`umm.net.status.fetch_status`). Measured, each from the signal
to the process's exit (``wait``):

- ``coordinator SIGINT (linger)``: Ctrl-C to the coordinator's process group while it lingers
  after its round (what ``tests/test_coordinator_network.py`` does);
- ``coordinator SIGTERM (mid evaluation)``: SIGTERM while the round evaluates the node's expert
  (64 items of 16 new tokens, one per batch: tens of seconds), seen in its status service's phase;
- ``N nodes SIGTERM at once (max)``: ``--nodes`` joined nodes (each also watches the coordinator)
  told to stop together, as ``umm net local`` stops them: each withdraws its record through
  peers that are leaving too; the slowest exit is printed;
- ``node SIGINT (group)``: Ctrl-C to one node's process group.

Every exit is bounded by ``--limit`` seconds (then the group is SIGKILLed and the figure reads
``>limit``). Load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from umm.net.dht import DHT_PIDS
from umm.net.errors import NetError
from umm.net.local import Proc, child_env
from umm.net.status import CoordinatorView, fetch_status

_NODE_CMD = "from node.cli import main; main()"


def _start(root: Path, name: str, cmd: list[str], data_dir: Path) -> Proc:
    """``cmd`` in its own session, its output in ``root/<name>-<ns>.log``; it writes its ready-file
    (:mod:`umm.net.ready`) to ``root/ready/<name>.json`` (``cmd`` passes that ``--ready-file``)."""
    return Proc(name, cmd, root / f"{name}-{time.monotonic_ns()}.log", child_env(), dht_pids=data_dir / DHT_PIDS,
                ready_file=root / "ready" / f"{name}.json")


def _signal_and_time(proc: Proc, sig: int, *, group: bool, limit: float) -> float:
    """Seconds from ``sig`` to the exit of ``proc`` (``inf`` past ``limit``); then whatever is left
    of it (its process group, an orphaned DHT) is killed."""
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.popen.pid, sig)
    try:
        proc.popen.wait(timeout=limit)
        took = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        took = float("inf")
    proc.finish(0)
    return took


def _network(root: Path, name: str, rounds: int, nodes: int = 1, **settings: object) -> tuple[Proc, list[Proc]]:
    """Start a coordinator (``rounds`` rounds, then linger; 0: rounds until stopped) and ``nodes`` nodes,
    with fresh data dirs in ``root/name``, and wait until all serve (their ready-files); the model
    (made once) is ``root/model``."""
    from umm.experts.random_models import make_random_llama
    from umm.net.keys import load_or_create_key, public_key_text

    model = root / "model"
    if not model.is_dir():
        make_random_llama(model, seed=1)
    root = root / name
    root.mkdir()
    key = root / "coord.key"
    pub = root / "coord.pub"
    pub.write_text(public_key_text(load_or_create_key(key)) + "\n")
    cfg = {"network": "shutbench", "data_dir": str(root / "coord-data"), "key_path": str(key),
           "tasks": ["synth-math"], "eval_limit": 2, "test_limit": 2, "max_new_tokens": 4, "eval_batch_size": 2,
           "round_interval": 0.0, "refresh_period": 30.0, "merge": False, "fetch_timeout": 5.0, **settings}
    (root / "coordinator.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--config", str(root / "coordinator.yaml"),
           "--rounds", str(rounds), "--ready-file", str(root / "ready" / "coordinator.json")]
    coord = _start(root, "coordinator", cmd + (["--linger"] if rounds else []), root / "coord-data")
    peers = coord.wait_ready(180).initial_peers
    started = []
    for i in range(nodes):
        node_cmd = [sys.executable, "-c", _NODE_CMD, "join", "--model", str(model), "--domain", "math",
                    "--name", f"bench{i}", "--network", "shutbench", "--data-dir", str(root / f"node-data{i}"),
                    "--coordinator-key", str(pub), "--refresh-period", "30",
                    "--ready-file", str(root / "ready" / f"node{i}.json")]
        for p in peers:
            node_cmd += ["--initial-peers", p]
        started.append(_start(root, f"node{i}", node_cmd, root / f"node-data{i}"))
    for node in started:
        node.wait_ready(300)
    return coord, started


def _wait_status(coord: Proc, until: str, done: Callable[[CoordinatorView], bool], timeout: float) -> None:
    """Until the coordinator's status service shows ``done(view)`` (``until`` says what, for the error)."""
    address = coord.wait_ready(timeout).status_address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if done(fetch_status(address, limit=0)):
                return
        except NetError:  # a busy coordinator may miss a call
            pass
        if not coord.alive():
            break
        time.sleep(0.1)
    raise RuntimeError(f"the coordinator did not reach {until!r} within {timeout:.0f} s:\n{coord.tail()}")


def _lingers(view: CoordinatorView) -> bool:
    """Its round finished (with ``--rounds 1 --linger`` it now serves until interrupted)."""
    return any(r.state != "running" for r in view.rounds) and view.status.phase == "idle"


def _evaluates(view: CoordinatorView) -> bool:
    """A round is in its ``evaluate`` step."""
    return view.status.phase == "evaluate"


def _time_all(children: list[Proc], sig: int, limit: float) -> list[float]:
    """Signal every child at once; seconds from the signal to each one's exit (``inf`` past ``limit``)."""
    t0 = time.monotonic()
    for c in children:
        os.kill(c.popen.pid, sig)
    out = []
    for c in children:
        try:
            c.popen.wait(timeout=max(0.1, limit - (time.monotonic() - t0)))
            out.append(time.monotonic() - t0)
        except subprocess.TimeoutExpired:
            out.append(float("inf"))
        c.finish(0)
    return out


def one_repeat(root: Path, limit: float, nodes: int) -> dict[str, float]:
    out: dict[str, float] = {}
    tag = time.monotonic_ns()
    coord, started = _network(root, f"linger-{tag}", rounds=1, nodes=nodes)
    try:
        _wait_status(coord, "round done, lingering", _lingers, 300)
        out[f"{nodes} nodes SIGTERM at once (max)"] = max(_time_all(started, signal.SIGTERM, limit))
        out["coordinator SIGINT (linger)"] = _signal_and_time(coord, signal.SIGINT, group=True, limit=limit)
    finally:
        for c in [coord, *started]:
            c.finish(0)
    # an evaluation that lasts: 64 items, one per batch, 16 new tokens each
    coord, (node,) = _network(root, f"eval-{tag}", rounds=0, eval_limit=64, eval_batch_size=1, max_new_tokens=16)
    try:
        _wait_status(coord, "evaluate", _evaluates, 300)
        out["coordinator SIGTERM (mid evaluation)"] = _signal_and_time(coord, signal.SIGTERM, group=False, limit=limit)
        out["node SIGINT (group)"] = _signal_and_time(node, signal.SIGINT, group=True, limit=limit)
    finally:
        coord.finish(0)
        node.finish(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burners", type=int, default=0, help="CPU-bound `while True: pass` processes beside it.")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=3, help="Nodes stopped at once in the first measurement.")
    ap.add_argument("--limit", type=float, default=90.0, help="Seconds before a process that has not exited is killed.")
    args = ap.parse_args()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    results: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="umm-bench-shutdown-") as tmp:
            for i in range(args.repeat):
                for k, v in one_repeat(Path(tmp), args.limit, args.nodes).items():
                    results.setdefault(k, []).append(v)
                print(f"repeat {i + 1}/{args.repeat} done; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    print(f"exit after the signal, seconds ({args.burners} CPU burner(s), limit {args.limit:.0f} s):")
    for k, vs in results.items():
        shown = " ".join("inf" if v == float("inf") else f"{v:.1f}" for v in vs)
        print(f"  {k:38s} median {statistics.median(vs):6.1f}   all: {shown}")


if __name__ == "__main__":
    main()
