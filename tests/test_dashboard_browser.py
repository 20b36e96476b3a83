"""The dashboard page in a real headless browser (Debian's ``chromium``, installed by .ci/run):
the DOM after the page's scripts ran holds the leaderboard rows and the round's decision, and
contributor text shows as text (no injected handler ran).

Two servers here: the dashboard over a state built by the tests (seconds), and a real
``umm-coordinator run --dashboard 127.0.0.1:0`` process over that state, read once its own round
has finished. The page of a whole ``umm net local --dashboard ... --linger`` round is read in
tests/test_net_local.py (its round runs there anyway).
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
    assert re.search(r'id="decision-text">.*?no improvement.*?no improvement over previous', dom)
    assert "badge state-published" in dom  # round 1, in the rounds table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and XSS not in dom  # text, not an element
    assert "data-pwned" not in dom  # the reason's <img onerror=...> never became an element


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.timeout(300)
def test_a_running_coordinator_serves_the_page_of_its_rounds(tmp_path):
    """`umm-coordinator run --dashboard 127.0.0.1:0` over the state above (its data dir): it runs a
    third round (no expert announced: nothing to merge), and its page shows the leaderboard and
    that round's decision, then SIGTERM stops it and the dashboard."""
    from coordinator.config import write_config

    config, _ = write_config(tmp_path / "coord", network="dash-e2e")
    state = build_state(tmp_path / "coord" / "data")
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config), "--rounds", "1", "--linger",
           "--dashboard", "127.0.0.1:0"]
    log = open(tmp_path / "coordinator.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "UMM_NO_PROGRESS": "1"})
    url_file = tmp_path / "coord" / "data" / "dashboard_url"
    try:
        deadline, rounds, url = time.monotonic() + 180, [], ""
        while time.monotonic() < deadline and proc.poll() is None:
            if url_file.is_file():
                url = url_file.read_text().strip()
                rounds = _get_json(url + "api/rounds")["rounds"]
                if rounds and rounds[0]["number"] == 3 and rounds[0]["state"] != "running":
                    break
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "coordinator.log").read_text()[-3000:]
        assert rounds and rounds[0]["number"] == 3 and rounds[0]["state"] == "verified", rounds
        dom = browser_dom(url, tmp_path / "profile")
    finally:
        proc.terminate()  # SIGTERM: the coordinator stops, its dashboard with it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (tmp_path / "coordinator.log").read_text()
    assert f"dashboard: {url}" in output
    assert LOADED.search(dom), dom[-2000:]
    assert "dash-e2e" in dom  # the network's name, from /api/identity
    assert len(re.findall(r'class="leader-row"', dom)) == 5 and "code-expert" in dom
    assert state.code[:12] in dom
    assert re.search(r'id="decision-text">.*?verified.*?nothing to merge', dom), dom[-3000:]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and XSS not in dom and "data-pwned" not in dom
    with pytest.raises(OSError):  # stopped with the coordinator
        urllib.request.urlopen(url, timeout=5)
