"""``umm net local`` end to end: a coordinator and three node processes on 127.0.0.1, one round.

The nodes serve the small suite's math and code experts (Llama, one tokenizer) and its list expert
(GPT-NeoX, another tokenizer), so the round must plan a *fusion* into the pivot, run it in the
coordinator's worker, evaluate it, publish it, and every node must download and verify it. The
command must print the leaderboard and the merged model beside its sources, exit 0, and leave no
process behind.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

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


def _step(db: Path, name: str) -> dict:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        row = c.execute("SELECT result FROM steps WHERE round=1 AND name=? AND status='done'", (name,)).fetchone()
    assert row is not None, f"round 1 has no finished {name} step"
    return json.loads(row[0])


@pytest.mark.timeout(600)
def test_local_network_fuses_two_families_and_every_node_holds_the_verified_model(small_suite, tmp_path):  # noqa: F811
    from umm.checkpoints.fingerprint import fingerprint
    from umm.checkpoints.manifest import Manifest, build_manifest, verify_folder
    from umm.checkpoints.reader import Checkpoint
    from umm.net.dht import DHT_PIDS
    from umm.net.store import MANIFEST_NAME

    workdir = tmp_path / "net"
    cmd = [sys.executable, "-c", RUN_NET, "net", "local", "--nodes", "3", "--rounds", "1", "--workdir", str(workdir),
           "--experts-dir", str(small_suite.root.parent), "--eval-limit", "2", "--test-limit", "2",
           "--max-new-tokens", "4", "--fusion-max-steps", "2"]
    env = {**os.environ, "COLUMNS": "250", "UMM_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]

    # the leaderboard ranks the three served experts in the three domains
    assert "Leaderboard" in out
    board = re.findall(r"│\s*(math|code|list)\s*│\s*([123])\s*│\s*([0-9a-f]{12})\s*│\s*(node-\d-\w+)\s*│", out)
    assert {(d, name) for d, _, _, name in board} == {(d, n) for d in ("math", "code", "list") for n in NODES}
    hashes = {name: h for _, _, h, name in board}

    # two families: the plan is a fusion into the pivot, with the other domains' best as sources
    db = workdir / "coordinator" / "data" / "state.db"
    plan = _step(db, "plan")
    assert plan["kind"] == "fusion", plan
    pivot, sources = plan["pivot"], plan["sources"]
    assert sorted(h[:12] for h in [pivot, *sources]) == sorted(hashes.values())
    merged = re.search(r"│\s*merged\s*│\s*-\s*│\s*([0-9a-f]{12})\s*│", out)
    assert merged, out
    assert re.search(r"│\s*1\s*│\s*published\s*│\s*fusion\s*│\s*" + merged.group(1), out)
    assert "Merged model vs its sources" in out and all(f"source {n}" in out for n in NODES)
    published = _step(db, "publish")["record"]
    assert published["method"] == "fusion" and published["manifest_hash"][:12] == merged.group(1)
    assert sorted(published["sources"]) == sorted([pivot, *sources])

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


def test_options_that_cannot_work_are_refused_before_anything_starts(tmp_path):
    from umm.netlocal import LocalNetConfig, LocalNetError

    with pytest.raises(LocalNetError, match="--nodes"):
        LocalNetConfig(workdir=tmp_path, nodes=0)
    with pytest.raises(LocalNetError, match="at least 3"):
        LocalNetConfig(workdir=tmp_path, evolve_evaluations=2)


def test_a_foreign_non_empty_workdir_is_refused(tmp_path):
    from umm.netlocal import LocalNetError, prepare_workdir

    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(LocalNetError, match="not empty"):
        prepare_workdir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"

    ours = tmp_path / "ours"
    prepare_workdir(ours)
    (ours / "node-0").mkdir()
    prepare_workdir(ours)  # a previous run's folder is cleared
    assert [p.name for p in ours.iterdir()] == [".umm-net-local"]
