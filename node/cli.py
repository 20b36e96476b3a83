"""``umm-node``: the contributor's command line (``join``, ``status``)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from node.config import NodeConfig
from umm.cli import run_app
from umm.cli.common import field_default, field_help
from umm.net.ready import Ready, clear_ready, write_ready
from umm.speedups import freeze_for_exit
from umm.ui import console, setup_logging

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="umm-node",
    help=(
        "Contribute an expert checkpoint to a umm network: announce it on the DHT, serve it over "
        "gRPC, and fetch the merged models the coordinator publishes. Everything listens on "
        "127.0.0.1 unless told otherwise (see `umm-node join --help` for public addresses)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags shown as --x/--no-x, never with a <bool> metavar
)


@app.callback(invoke_without_command=True)
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v for INFO logs, -vv for DEBUG."),
) -> None:
    setup_logging(verbose)


#: ``_default(name)``: the default of :class:`NodeConfig`'s field ``name`` (the config owns it, the flags show it)
_default = functools.partial(field_default, NodeConfig)
#: ``_describe(name)``: its description, the help of the flag that sets it
_describe = functools.partial(field_help, NodeConfig)


_NETWORK = typer.Option(_default("network"), "--network", help=_describe("network"))
_PEERS = typer.Option(
    None, "--initial-peers", help="Multiaddr of a running peer (printed by `umm-node join`); repeat for several."
)
_COORD = typer.Option(
    None, "--coordinator-key", envvar="UMM_COORDINATOR_KEY",
    help="The coordinator's public key ('ssh-rsa AAAA...') or a file holding it. Only merged models and "
    "scores signed by this key are trusted.",
)


def _coordinator_key(value: str | None) -> bytes | None:
    from umm.net.keys import parse_public_key

    if not value:
        return None
    text = value.strip()
    if not text.startswith("ssh-"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise typer.BadParameter(f"{value!r} is neither an 'ssh-rsa AAAA...' key nor a file", param_hint="--coordinator-key")
        text = path.read_text(encoding="ascii", errors="replace").strip()
    return parse_public_key(text)


def _write_ready(path: Path, network: str, info: Any) -> None:
    """The ready-file of a started node (``info``: its :class:`node.app.NodeInfo`)."""
    write_ready(path, Ready(role="node", network=network, peer_id=info.peer_id, pid=os.getpid(),
                            initial_peers=info.dht_maddrs, checkpoint_address=info.grpc_address))


def _add_log_file(data_dir: Path) -> None:
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "node.log", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("node", "umm"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)


@app.command()
def join(
    model: str = typer.Option(..., "--model", help=_describe("model")),  # a hub id (org/name[@rev]) is fetched first
    domain: list[str] = typer.Option(..., "--domain", help="Domain the model is an expert in (repeatable)."),
    name: str | None = typer.Option(None, "--name", help=_describe("name")),
    network: str = _NETWORK,
    initial_peers: list[str] | None = _PEERS,
    coordinator_key: str | None = _COORD,
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="This node's directory: identity key, model store, logs (default: <umm home>/node)."
    ),
    identity_path: Path | None = typer.Option(
        None, "--identity-path", help="Identity key file, created if missing; it fixes the peer id (default: <data dir>/identity.key)."
    ),
    host: str = typer.Option(
        _default("host"), "--host",
        help=_describe("host"),
    ),
    port: int = typer.Option(_default("port"), "--port", help=_describe("port")),
    dht_port: int = typer.Option(_default("dht_port"), "--dht-port", help=_describe("dht_port")),
    announce_host: str | None = typer.Option(
        None, "--announce-host", help="Address other machines reach this one at (public IP or DNS name)."
    ),
    refresh_period: float = typer.Option(_default("refresh_period"), "--refresh-period", help=_describe("refresh_period")),
    max_merged_bytes: int = typer.Option(_default("max_merged_bytes"), "--max-merged-bytes", help=_describe("max_merged_bytes")),
    max_model_bytes: int = typer.Option(_default("max_model_bytes"), "--max-model-bytes", help=_describe("max_model_bytes")),
    self_eval: list[str] | None = typer.Option(
        None, "--self-eval", help="TASK[,TASK]: evaluate the model on these tasks' test split and announce the scores."
    ),
    self_eval_limit: int = typer.Option(50, "--self-eval-limit", help="Items per self-evaluated task."),
    device: str | None = typer.Option(None, "--device", help="Device for --self-eval (cpu, cuda, ...)."),
    base_model: str | None = typer.Option(None, "--base-model", help=_describe("base_model")),
    ready_file: Path | None = typer.Option(
        None, "--ready-file", help="Once serving, write this node's peer id and addresses here as JSON "
        "(umm.net.ready.Ready, for programs that start nodes); removed when the node leaves."
    ),
) -> None:
    """Check the model, announce it, serve it, and fetch each new merged model. Ctrl-C leaves."""
    from node.app import Node, check_model
    from node.config import default_data_dir
    from node.selfeval import parse_tasks, self_evaluate
    from umm.checkpoints.hub import resolve_folder
    from umm.ui import Bars

    cfg = NodeConfig(
        model=resolve_folder(model, on_progress=Bars(), real_files=True), domains=list(domain), name=name, network=network,
        data_dir=data_dir if data_dir is not None else default_data_dir(), identity_path=identity_path,
        initial_peers=list(initial_peers or []), coordinator_public_key=_coordinator_key(coordinator_key),
        host=host, port=port, dht_port=dht_port, announce_host=announce_host, refresh_period=refresh_period,
        max_merged_bytes=max_merged_bytes, max_model_bytes=max_model_bytes, base_model=base_model,
    )
    from umm.net.records import check_network

    check_network(network)
    tasks = parse_tasks(self_eval or [])
    console.print(f"checking {model} ...", highlight=False)
    report = check_model(cfg.model, cfg.max_model_bytes)  # a clear error before anything is announced
    console.print(
        f"model ok: {report.fingerprint.model_type}, {report.num_parameters:,} parameters, manifest {report.manifest.hash}",
        highlight=False,
    )
    if tasks:
        scores = self_evaluate(cfg.model, tasks, limit=self_eval_limit, device=device)
        cfg = cfg.model_copy(update={"self_scores": scores})  # frozen: a copy that announces them
        console.print("self-reported scores: " + ", ".join(f"{k} {v:.3f}" for k, v in cfg.self_scores.items()),
                      highlight=False)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    _add_log_file(cfg.data_dir)

    node = Node(cfg, report=report)
    info = node.start()
    previous = {}

    def _on_signal(signum: int, _frame: object) -> None:
        for s, h in previous.items():  # a second Ctrl-C interrupts the shutdown itself
            signal.signal(s, h)
        node.request_stop()

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, _on_signal)
    try:
        console.print(f"joined network {network!r} as {info.peer_id}", highlight=False)
        console.print(f"serving {cfg.name or cfg.model.resolve().name} ({info.manifest_hash[:12]}) at {info.grpc_address}",
                      highlight=False)
        console.print("other peers can join with:", highlight=False)
        for m in info.dht_maddrs:
            console.print(f"  --initial-peers {m}", highlight=False, soft_wrap=True)
        if cfg.coordinator_public_key is None:
            console.print("no --coordinator-key: merged models will not be fetched", highlight=False)
        if ready_file is not None:  # before the last line: a reader of either sees a node that serves
            _write_ready(ready_file, network, info)
        console.print(f"data dir {info.data_dir}; Ctrl-C to leave", highlight=False)
        sys.stdout.flush()
        node.run_forever()
    finally:
        clear_ready(ready_file)  # first: the node stops serving now
        node.stop()  # bounded (node.app): withdraw, stop serving, leave the DHT
        freeze_for_exit()
    console.print("left the network", highlight=False)


@app.command()
def status(
    network: str = _NETWORK,
    initial_peers: list[str] = typer.Option(..., "--initial-peers", help="Multiaddr of a running peer; repeat for several."),
    coordinator_key: str | None = _COORD,
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print JSON instead of tables."),
) -> None:
    """Print what the network holds: experts, leaderboard, latest merged model."""
    from node.status import read_status, render, to_json
    from umm.net.dht import start_dht
    from umm.net.keys import load_key
    from umm.net.records import NetworkRecords

    coord = _coordinator_key(coordinator_key)
    with tempfile.TemporaryDirectory(prefix="umm-node-status-") as tmp:
        identity = Path(tmp) / "identity.key"  # a throwaway peer: never the identity of a running node
        dht = start_dht(network, identity, initial_peers=initial_peers, coordinator_public_key=coord, client_mode=True)
        try:
            state = read_status(NetworkRecords(dht, network, load_key(identity), coord))
        finally:
            dht.shutdown()
    if as_json:
        console.out(json.dumps(to_json(state), indent=1), highlight=False)
    else:
        render(state, console)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)
