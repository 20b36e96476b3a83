"""``umm evolve --ray``: candidates scored on the actors of a local Ray cluster (a head and one
more worker node, started and stopped here) reach the serial search's result; an actor killed
mid-generation has its candidate re-run; a killed driver resumes; a bad cluster fails early.

Skipped when ray is not installed (``pip install 'umm[ray]'``; the ``test`` extra has it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from evolve_probe import make_references, register_probe

ray = pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    """The environment of the Ray processes and the driver subprocess: this checkout importable."""
    path = os.pathsep.join(p for p in (str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "UMM_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def cluster():
    from umm.evolve.ray_pool import local_cluster

    with local_cluster((1, 1), env=_env()) as c:
        yield c
    # every process of the cluster is gone (its sessions are empty)
    from umm.evolve.ray_pool import _session_processes

    assert not [p for proc in c.procs for p in _session_processes(proc.pid)]
    assert not c.temp_dir.exists()


@pytest.fixture(scope="module")
def probe(tiny_models, tmp_path_factory) -> Path:
    refs = make_references(tiny_models["math"], tmp_path_factory.mktemp("probe") / "refs.json", name="mimic-math")
    register_probe(refs)
    return refs


def _config(tiny_models, **over) -> dict:
    cfg = {
        "models": [str(tiny_models["math"]), str(tiny_models["code"])],
        "base_model": str(tiny_models["base"]),
        "tasks": [{"name": "mimic-math", "search_size": 8, "test_size": 8}],
        "population": 4,
        "budget": {"evaluations": 1 + 4 * 2},
        "seed": 3,
        "device": "cpu",
        "batch_size": 32,
        "compare": False,
        "write_model": False,
    }
    cfg.update(over)
    return cfg


def _candidates(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    return [(r["generation"], r["candidate"], r["genome"], r["scores"], r["fitness"]) for r in rows]


@pytest.fixture(scope="module")
def serial(probe, tiny_models, tmp_path_factory) -> Path:
    """The serial search every Ray search is compared with."""
    import torch

    from umm.evolve.config import parse_config
    from umm.evolve.run import run_evolve

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("serial") / "run"
    run_evolve(parse_config(_config(tiny_models)), run)
    return run


def test_ray_search_reaches_the_serial_result_through_a_killed_actor(
    cluster, serial, tiny_models, tmp_path, monkeypatch
) -> None:
    """Two actors (one per node); the actor just given candidate 1 of generation 2 is killed
    (ray.kill): the candidate is re-run on another or a new actor, and every candidate's scores,
    the best recipe and the references equal the serial search's."""
    from umm.evolve.config import parse_config
    from umm.evolve.ray_pool import RayPool
    from umm.evolve.run import run_evolve

    pools: list[RayPool] = []
    killed: list[tuple[int, int]] = []

    def kill_once(generation: int, candidate: int, actor) -> None:
        if generation == 2 and candidate == 1 and not killed:
            ray.kill(actor, no_restart=True)
            killed.append((generation, candidate))

    start = RayPool.start.__func__

    def start_with_hook(cls, *args, **kwargs):
        pool = start(cls, *args, **kwargs)
        pool.on_dispatch = kill_once
        pools.append(pool)
        return pool

    monkeypatch.setattr(RayPool, "start", classmethod(start_with_hook))
    result = run_evolve(parse_config(_config(tiny_models, ray=cluster.address)), tmp_path / "ray")
    [pool] = pools
    assert len(pool.hosts) == 2, "one actor per CPU of the two nodes"
    assert killed == [(2, 1)] and pool.restarts == 1
    assert _candidates(tmp_path / "ray") == _candidates(serial)
    assert len({c[-1] for c in _candidates(serial)}) > 1, "the probe fitness should vary with the genome"
    assert (tmp_path / "ray" / "best_recipe.yaml").read_text() == (serial / "best_recipe.yaml").read_text()
    # the references (sources and untuned merges on the search items) were scored on an actor
    assert (tmp_path / "ray" / "references.json").read_text() == (serial / "references.json").read_text()
    assert result.state.evaluations == 9
    assert not pool.actors and not ray.is_initialized(), "run_evolve ends its actors and disconnects"


def test_resume_after_the_driver_is_killed(cluster, probe, serial, tiny_models, tmp_path) -> None:
    from umm.evolve.config import load_config
    from umm.evolve.run import run_evolve

    cfg_path = tmp_path / "evolve.yaml"
    # one actor for the driver that is killed (the cheaper), two after the resume
    cfg_path.write_text(yaml.safe_dump(_config(tiny_models, ray=cluster.address, ray_actors=1)))
    run = tmp_path / "killed"
    cmd = [sys.executable, str(HERE / "evolve_probe.py"), str(probe), "--", str(cfg_path), "--run-dir", str(run),
           "--threads", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = run / "search_state.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state_file.exists() and len(json.loads(state_file.read_text())["generations"]) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the search ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert len(json.loads(state_file.read_text())["generations"]) == 2
    assert not (run / "best_recipe.yaml").exists()

    # new actors (the killed driver's died with it) finish the search: the serial result; and with
    # the final table on (a resumable change), its rows come from the actors and the merged model
    result = run_evolve(load_config(cfg_path, ray_actors=2, compare=True, write_model=True, baselines=["task_arithmetic"]),
                        run, resume=True)
    assert _candidates(run) == _candidates(serial)
    assert (run / "best_recipe.yaml").read_text() == (serial / "best_recipe.yaml").read_text()
    rows = {r.name: r for r in result.comparison.rows}
    assert list(rows) == ["evolved (cma, task_arithmetic)", "base: base", "source: math", "source: code",
                          "untuned task_arithmetic"]
    assert rows["source: math"].objective == pytest.approx(1.0, abs=0.15)  # the probe mimics the math expert
    assert result.model_dir == run / "merged" and rows["evolved (cma, task_arithmetic)"].path == str(run / "merged")


def test_a_bad_cluster_fails_before_the_search(cluster, probe, tiny_models, tmp_path) -> None:
    from typer.testing import CliRunner

    from umm.cli import app
    from umm.evolve.config import parse_config
    from umm.evolve.ray_pool import RayPoolError, free_port
    from umm.evolve.run import run_evolve

    # nothing listens there: a typed error naming the address, at once (ray.init would retry for minutes)
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RayPoolError, match=f"(?s){dead}.*unreachable"):
        run_evolve(parse_config(_config(tiny_models, ray=dead)), tmp_path / "a")
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "a" / "search_state.json").exists()
    # a CUDA search on a cluster without a GPU
    with pytest.raises(RayPoolError, match="(?s)device 'cuda'.*no GPU.*CPU 2"):
        run_evolve(parse_config(_config(tiny_models, ray=cluster.address, device="cuda")), tmp_path / "b")
    assert not (tmp_path / "b" / "search_state.json").exists()
    assert not ray.is_initialized()
    # more actors than the cluster holds
    with pytest.raises(RayPoolError, match="holds 2 actor"):
        run_evolve(parse_config(_config(tiny_models, ray=cluster.address, ray_actors=3)), tmp_path / "c")
    # the CLI: exit code 2 and the reason
    cfg_path = tmp_path / "evolve.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_models)))
    r = CliRunner().invoke(app, ["evolve", str(cfg_path), "--run-dir", str(tmp_path / "d"), "--ray", dead, "--threads", "1"])
    assert r.exit_code == 2 and "unreachable" in r.output, r.output
