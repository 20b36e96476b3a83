"""``umm-node join`` as a user runs it: clear refusal of a bad model, bootstrap addresses, Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file, save_file
from subprocs import ctrl_c_default

from node.cli import main
from umm.net import keys
from umm.net.dht import DHT_PIDS, end_orphaned_dht, start_dht
from umm.net.ready import read_ready
from umm.net.records import NetworkRecords

NET = "clitest"


def test_join_refuses_a_nan_model_with_a_clear_error(tiny_models, tmp_path, capsys):
    bad = tmp_path / "nan"
    shutil.copytree(tiny_models["math"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit) as exc:
        main(["join", "--model", str(bad), "--domain", "math", "--data-dir", str(data_dir), "--network", NET])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and name in err
    assert not (data_dir / "identity.key").exists()  # nothing was started


def test_join_rejects_an_unknown_self_eval_task_and_a_bad_coordinator_key(tiny_models, tmp_path, capsys):
    base = ["join", "--model", str(tiny_models["math"]), "--domain", "math", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--self-eval", "no-such-task"])
    assert exc.value.code == 2 and "no-such-task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(base + ["--coordinator-key", "ssh-rsa AAAAnot-a-key"])
    assert exc.value.code == 2 and "OpenSSH" in " ".join(capsys.readouterr().err.split())


def test_self_eval_task_lists_are_split_and_checked():
    from node.selfeval import parse_tasks
    from umm.eval import EvalError

    assert parse_tasks(["synth-math,synth-list", "synth-math", " gsm8k "]) == ["synth-math", "synth-list", "gsm8k"]
    with pytest.raises(EvalError, match="nope"):
        parse_tasks(["gsm8k,nope"])


def test_join_flags_default_to_the_node_configs_defaults():
    """NodeConfig owns every default; the flags of `umm-node join` show it, never a copy."""
    import inspect

    from node.cli import join
    from node.config import NodeConfig

    options = inspect.signature(join).parameters  # each default is a typer OptionInfo
    defaults = {name: f.default for name, f in NodeConfig.model_fields.items()}
    for name in ["network", "host", "port", "dht_port", "refresh_period", "max_merged_bytes", "max_model_bytes"]:
        assert options[name].default.default == defaults[name], name


def test_join_flags_help_is_the_node_configs_descriptions_and_the_config_is_frozen(tmp_path):
    """The help of a flag that sets a NodeConfig field is that field's description, never a copy."""
    import inspect

    import pydantic

    from node.cli import join
    from node.config import NodeConfig

    options = inspect.signature(join).parameters
    for name in ["model", "name", "network", "host", "port", "dht_port", "refresh_period", "max_merged_bytes",
                 "max_model_bytes", "base_model"]:
        assert options[name].default.help == NodeConfig.model_fields[name].description, name
    assert all(f.description for f in NodeConfig.model_fields.values())
    cfg = NodeConfig(model=tmp_path, domains=["math"], data_dir=tmp_path)
    with pytest.raises(pydantic.ValidationError):
        cfg.port = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        NodeConfig(model=tmp_path, domains=["math"], data_dir=tmp_path, prot=1)  # type: ignore[call-arg]


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _wait_line(lines: queue.Queue, needle: str, timeout: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            return False
        seen.append(line)
        if needle in line:
            return True
    return False


def test_join_prints_bootstrap_addresses_and_ctrl_c_withdraws_and_exits_cleanly(tiny_models, tmp_path):
    env = {**os.environ, "UMM_HOME": str(tmp_path / "home"), "UMM_NO_PROGRESS": "1", "COLUMNS": "250"}
    cmd = [sys.executable, "-c", "from node.cli import main; main()", "join", "--model", str(tiny_models["math"]),
           "--domain", "math", "--name", "cli-expert", "--network", NET, "--refresh-period", "60",
           "--ready-file", str(tmp_path / "ready.json")]
    # its own process group, like a shell job: Ctrl-C in a terminal reaches the whole group
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True, preexec_fn=ctrl_c_default)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    dht = None
    try:
        if not _wait_line(lines, "Ctrl-C to leave", 90, seen):
            proc.kill()
            pytest.fail("join did not start:\n" + "".join(seen) + proc.stderr.read())
        peers = [line.split("--initial-peers", 1)[1].strip() for line in seen if "--initial-peers" in line]
        assert peers and all("/p2p/" in p and "127.0.0.1" in p for p in peers)
        # the same, typed, for programs: the ready-file
        ready = read_ready(tmp_path / "ready.json")
        assert ready is not None and (ready.role, ready.network, ready.pid) == ("node", NET, proc.pid)
        assert ready.initial_peers == peers and ready.peer_id in peers[0] and ready.checkpoint_address.startswith("127.0.0.1:")
        # the default data dir is <umm home>/node
        assert (tmp_path / "home" / "node" / "identity.key").is_file()

        # another peer bootstraps from the printed address and sees the node's record
        dht = start_dht(NET, tmp_path / "peer.key", initial_peers=peers)
        records = NetworkRecords(dht, NET, keys.load_key(tmp_path / "peer.key"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(e.record.name == "cli-expert" for e in records.experts().values()):
            time.sleep(0.5)
        assert any(e.record.name == "cli-expert" for e in records.experts().values())

        # the node's DHT process and hivemind's p2p daemon, recorded in its data dir
        dht_procs = [psutil.Process(e["pid"]) for e in json.loads((tmp_path / "home" / "node" / DHT_PIDS).read_text())]
        assert len(dht_procs) == 2

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: SIGINT to the whole process group
        rc = proc.wait(timeout=30)  # generous on a loaded machine; a hang fails here
        assert rc == 0, proc.stderr.read()
        assert _wait_line(lines, "left the network", 5, seen)
        assert read_ready(tmp_path / "ready.json") is None  # it no longer serves
        # withdrawn, not left to expire (the record's TTL is 2 x 60 s): the DHT outlived the Ctrl-C
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(e.record.name == "cli-expert" for e in records.experts().values()):
            time.sleep(0.5)
        assert not any(e.record.name == "cli-expert" for e in records.experts().values())
        _, alive = psutil.wait_procs(dht_procs, timeout=10)
        assert not alive, f"left behind: {alive}"
        with pytest.raises(ProcessLookupError):  # nothing else of the node's group either
            os.killpg(proc.pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        end_orphaned_dht(tmp_path / "home" / "node" / DHT_PIDS)  # after a failure: the DHT is in its own group
        if dht is not None:
            dht.shutdown()
