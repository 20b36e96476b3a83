"""The dashboard page in a real headless browser (Debian's ``chromium``, installed by .ci/run):
the DOM after the page's scripts ran holds the leaderboard rows and the round's decision, and
contributor text shows as text (no injected handler ran).

Two servers: the dashboard over a state built by the tests (seconds), and a whole
``umm net local --nodes 2 --variant small --dashboard 127.0.0.1:0 --linger`` network, whose page is
read once its round has finished, then the network is stopped with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_state import XSS, build_state

from coordinator.dashboard.models import Identity
from coordinator.dashboard.server import DashboardServer, DashboardSource

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here "
                                "(apt-get install -y chromium; .ci/run installs it)")
RUN_UMM = "from umm.cli import console_main; console_main()"
LOADED = re.compile(r'id="refreshed" class="muted">updated ')


def browser_dom(url: str, profile: Path, tries: int = 3) -> str:
    """The page's DOM after its scripts ran (``chromium --headless --dump-dom``); tried again while it
    does not show a successful refresh (a busy machine), at most ``tries`` times."""
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    dom = ""
    for _ in range(tries):
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
        if LOADED.search(dom):
            break
    return dom


def test_the_page_shows_the_leaderboard_and_the_decision_and_contributor_text_as_text(tmp_path):
    state = build_state(tmp_path / "state")
    identity = Identity(network="umm-test", public_key="ssh-rsa AAAAtest", checkpoint_address="127.0.0.1:1",
                        status_address="127.0.0.1:2", version="test")
    server = DashboardServer(DashboardSource(state.db_path, lambda: identity)).start()
    try:
        dom = browser_dom(server.url, tmp_path / "profile")
    finally:
        server.stop()
    assert LOADED.search(dom), dom[-2000:]
    assert len(re.findall(r'class="leader-row"', dom)) == 5  # 3 ranked rows + rejected + pending
    assert "code-expert" in dom and "slow-expert" in dom
    assert re.search(r'id="decision-text">.*?not better.*?does not beat round 1', dom)
    assert "badge state-published" in dom  # round 1, in the rounds table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and XSS not in dom  # text, not an element
    assert "data-pwned" not in dom  # the reason's <img onerror=...> never became an element


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.timeout(600)
def test_the_page_of_a_local_network_shows_its_round(tmp_path):
    workdir = tmp_path / "net"
    env = {**os.environ, "UMM_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-c", RUN_UMM, "net", "local", "--nodes", "2", "--variant", "small", "--workdir",
           str(workdir), "--dashboard", "127.0.0.1:0", "--linger"]
    log = open(tmp_path / "net-local.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url_file = workdir / "coordinator" / "data" / "dashboard_url"
        deadline = time.monotonic() + 540
        rounds: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            if url_file.is_file():
                url = url_file.read_text().strip()
                rounds = _get_json(url + "api/rounds")["rounds"]
                if rounds and rounds[0]["state"] != "running":
                    break
            time.sleep(2)
        assert proc.poll() is None, (tmp_path / "net-local.log").read_text()[-3000:]
        assert rounds and rounds[0]["state"] != "running", "the round did not finish"
        dom = browser_dom(url, tmp_path / "profile")
        board = _get_json(url + "api/leaderboard")
        names = {r["model"]["name"] for d in board["domains"] for r in d["rows"]}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the lingering network stops
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "net-local.log").read_text()
    assert "dashboard: http://127.0.0.1:" in output and "stay up until Ctrl-C" in output
    assert LOADED.search(dom), dom[-2000:]
    assert len(names) == 2 and all(n in dom for n in names)  # both experts' rows are on the page
    assert len(re.findall(r'class="leader-row"', dom)) >= 2
    decision = re.search(r'id="decision-text">(.*?)</p>', dom)
    assert decision and rounds[0]["reason"].split()[0] in decision.group(1)
    assert proc.returncode is not None
