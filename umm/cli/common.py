"""Pieces shared by every command module of the ``umm`` app: error handling, the default CPU
thread count (:func:`default_threads`, the one owner of that default) and config inputs that
prepare themselves (``suite:<variant>/<model>`` models, ``instructions:...`` data, ``--set``)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`umm.errors.UmmError` into a one-line ``error:`` message and exit code 2.

    ``umm.cli.run_app`` does the same for the console scripts; commands wrap their body in this too
    so the behaviour holds when the typer app is invoked directly (``typer.testing.CliRunner``).
    """
    from umm.errors import UmmError
    from umm.ui import err_console

    try:
        yield
    except UmmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None



PUSH_HELP = ("Upload the model folder to this Hugging Face Hub repo (org/name; created if needed) once it is "
             "written; token from HF_TOKEN or `hf auth login`.")
PRIVATE_HELP = "With --push-to-hub: create the repo private."


def push_output(folder: Path, repo: str, private: bool, message: str) -> None:
    """``--push-to-hub``: upload ``folder`` to ``repo`` (:func:`umm.checkpoints.hub.push_folder`)
    and print where it went."""
    from umm.checkpoints.hub import execute_push, plan_push
    from umm.ui import console, human_bytes

    plan = plan_push(folder, repo, private=private, commit_message=message)
    console.print(f"pushing {len(plan.files)} files ({human_bytes(plan.total_bytes)}) to {repo}"
                  f"{' (private)' if private else ''} ...", highlight=False)
    result = execute_push(plan)
    console.print(f"pushed: {result.commit_url or result.repo_url}", highlight=False)


def field_default(config: type[BaseModel], name: str) -> Any:
    """The default of the pydantic model ``config``'s field ``name`` (its ``default_factory`` called
    if it has one): the config owns every default, and the command-line flags that set the field
    show it (``typer.Option(field_default(C, "x"), ...)``)."""
    info = config.model_fields[name]
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def field_help(config: type[BaseModel], name: str) -> str:
    """The description of ``config``'s field ``name``: the help of the flag that sets it."""
    description = config.model_fields[name].description
    if not description:
        raise ValueError(f"{config.__name__}.{name} has no description")
    return description


# --------------------------------------------------------------------------- CPU threads


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    import math
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_max()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota[0] / quota[1])))
    return max(1, cores)


def _cgroup_cpu_max() -> tuple[int, int] | None:
    """``(quota, period)`` of this cgroup's (v2) CPU limit, or ``None`` when unlimited or unknown."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max", encoding="ascii").read().split()[:2]
        return None if quota == "max" else (int(quota), int(period))
    except (OSError, ValueError):
        return None


def default_threads(sandbox_workers: int = 0) -> int:
    """torch's CPU threads when the user gives none: ``max(1, usable_cores() - sandbox_workers)``.

    torch's own default is one intra-op thread per core. On a machine whose cores are busy (other
    jobs, or the sandboxed programs of code tasks) every parallel region then waits for a thread
    the OS has descheduled, and OpenMP busy-waits meanwhile: ``umm eval`` of a tiny model took
    10-100x longer than on one thread (figures: ``bench/bench_threads.py``). Leaving one core per
    sandbox worker keeps torch, the sandboxes and the rest of the machine from oversubscribing
    the cores; on a 2-core machine it is 1 thread, which is also the fastest for small models.
    """
    return max(1, usable_cores() - max(0, sandbox_workers))


def set_threads(threads: int | None, sandbox_workers: int = 0) -> int:
    """Set torch's CPU threads to ``threads``, or to :func:`default_threads` when ``None``; returns it."""
    import torch

    from umm.errors import UmmError

    if threads is not None and threads < 1:
        raise UmmError(f"--threads must be >= 1 (got {threads})")
    n = threads if threads is not None else default_threads(sandbox_workers)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- config inputs

#: a model reference that names a model of a tiny expert suite: ``suite:<variant>/<model>``
SUITE_PREFIX = "suite:"
#: instruction data generated from the suites' train split: ``instructions:<domain>=<n>,...``
INSTRUCTIONS_PREFIX = "instructions:"


def resolve_suite_ref(ref: str, variant: str | None = None) -> str:
    """The model folder of ``suite:<variant>/<model>``, the suite built first if it is missing.

    ``variant`` (the ``--suite`` option) replaces the variant the reference names. Builds with
    :func:`umm.experts.build.ensure_suite` into umm's experts cache (``$UMM_HOME/experts``).
    """
    from umm.errors import UmmError
    from umm.experts.build import SuiteNotBuiltError, ensure_suite, is_current, load_suite
    from umm.ui import Bars, StepBars, console

    named, sep, model = ref[len(SUITE_PREFIX):].partition("/")
    if not sep or not named or not model:
        raise UmmError(f"bad model reference {ref!r}: write suite:<variant>/<model>, e.g. suite:full/math")
    variant = variant or named
    try:
        suite = load_suite(variant)
    except SuiteNotBuiltError:
        suite = None
    if suite is None or not is_current(suite):
        console.print(f"preparing expert suite {variant!r} (built once, then cached; "
                      f"same as `umm experts prepare --variant {variant}`)", highlight=False)
        suite = ensure_suite(variant, on_step=StepBars(leave=False), on_progress=Bars())
    return str(suite.path(model))


def resolve_model_ref(ref: str, suite: str | None = None, base_dir: Path | None = None) -> str:
    """The folder of a model reference that is not a plain path: ``suite:<variant>/<model>``
    (:func:`resolve_suite_ref`) or a hub id (:func:`umm.checkpoints.hub.resolve_folder`, downloaded
    with a progress bar); anything else is returned as is, for the config's path rule
    (relative to ``base_dir``, the config's folder) to read."""
    if ref.startswith(SUITE_PREFIX):
        return resolve_suite_ref(ref, suite)
    from umm.checkpoints.hub import is_hub_ref, resolve_folder
    from umm.ui import Bars

    if not is_hub_ref(ref, base_dir=base_dir):
        return ref
    return str(resolve_folder(ref, base_dir=base_dir, on_progress=Bars()))


def resolve_instructions_ref(ref: str) -> str:
    """The JSONL file of ``instructions:<domain>=<n>,...`` (e.g. ``instructions:list=1000,math=1000``),
    written once into ``$UMM_HOME/fusion/data/`` from the suites' ``train`` split
    (:func:`umm.experts.instruction_data.write_instruction_data`, seed 0)."""
    from umm.errors import UmmError
    from umm.experts.instruction_data import write_instruction_data
    from umm.paths import home

    mixture: dict[str, int] = {}
    for part in ref[len(INSTRUCTIONS_PREFIX):].split(","):
        domain, eq, n = part.strip().partition("=")
        if not eq or not domain or not n.strip().isdigit() or int(n) < 1:
            raise UmmError(f"bad data reference {ref!r}: write instructions:<domain>=<n>,..., "
                           "e.g. instructions:list=1000,math=1000")
        mixture[domain] = int(n)
    path = home() / "fusion" / "data" / ("instructions-" + "-".join(f"{d}{n}" for d, n in mixture.items()) + ".jsonl")
    if not path.is_file():
        write_instruction_data(path, mixture)
    return str(path)


def config_overrides(
    path: Path,
    *,
    sets: Sequence[str] = (),
    suite: str | None = None,
    model_keys: Sequence[str] = (),
    data_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Top-level values that replace those of the YAML config at ``path``, for its ``load_config``.

    ``sets`` are ``KEY=VALUE`` overrides (``KEY`` may be dotted, e.g. ``budget.evaluations=9``;
    ``VALUE`` is read as YAML, e.g. ``tasks=[synth-math]``). Then every model reference under
    ``model_keys`` that is not a folder becomes one (:func:`resolve_model_ref`: ``suite:<variant>/<model>``,
    ``suite`` replacing the variant; a hub id ``org/name[@rev]``) and every ``instructions:...`` under ``data_keys`` its file
    (:func:`resolve_instructions_ref`). A file the library cannot read is left to it to report.
    """
    import copy

    from umm.configfile import read_yaml
    from umm.errors import UmmError

    try:
        data = read_yaml(Path(path), UmmError)
    except UmmError:
        data = None
    if not isinstance(data, dict):
        if sets or suite:
            raise UmmError(f"cannot apply --set/--suite: {path} is not a readable YAML mapping")
        return {}
    original = copy.deepcopy(data)
    for item in sets:
        _set_dotted(data, item)
    found = False
    for key in model_keys:
        value = data.get(key)
        refs = value if isinstance(value, list) else [value]
        found = found or any(isinstance(v, str) and v.startswith(SUITE_PREFIX) for v in refs)
        done = [resolve_model_ref(v, suite, Path(path).parent) if isinstance(v, str) else v for v in refs]
        if done != refs:
            data[key] = done if isinstance(value, list) else done[0]
    if suite is not None and not found:
        raise UmmError(f"--suite {suite} applies to suite:<variant>/<model> references, and {path} has none "
                       f"under {', '.join(model_keys)}")
    for key in data_keys:
        if isinstance(data.get(key), str) and data[key].startswith(INSTRUCTIONS_PREFIX):
            data[key] = resolve_instructions_ref(data[key])
    return {k: v for k, v in data.items() if k not in original or original[k] != v}


def _set_dotted(data: dict[str, Any], item: str) -> None:
    """Apply one ``KEY=VALUE`` override (dotted key, YAML value) to ``data`` in place."""
    import yaml

    from umm.errors import UmmError

    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise UmmError(f"--set {item!r}: write KEY=VALUE, e.g. --set budget.evaluations=9")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UmmError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    *parents, last = key.strip().split(".")
    node = data
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise UmmError(f"--set {item!r}: {p} is not a mapping in the config")
        node = node[p]
    node[last] = value

class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread, so whatever Ctrl-C cleans up is cleaned up."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread.

    A ``kill PID`` then takes the Ctrl-C path: ``with`` blocks and ``finally`` clauses run, so e.g.
    a merge removes its hidden partial output folder. Only the first SIGTERM raises; later ones
    are ignored, so they cannot cut that clean-up short (SIGKILL still ends the process). Yields
    a list that holds the signal number once one arrived. Main thread only (Python's rule).
    """
    received: list[int] = []

    def _handler(signum: int, _frame: object) -> None:
        if not received:
            received.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
