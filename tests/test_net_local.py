"""``umm net local`` end to end: a coordinator and two node processes on 127.0.0.1, one round.

The command must print the leaderboard and the merged model beside its sources, exit 0, leave the
verified merged model in every node's data dir, and leave no process behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from experts_fixtures import small_suite  # noqa: F401

# `umm net` is registered in the umm app by umm/cli/__init__.py; this runs the group on its own
RUN_NET = "import typer; from umm.cli.net import register; app = typer.Typer(); register(app); app()"


def _umm_processes_under(workdir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(workdir) in cmd and "net local" not in cmd and p.pid != os.getpid():
            out.append(p)
    return out


@pytest.mark.timeout(400)
def test_local_network_merges_and_every_node_holds_the_verified_model(small_suite, tmp_path):  # noqa: F811
    from umm.checkpoints.manifest import Manifest, verify_folder
    from umm.net.store import MANIFEST_NAME

    workdir = tmp_path / "net"
    cmd = [sys.executable, "-c", RUN_NET, "net", "local", "--nodes", "2", "--rounds", "1", "--workdir", str(workdir),
           "--experts-dir", str(small_suite.root.parent), "--eval-limit", "2", "--test-limit", "2",
           "--max-new-tokens", "4", "--evolve-evaluations", "3"]
    env = {**os.environ, "COLUMNS": "250", "UMM_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]

    # the leaderboard ranks both served experts in both domains; round 1 published a merged model
    assert "Leaderboard" in out
    board = re.findall(r"│\s*(math|code)\s*│\s*([12])\s*│\s*([0-9a-f]{12})\s*│\s*(node-\d-\w+)\s*│", out)
    assert {(d, name) for d, _, _, name in board} == {(d, n) for d in ("math", "code")
                                                       for n in ("node-0-math", "node-1-code")}
    merged = re.search(r"│\s*merged\s*│\s*-\s*│\s*([0-9a-f]{12})\s*│", out)
    assert merged, out
    assert re.search(r"│\s*1\s*│\s*published\s*│\s*linear\s*│\s*" + merged.group(1), out)
    assert "Merged model vs its sources" in out and "source node-0-math" in out and "source node-1-code" in out

    # every node's store holds exactly that model, and its files match the manifest
    for i in range(2):
        models = workdir / f"node-{i}" / "models"
        full = [p for p in models.iterdir() if p.name.startswith(merged.group(1))]
        assert len(full) == 1, sorted(p.name for p in models.iterdir())
        raw = (full[0] / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_json(raw)
        assert manifest.hash == full[0].name
        verify_folder(full[0], manifest)
    assert "ok: 2 node(s) hold the verified merged model" in out
    assert merged.group(1) not in {h for _, _, h, _ in board}  # a new model, not one of the sources
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
