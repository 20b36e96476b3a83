"""The dashboard's flags: `umm-coordinator run --dashboard`, and `umm net local` / `umm demo`
passing `--dashboard` to the coordinator and keeping the network up with `--linger`."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest


def test_net_local_passes_the_dashboard_address_to_the_coordinator(tmp_path):
    from umm.net.local import coordinator_command

    cmd = coordinator_command(tmp_path / "c.yaml", rounds=2, ready_file=tmp_path / "r.json", dashboard="127.0.0.1:0")
    assert cmd[cmd.index("--dashboard") + 1] == "127.0.0.1:0"
    assert "--dashboard" not in coordinator_command(tmp_path / "c.yaml", rounds=2, ready_file=tmp_path / "r.json")


def test_net_local_reads_the_url_from_the_file_the_coordinator_writes():
    from coordinator.dashboard.address import URL_FILE
    from umm.net.local import DASHBOARD_URL_FILE

    assert DASHBOARD_URL_FILE == URL_FILE  # umm never imports coordinator: the name is the contract


def test_the_flags_default_to_the_local_network_configs_defaults():
    from umm.cli.demo import demo_command
    from umm.cli.net import local_command
    from umm.net.local import LocalNetConfig

    fields = LocalNetConfig.model_fields
    assert fields["dashboard"].default is None and fields["linger"].default is False
    for command in (local_command, demo_command):
        options = inspect.signature(command).parameters
        for name in ("dashboard", "linger"):
            assert options[name].default.default == fields[name].default, (command.__name__, name)
            assert options[name].default.help == fields[name].description, (command.__name__, name)


def test_a_malformed_dashboard_address_is_refused_before_the_coordinator_starts(tmp_path):
    from coordinator.cli import main
    from coordinator.config import write_config

    config, _ = write_config(tmp_path, network="dash-test")
    with pytest.raises(SystemExit) as e:
        main(["run", "--config", str(config), "--dashboard", "localhost:http"])
    assert e.value.code != 0
    assert not (tmp_path / "data" / "state.db").exists()  # nothing started


def test_a_coordinator_config_can_turn_the_dashboard_on(tmp_path: Path):
    from coordinator.config import load_config, write_config

    config, _ = write_config(tmp_path, network="dash-test")
    text = config.read_text()
    assert "dashboard:" in text  # the template documents the key
    config.write_text(text.replace("dashboard: null", "dashboard: ':0'"))
    assert load_config(config).dashboard == ":0"
