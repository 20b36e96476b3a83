"""``umm demo`` through the ``umm`` command line: expert suite + a local network, end to end.

Run on the small suite (built once per test session) with small limits: the demo must find the
suite cached, start the network, print the leaderboard and the merged model beside its sources,
have every node verify the merged model, print where things are, and exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from experts_fixtures import small_suite  # noqa: F401

RUN_UMM = "from umm.cli import main; main()"


@pytest.mark.timeout(400)
def test_demo_prepares_the_experts_and_runs_a_verified_local_network(small_suite, tmp_path):  # noqa: F811
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-c", RUN_UMM, "demo", "--variant", "small", "--experts-dir", str(small_suite.root.parent),
           "--workdir", str(workdir), "--nodes", "2", "--eval-limit", "2", "--test-limit", "2",
           "--max-new-tokens", "4", "--evolve-evaluations", "3",
           "--margin", "-1"]  # the small suite's toy models score about 0: publish whatever the gain
    env = {**os.environ, "COLUMNS": "250", "UMM_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]

    assert "expert suite 'small': cached" in out  # the fixture built it: step 1 reuses it
    assert "Leaderboard" in out and "node-0-math" in out and "node-1-code" in out
    assert "Merged model vs its sources (test split)" in out and "published: merged beats" in out
    assert "ok: 2 node(s) hold the verified merged model" in out
    merged = re.search(r"^  merged model:\s+(\S+)$", out, re.M)
    assert merged, out
    folder = merged.group(1)
    assert folder.startswith(str(workdir / "node-")) and (workdir / folder).is_dir()
    assert re.search(r"^  nodes holding it \(verified\):\s+2 of 2$", out, re.M)
    assert re.search(r"^umm demo: done in \d+ s$", out, re.M)
