"""``umm-coordinator``: the coordinator's command line (init, run, status)."""

from __future__ import annotations

from pathlib import Path

import typer

from umm.cli import run_app

app = typer.Typer(
    name="umm-coordinator",
    help=(
        "Run a umm network's coordinator: discover experts on the DHT, re-evaluate and rank them, "
        "merge the best and publish the result."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags shown as --x/--no-x, never with a <bool> metavar
)


@app.callback(invoke_without_command=True)
def _root() -> None:
    pass


@app.command()
def init(
    folder: Path = typer.Argument(Path("."), help="Where to write coordinator.yaml and coordinator.key."),
    network: str = typer.Option("umm", help="Network name (letters, digits, '-', '_')."),
    force: bool = typer.Option(False, "--force/--no-force", help="Overwrite an existing config and key."),
) -> None:
    """Write a commented config and a fresh key pair; print the public key nodes must trust."""
    from coordinator.config import write_config
    from umm.net.keys import load_key, public_key_text
    from umm.ui import console

    config_path, key_path = write_config(folder, network=network, overwrite=force)
    console.print(f"wrote {config_path} and {key_path}", soft_wrap=True, highlight=False)
    console.print("coordinator public key (give it to the nodes with --coordinator-key):")
    console.print(public_key_text(load_key(key_path)), soft_wrap=True, highlight=False)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="coordinator.yaml (from `umm-coordinator init`)."),
    rounds: int = typer.Option(0, help="Stop after this many rounds (0: run until interrupted)."),
    linger: bool = typer.Option(
        False, "--linger/--no-linger", help="After the last of --rounds, keep serving files, status and records until interrupted."
    ),
    dashboard: str = typer.Option(
        None, "--dashboard", metavar="HOST:PORT", help="Serve the read-only web dashboard here (default: the "
        "config's `dashboard`, else off; :PORT binds 127.0.0.1, port 0 a free port)."
    ),
    verbose: int = typer.Option(1, "--verbose", "-v", count=True, help="More log output."),
    ready_file: Path = typer.Option(
        None, "--ready-file", help="Once serving, write the coordinator's peer id and addresses here as JSON "
        "(umm.net.ready.Ready, for programs that start coordinators); removed when it stops."
    ),
) -> None:
    """Run rounds: discover, fetch, admit, evaluate, rank, publish scores, merge, publish if better."""
    from coordinator.app import Coordinator
    from coordinator.config import load_config
    from umm.cli.common import sigterm_as_interrupt
    from umm.net.ready import clear_ready, write_ready
    from umm.speedups import freeze_for_exit
    from umm.ui import console, setup_logging

    setup_logging(verbose)
    cfg = load_config(config)
    if dashboard is not None:
        from coordinator.dashboard.address import parse_bind

        parse_bind(dashboard)  # a malformed HOST:PORT is refused before anything starts
        cfg = cfg.model_copy(update={"dashboard": dashboard})
    coordinator = Coordinator(cfg)
    # SIGTERM as Ctrl-C: the work in progress (an evaluation, a fetch) is interrupted at once and
    # the round resumes on the next start, as after a crash
    with sigterm_as_interrupt():
        try:
            coordinator.start()
            maddrs = coordinator.maddrs
            console.print(f"coordinator of network [bold]{cfg.network}[/]", highlight=False)
            console.print(f"  DHT peers join with: {' '.join(maddrs)}", soft_wrap=True, highlight=False)
            console.print(f"  public key: {coordinator.public_key_text}", soft_wrap=True, highlight=False)
            console.print(f"  checkpoint service: {coordinator.address}", highlight=False)
            if ready_file is not None:  # before the last line: a reader of either sees a coordinator that serves
                write_ready(ready_file, coordinator.ready(maddrs))
            if coordinator.dashboard is not None:
                console.print(f"  dashboard: {coordinator.dashboard.url}", highlight=False)
            console.print(f"  status service: {coordinator.status_address}", highlight=False)
            coordinator.run(rounds=rounds or None)
            if linger and not coordinator.stop_event.is_set():
                console.print("rounds done; serving until interrupted", highlight=False)
                while not coordinator.stop_event.wait(0.5):
                    pass
        except KeyboardInterrupt:
            console.print("interrupted; the round resumes on the next start")
        finally:
            clear_ready(ready_file)  # first: the coordinator stops serving now
            coordinator.stop()  # bounded (coordinator.app): withdraw, stop serving, leave the DHT
            freeze_for_exit()


@app.command()
def status(
    address: str = typer.Option("", "--address", "-a", help="host:port of the status service."),
    config: Path = typer.Option(None, "--config", "-c",
                                help="Read the address a running coordinator wrote into its data_dir."),
    rounds: int = typer.Option(10, help="How many recent rounds to show."),
) -> None:
    """Print the leaderboard (with rejections and reasons), the rounds and the current job's progress."""
    from coordinator.config import CoordinatorConfigError, load_config
    from coordinator.status import print_status
    from umm.net.status import fetch_status

    if not address:
        if config is None:
            raise CoordinatorConfigError("give --address HOST:PORT or --config FILE of a running coordinator")
        cfg = load_config(config)
        found = cfg.data_dir / "status_address"
        if not found.is_file():
            raise CoordinatorConfigError(f"{found} does not exist: is the coordinator running? (or pass --address)")
        address = found.read_text().strip()
    print_status(fetch_status(address, limit=rounds))


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)


if __name__ == "__main__":
    main()
