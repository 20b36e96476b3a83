"""``umm net local`` end to end: a coordinator and three node processes on 127.0.0.1, one round.

The nodes serve the small suite's math and code experts (Llama, one tokenizer) and its list expert
(GPT-NeoX, another tokenizer), so the round must plan both stages (fuse the list expert into the
pivot's family, then evolve the family), run them in the coordinator's worker, compare the result
with its sources, publish it, and every node must download and verify it. The small suite's toy
models score about 0, so the run sets ``--margin -1`` (publish whatever the gain); the publish
gate itself is tested where it is decided. The command must print the leaderboard and the merged
model beside its sources, exit 0, write its summary, and leave no process behind; it lingers with its
dashboard, whose page a real headless chromium reads (leaderboard rows, the decision, the plan's
stages) before Ctrl-C. A second run on
the same work dir (``--keep-state``) has no new expert: it ends ``no_improvement`` and publishes
nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from experts_fixtures import small_suite  # noqa: F401

# `umm net` is registered in the umm app by umm/cli/__init__.py; this runs the group on its own
RUN_NET = "import typer; from umm.cli.net import register; app = typer.Typer(); register(app); app()"
NODES = ("node-0-math", "node-1-code", "node-2-list")


def _umm_processes_under(workdir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(workdir) in cmd and "net local" not in cmd and p.pid != os.getpid():
            out.append(p)
    return out


def _step(db: Path, name: str) -> Any:
    """The typed result (``coordinator.steps``) of round 1's finished step ``name``."""
    from coordinator.db import StateDB

    state = StateDB(db)
    try:
        row = state.step(1, name)
    finally:
        state.close()
    assert row is not None and row.status == "done", f"round 1 has no finished {name} step"
    return row.result


def _run_with_dashboard(cmd: list[str], env: dict[str, str], tmp_path: Path) -> tuple[Any, str, str | None]:
    """Run ``cmd --dashboard 127.0.0.1:0 --linger``; once its rounds are done, read the dashboard's
    DOM with headless chromium (None where chromium is absent), then Ctrl-C it. Bounded waits."""
    from test_dashboard_browser import CHROMIUM, browser_dom

    log = tmp_path / "net-local.out"
    with open(log, "w") as fh:
        proc = subprocess.Popen([*cmd, "--dashboard", "127.0.0.1:0", "--linger"], stdout=fh,
                                stderr=subprocess.STDOUT, text=True, env=env)
    dom = None
    try:
        deadline = time.monotonic() + 580
        while proc.poll() is None and "stay up until Ctrl-C" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1.0)
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", log.read_text())
        if proc.poll() is None and url and CHROMIUM is not None:
            dom = browser_dom(url.group(1), tmp_path / "profile")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc, log.read_text(), dom


@pytest.mark.timeout(1200)
def test_local_network_fuses_two_families_and_every_node_holds_the_verified_model(small_suite, tmp_path):  # noqa: F811
    from umm.checkpoints.fingerprint import fingerprint
    from umm.checkpoints.manifest import Manifest, build_manifest, verify_folder
    from umm.checkpoints.reader import Checkpoint
    from umm.net.dht import DHT_PIDS
    from umm.net.store import MANIFEST_NAME

    workdir = tmp_path / "net"
    cmd = [sys.executable, "-c", RUN_NET, "net", "local", "--nodes", "3", "--rounds", "1", "--workdir", str(workdir),
           "--experts-dir", str(small_suite.root.parent), "--eval-limit", "2", "--test-limit", "2",
           "--max-new-tokens", "4", "--fusion-max-steps", "2", "--margin", "-1",
           "--summary-json", str(tmp_path / "summary.json")]
    env = {**os.environ, "COLUMNS": "250", "UMM_NO_PROGRESS": "1"}
    # the first run lingers with its dashboard, which a real headless browser reads before Ctrl-C
    proc, out, dom = _run_with_dashboard(cmd, env, tmp_path)
    assert proc.returncode == 0, out[-4000:]
    if dom is not None:
        assert all(name in dom for name in NODES) and "published" in dom, dom[-3000:]
        assert "fuse" in dom and "evolve" in dom  # the plan's stages

    # the leaderboard ranks the three served experts in the three domains
    assert "Leaderboard" in out
    board = re.findall(r"│\s*(math|code|list)\s*│\s*([123])\s*│\s*([0-9a-f]{12})\s*│\s*(node-\d-\w+)\s*│", out)
    assert {(d, name) for d, _, _, name in board} == {(d, n) for d in ("math", "code", "list") for n in NODES}
    hashes = {name: h for _, _, h, name in board}

    # two families: fuse the other family's expert into the pivot's, then evolve the pivot's family
    db = workdir / "coordinator" / "data" / "state.db"
    plan = _step(db, "plan")
    assert plan.kind == "combine" and plan.stages == ("fuse", "evolve") and plan.previous == "", plan
    pivot, sources = plan.pivot, plan.sources
    assert sorted(h[:12] for h in [pivot, *sources]) == sorted(hashes.values())
    job = _step(db, "job").output
    assert [Path(p).name for p in job.plan.fuse] == [h for h in plan.models if h.startswith(hashes["node-2-list"])]
    assert len(job.plan.family) == 2 and len(job.fused) == 1  # math and code; the list expert fused into theirs
    merged = re.search(r"│\s*merged\s*│\s*-\s*│\s*([0-9a-f]{12})\s*│", out)
    assert merged, out
    assert re.search(r"│\s*1\s*│\s*published\s*│\s*fuse → evolve\s*│\s*" + merged.group(1), out)
    table = out[out.index("Merged model vs its sources"):]
    assert all(n in table for n in NODES)
    published = _step(db, "publish").record
    assert published["method"] == job.method and published["manifest_hash"][:12] == merged.group(1)
    assert sorted(published["sources"]) == sorted([pivot, *sources])
    assert published["decision"].startswith("published") and len(published["diff_vs_best_source"]) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["published"] and summary["merged"]["hash"] == published["manifest_hash"]
    assert summary["plan"]["stages"] == ["fuse", "evolve"] and summary["nodes_holding_merged"] == 3
    assert {s["name"] for s in summary["sources"]} == set(NODES) and summary["decision"] == published["decision"]
    assert set(summary["diff_vs_best_source"]) == {"diff", "ci_low", "ci_high"}

    # every node's store holds exactly that model, its files match the manifest, and it is the
    # pivot trained further: the pivot's architecture and tokenizer, new weights
    pivot_name = next(n for n, h in hashes.items() if pivot.startswith(h))
    pivot_folder = small_suite.path(pivot_name.split("-", 2)[2])
    assert build_manifest(pivot_folder).hash == pivot
    with Checkpoint.open(pivot_folder) as ck:
        pivot_fp = fingerprint(ck)
    for i in range(3):
        models = workdir / f"node-{i}" / "models"
        full = [p for p in models.iterdir() if p.name.startswith(merged.group(1))]
        assert len(full) == 1, sorted(p.name for p in models.iterdir())
        raw = (full[0] / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_json(raw)
        assert manifest.hash == full[0].name == published["manifest_hash"]
        verify_folder(full[0], manifest)
        with Checkpoint.open(full[0]) as ck:
            fp = fingerprint(ck)
        assert (fp.architecture, fp.tokenizer) == (pivot_fp.architecture, pivot_fp.tokenizer)
        assert not (workdir / f"node-{i}" / DHT_PIDS).exists()  # each node left the DHT cleanly
    assert "ok: 3 node(s) hold the verified merged model" in out
    assert merged.group(1) not in hashes.values()  # a new model, not one of the sources
    assert not _umm_processes_under(workdir), "processes of the local network were left running"
    assert list((workdir / "ready").iterdir()) == []  # each process removed its ready-file as it left

    # the same work dir again: no new expert, so the round ends without a job and publishes nothing
    again = subprocess.run([*cmd, "--keep-state"], capture_output=True, text=True, timeout=580, env=env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["published"] and summary["decision"].startswith("no new expert since round 1"), summary
    assert summary["network_merged_hash"] == published["manifest_hash"]  # the network keeps its model
    assert re.search(r"│\s*2\s*│\s*no_improvement\s*│", again.stdout), again.stdout[-3000:]


def test_options_that_cannot_work_are_refused_before_anything_starts(tmp_path):
    from umm.net.local import LocalNetConfig, LocalNetError

    with pytest.raises(LocalNetError, match="--nodes"):
        LocalNetConfig(workdir=tmp_path, nodes=0)
    with pytest.raises(LocalNetError, match="at least 3"):
        LocalNetConfig(workdir=tmp_path, evolve_evaluations=2)


def test_a_foreign_non_empty_workdir_is_refused(tmp_path):
    from umm.net.local import LocalNetError, prepare_workdir

    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(LocalNetError, match="not empty"):
        prepare_workdir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"

    ours = tmp_path / "ours"
    prepare_workdir(ours)
    (ours / "node-0").mkdir()
    prepare_workdir(ours)  # a previous run's folder is cleared
    assert [p.name for p in ours.iterdir()] == [".umm-net-local"]


def test_the_coordinator_config_it_writes_is_one_the_coordinator_loads(tmp_path):
    """The settings are a plain dict on umm's side: the coordinator's strict config must accept every key."""
    from coordinator.config import load_config
    from umm.net.local import LocalNetConfig, coordinator_settings, write_coordinator_config

    bases = {"m": "base", "c": "base", "l": None}
    suite = SimpleNamespace(models={"m": {"domains": ["math"]}, "c": {"domains": ["code"]}, "l": {"domains": ["list"]}},
                            info={"domains": {d: {"task": f"synth-{d}"} for d in ("math", "code", "list")}},
                            base_of=bases.get, path=lambda name: tmp_path / "suite" / name)
    cfg = LocalNetConfig(workdir=tmp_path, eval_limit=3, test_limit=5, max_new_tokens=4, fusion_max_steps=2, margin=-1)
    settings = coordinator_settings(cfg, suite, ["m", "c", "l", "m"], tmp_path / "fusion.jsonl")
    path = tmp_path / "coordinator" / "coordinator.yaml"
    path.parent.mkdir()
    write_coordinator_config(path, {**settings, "initial_peers": ["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"]})
    loaded = load_config(path)
    assert loaded.tasks == ["synth-math", "synth-code", "synth-list"] and loaded.network == cfg.network
    assert (loaded.eval_limit, loaded.test_limit, loaded.max_new_tokens) == (3, 5, 4)
    assert loaded.data_dir == path.parent / "data" and loaded.key_path == path.parent / "coordinator.key"
    assert loaded.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"]
    assert loaded.fusion.training.max_steps == 2 and loaded.fusion.data == tmp_path / "fusion.jsonl"
    assert loaded.base_model == tmp_path / "suite" / "base" and loaded.margin == -1  # the experts' shared base


def test_a_process_that_dies_before_it_is_ready_fails_clearly_with_its_last_output(tmp_path):
    from umm.net.local import LocalNetError, Proc, child_env

    cmd = [sys.executable, "-c", "print('loading the model'); print('no such model'); raise SystemExit(3)"]
    proc = Proc("node-0-math", cmd, tmp_path / "logs" / "node.log", child_env(), ready_file=tmp_path / "ready.json")
    with pytest.raises(LocalNetError, match=r"node-0-math exited with code 3 before it was ready") as err:
        proc.wait_ready(timeout=120)
    assert "no such model" in str(err.value)
    assert proc.finish(5) == 3


def test_a_ready_process_hands_over_its_ready_file(tmp_path):
    from umm.net.local import Proc, child_env
    from umm.net.ready import Ready, write_ready

    ready = Ready(role="node", network="n", peer_id="QmP", pid=1, initial_peers=["/ip4/127.0.0.1/tcp/9/p2p/QmP"],
                  checkpoint_address="127.0.0.1:9")
    write_ready(tmp_path / "ready.json", ready)  # as the process would once it serves
    proc = Proc("node-0", [sys.executable, "-c", "pass"], tmp_path / "node.log", child_env(),
                ready_file=tmp_path / "ready.json")
    assert proc.wait_ready(timeout=120) == ready
    proc.finish(30)


def test_the_flags_default_to_the_local_network_configs_defaults():
    """LocalNetConfig owns every default of `umm net local` (and of the demo's flags it shares)."""
    import inspect

    from umm.cli.demo import demo_command
    from umm.cli.net import local_command
    from umm.net.local import LocalNetConfig

    defaults = {name: f.default for name, f in LocalNetConfig.model_fields.items()}
    for command, shared in [(local_command, ["nodes", "rounds", "variant", "device", "eval_limit", "test_limit",
                                              "max_new_tokens", "evolve_evaluations", "fusion_max_steps",
                                              "round_timeout", "margin", "keep_state"]),
                            (demo_command, ["max_new_tokens", "margin"])]:
        options = inspect.signature(command).parameters  # each default is a typer OptionInfo
        for name in shared:
            assert options[name].default.default == defaults[name], (command.__name__, name)
            assert options[name].default.help == LocalNetConfig.model_fields[name].description, (command.__name__, name)
    assert all(f.description for f in LocalNetConfig.model_fields.values())
