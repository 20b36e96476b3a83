"""``umm-coordinator run`` told to stop with SIGTERM (as a service manager or ``kill`` does)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
import yaml

from umm.net.dht import DHT_PIDS, end_orphaned_dht


def test_sigterm_stops_the_coordinator_cleanly_and_ends_its_dht(tmp_path):
    data_dir = tmp_path / "data"
    config = tmp_path / "coordinator.yaml"
    config.write_text(yaml.safe_dump({
        "network": "sigtest", "data_dir": str(data_dir), "key_path": str(tmp_path / "coord.key"),
        "tasks": ["synth-math"], "eval_limit": 2, "test_limit": 2, "round_interval": 0.0, "merge": False,
    }))
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config), "--rounds", "1", "--linger"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # a round over an empty network, then it lingers
            lines.append(line)
            if "serving until interrupted" in line:
                break
        assert proc.poll() is None, "".join(lines[-30:])
        dht = [psutil.Process(e["pid"]) for e in json.loads((data_dir / DHT_PIDS).read_text())]

        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]  # generous: a hang fails here, not a slow machine
        assert proc.returncode == 0, "".join(lines[-30:]) + out[-3000:]
        assert "interrupted; the round resumes on the next start" in out
        _, alive = psutil.wait_procs(dht, timeout=15)
        assert not alive and not (data_dir / DHT_PIDS).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        end_orphaned_dht(data_dir / DHT_PIDS)
