"""Candidate evaluation on a Ray cluster: ``umm evolve CONFIG --ray auto|ADDRESS``.

:class:`RayPool` connects to a running cluster, checks it can run the search (reachable, a GPU
when a CUDA device is asked), and starts ``n`` actors (:class:`ActorWorker`). Each actor builds,
once, the same :class:`~umm.evolve.run.Worker` the serial search uses (the live model on its
device and every source tensor cached there), with ``threads`` torch threads; afterwards it
receives only genome vectors (``dimension`` floats) and returns the candidate's
:class:`~umm.evolve.search.Scored`. The sources are read by every actor from the model paths of
the config, so those paths must be readable on every node (a shared file system or the same
copy on each).

A generation is evaluated by :meth:`RayPool.evaluator`: candidates go to free actors in order,
results are put back in candidate order, and the generation ends when all are scored (the
barrier CMA-ES needs before its next ``ask``). Scoring is the serial code on the same items with
greedy decoding, so the fitness of a vector does not depend on which actor scored it, and a
search with the same seed follows the same path as the serial one.

An actor that dies (``RayActorError``: its process or node is gone) is replaced by a new one
(built like the first) and its candidate is queued again for the next free actor; after
:data:`MAX_TRIES` deaths on the same candidate the search stops with :class:`RayPoolError`.

:func:`local_cluster` starts (and always stops) a throw-away cluster of ``ray start`` processes on
this machine; the tests and ``bench/bench_evolve.py`` use it. It stops exactly the processes it
started (their session), never other Ray clusters of the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umm.errors import UmmError
from umm.evolve.search import EvaluateFn, Scored

logger = logging.getLogger(__name__)

#: deaths of actors while scoring the same candidate before the search gives up
MAX_TRIES = 3
#: seconds to reach the cluster's address before it counts as unreachable
CONNECT_TIMEOUT_S = 5.0
#: seconds for the actors to be placed and to build their live model
START_TIMEOUT_S = 600.0


class RayPoolError(UmmError):
    """The Ray cluster cannot run the search (unreachable, no GPU, too small, actors fail)."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayPoolError("--ray needs the ray package: pip install 'umm[ray]'") from None
    return ray


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class ActorWorker:
    """One Ray actor: a :class:`~umm.evolve.run.Worker` (live model + cached sources) built once.

    Wrapped with ``ray.remote`` by :class:`RayPool`; its methods are the worker's, for the pool's
    candidates and for the driver's :class:`RemoteWorker`.
    """

    def __init__(self, config: Any, genome: Any, tasks: Sequence[Any], device: str, threads: int) -> None:
        import torch

        from umm.evolve.run import Worker

        torch.set_num_threads(max(1, threads))
        self.worker = Worker(config, genome, tasks, device)

    def ready(self) -> str:
        """The host that runs this actor (called once the worker is built)."""
        return socket.gethostname()

    def score(self, x: np.ndarray) -> Scored:
        return self.worker.score(x)

    def sources(self) -> tuple[list[str], int | None]:
        return list(self.worker.live.model_paths), self.worker.live.base_index

    def load_source(self, index: int) -> None:
        self.worker.live.load_source(index)

    def apply(self, recipe: Any) -> float:
        return self.worker.live.apply(recipe)

    def evaluate(self, split: str) -> Any:
        return self.worker.evaluate(split)


class _RemoteLive:
    """The part of :class:`~umm.evolve.apply.LiveMerge` the references and the final table use."""

    def __init__(self, ray: Any, actor: Any) -> None:
        self._ray, self._actor = ray, actor
        self.model_paths, self.base_index = ray.get(actor.sources.remote())

    def load_source(self, index: int) -> None:
        self._ray.get(self._actor.load_source.remote(index))

    def apply(self, recipe: Any) -> float:
        return self._ray.get(self._actor.apply.remote(recipe))


class RemoteWorker:
    """A driver-side stand-in for :class:`~umm.evolve.run.Worker` whose live model is an actor's:
    ``reference_objectives`` and ``compare_on_test`` run on it unchanged. ``device`` and ``tasks``
    are the driver's: a model written to disk (the final table's evolved row) is loaded here."""

    def __init__(self, ray: Any, actor: Any, config: Any, tasks: Sequence[Any], device: str) -> None:
        self._ray, self._actor = ray, actor
        self.config, self.tasks, self.device = config, list(tasks), device
        self.live = _RemoteLive(ray, actor)
        #: no generation engine on the driver: a model on disk is scored here with PyTorch
        self.engine = None

    def evaluate(self, split: str) -> Any:
        return self._ray.get(self._actor.evaluate.remote(split))


# ---------------------------------------------------------------------------------------------
# Connecting and checking the cluster
# ---------------------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def resolve_address(address: str) -> str:
    """``host:port`` (or ``ray://host:port``) of ``address``; ``auto`` is ``$RAY_ADDRESS`` or the
    cluster last started on this machine. :class:`RayPoolError` when there is none, when the address
    is malformed, or when nothing answers there within :data:`CONNECT_TIMEOUT_S` (``ray.init`` itself
    would retry for minutes)."""
    resolved = address
    if address == "auto" or not address.startswith("ray://"):
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            resolved = canonicalize_bootstrap_address_or_die(address)
        except ImportError:  # another Ray layout: use the address as given
            resolved = os.environ.get("RAY_ADDRESS", address) if address == "auto" else address
        except (ConnectionError, ValueError) as exc:
            raise RayPoolError(f"Ray address {address!r}: {exc}".rstrip()) from None
    hp = _host_port(resolved)
    if hp is None:
        raise RayPoolError(f"Ray address {address!r} is not host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        where = resolved if resolved == address else f"{address} ({resolved})"
        raise RayPoolError(
            f"Ray cluster at {where} is unreachable ({exc.strerror or exc}); start one with "
            "`ray start --head` or pass the address of a running cluster"
        ) from None
    return resolved


@dataclass(frozen=True)
class Placement:
    """Where the actors run: their device inside the actor, how many, and what each asks Ray for."""

    device: str
    actors: int
    num_cpus: float
    num_gpus: float


def plan_placement(resources: dict[str, float], device: str, actors: int | None, threads: int, address: str) -> Placement:
    """One actor per GPU of the cluster for a CUDA device (``auto`` picks CUDA when the cluster has a
    GPU), else one per ``threads`` CPUs; ``actors`` overrides the count but must fit the cluster.

    Ray gives each CUDA actor one GPU of its own, which it sees as ``cuda`` (an index in ``device``
    is not used). :class:`RayPoolError` when a CUDA device is asked of a cluster without a GPU, or
    when the cluster cannot hold one actor (or ``actors`` of them)."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    dev = device.strip().lower()
    described = ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) or "none"
    if dev.startswith("cuda") and gpus < 1:
        raise RayPoolError(
            f"device {device!r} was asked, but the Ray cluster at {address} has no GPU (resources: {described}); "
            "add GPU nodes or use device cpu"
        )
    if dev not in ("auto", "cpu") and not dev.startswith("cuda"):
        raise RayPoolError(f"device {device!r} cannot be used with --ray (use auto, cpu or cuda)")
    if dev.startswith("cuda") or (dev == "auto" and gpus >= 1):
        fit, placement = gpus, Placement("cuda", 0, 1, 1)
    else:
        fit, placement = int(cpus // threads), Placement("cpu", 0, threads, 0)
    n = actors if actors is not None else fit
    if fit < 1 or n > fit:
        raise RayPoolError(
            f"the Ray cluster at {address} holds {fit} actor(s) of {placement.num_cpus:g} CPU and "
            f"{placement.num_gpus:g} GPU (resources: {described}); {n if n else 1} asked"
        )
    return Placement(placement.device, n, placement.num_cpus, placement.num_gpus)


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------


@dataclass
class RayPool:
    """Actors on a Ray cluster that score candidates; :meth:`start` builds it, :meth:`close` ends it.

    ``on_dispatch(generation, candidate, actor)`` is called after each candidate is sent to an actor
    (the tests kill an actor there)."""

    ray: Any
    address: str
    placement: Placement
    build: Callable[[], Any]
    actors: list[Any]
    hosts: list[str]
    #: actors replaced after they died
    restarts: int = 0
    on_dispatch: Callable[[int, int, Any], None] | None = None
    _connected_here: bool = field(default=False, repr=False)

    @classmethod
    def start(
        cls, config: Any, genome: Any, tasks: Sequence[Any], *, address: str | None = None,
        actors: int | None = None, threads: int | None = None,
    ) -> RayPool:
        """Connect to ``address`` (default ``config.ray``), check the cluster and start the actors
        (each builds its worker); raises :class:`RayPoolError` with the reason before any candidate
        is scored."""
        ray = _import_ray()
        address = address or config.ray
        if not address:
            raise RayPoolError("no Ray address: pass --ray auto or --ray HOST:PORT")
        threads = threads or getattr(config, "ray_threads", 1)
        actors = actors if actors is not None else getattr(config, "ray_actors", None)
        resolved = resolve_address(address)
        connected_here = not ray.is_initialized()
        if connected_here:
            try:
                ray.init(address=resolved, logging_level=logging.WARNING, log_to_driver=False,
                         configure_logging=False)
            except Exception as exc:  # Ray raises many types: the reason is what matters
                raise RayPoolError(f"cannot connect to the Ray cluster at {resolved}: {exc}") from None
        try:
            placement = plan_placement(ray.cluster_resources(), config.device, actors, threads, resolved)
            remote = ray.remote(ActorWorker).options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus)

            def build() -> Any:
                return remote.remote(config, genome, list(tasks), placement.device, threads)

            handles = [build() for _ in range(placement.actors)]
            hosts = _wait_ready(ray, handles, resolved)
        except BaseException:
            if connected_here:
                ray.shutdown()
            raise
        logger.info("Ray pool: %d actor(s) on %s (%s)", len(handles), resolved, ", ".join(hosts))
        return cls(ray, resolved, placement, build, handles, hosts, _connected_here=connected_here)

    def remote_worker(self, config: Any, tasks: Sequence[Any], device: str) -> RemoteWorker:
        """The first actor as a :class:`RemoteWorker` (references, final table)."""
        return RemoteWorker(self.ray, self.actors[0], config, tasks, device)

    def close(self) -> None:
        """Stop the actors and disconnect (the cluster itself keeps running)."""
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors = []
        if self._connected_here:
            self.ray.shutdown()

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def evaluator(self, on_candidate: Callable[[Scored], None] | None = None) -> EvaluateFn:
        """An :data:`~umm.evolve.search.EvaluateFn` that scores a generation on the actors.

        Free actors take the next unscored candidate; each result goes to its candidate's place.
        A dead actor is replaced (:meth:`_replace`) and its candidate queued first again."""
        ray = self.ray
        from ray.exceptions import RayActorError

        def evaluate(xs: Sequence[np.ndarray], generation: int) -> list[Scored]:
            results: list[Scored | None] = [None] * len(xs)
            queue: deque[int] = deque(range(len(xs)))
            deaths = [0] * len(xs)
            idle = list(self.actors)
            running: dict[Any, tuple[int, Any]] = {}
            starting: dict[Any, Any] = {}  # ready ref -> replacement actor
            while queue or running:
                while queue and idle:
                    i, actor = queue.popleft(), idle.pop(0)
                    running[actor.score.remote(np.asarray(xs[i], dtype=np.float64))] = (i, actor)
                    if self.on_dispatch is not None:
                        self.on_dispatch(generation, i, actor)
                if not running and not starting:
                    raise RayPoolError(f"no actor is left on the Ray cluster at {self.address}")
                done, _ = ray.wait([*running, *starting], num_returns=1, timeout=START_TIMEOUT_S)
                if not done:
                    raise RayPoolError(f"no candidate finished nor actor started in {START_TIMEOUT_S:.0f} s "
                                       f"on the Ray cluster at {self.address}")
                ref = done[0]
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as exc:
                        raise RayPoolError(f"a replacement actor failed to start: {exc}") from None
                    idle.append(actor)
                    continue
                i, actor = running.pop(ref)
                try:
                    r = ray.get(ref)
                except RayActorError as exc:
                    deaths[i] += 1
                    if deaths[i] >= MAX_TRIES:
                        raise RayPoolError(
                            f"candidate {i} of generation {generation}: {deaths[i]} actors died scoring it "
                            f"(last: {exc})") from None
                    logger.warning("actor died scoring candidate %d of generation %d; re-running it", i, generation)
                    queue.appendleft(i)
                    new = self._replace(actor)
                    starting[new.ready.remote()] = new
                    continue
                results[i] = r
                idle.append(actor)
                if on_candidate is not None:
                    on_candidate(r)
            return [r for r in results if r is not None]

        return evaluate

    def _replace(self, dead: Any) -> Any:
        """A new actor, built like the others, in place of ``dead``."""
        with contextlib.suppress(Exception):
            self.ray.kill(dead)
        new = self.build()
        self.actors = [new if a is dead else a for a in self.actors]
        self.restarts += 1
        return new


def _wait_ready(ray: Any, handles: Sequence[Any], address: str) -> list[str]:
    """Wait (at most :data:`START_TIMEOUT_S`) until every actor has built its worker."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return list(ray.get([h.ready.remote() for h in handles], timeout=START_TIMEOUT_S))
    except GetTimeoutError:
        raise RayPoolError(f"the actors were not placed on the Ray cluster at {address} within "
                           f"{START_TIMEOUT_S:.0f} s (too few free CPUs/GPUs?)") from None
    except (RayActorError, RayTaskError) as exc:
        cause = getattr(exc, "cause", None) or exc
        raise RayPoolError(f"an actor could not build its model on the Ray cluster at {address}: {cause}") from None


# ---------------------------------------------------------------------------------------------
# A throw-away local cluster (tests, bench)
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """A Ray cluster of ``ray start --block`` processes on this machine (see :func:`local_cluster`)."""

    address: str
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _session_processes(sid: int) -> list[Any]:
    """Every process of session ``sid`` (a ``ray start`` started with a new session and its children)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def _stop_session(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    import psutil

    procs = _session_processes(proc.pid)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def local_cluster(
    nodes: Sequence[int] = (1, 1), *, env: dict[str, str] | None = None, timeout: float = 120.0,
) -> Iterator[LocalCluster]:
    """A head node and ``len(nodes) - 1`` worker nodes on 127.0.0.1, ``nodes[k]`` CPUs each, no
    dashboard, in a temp dir; yields once every node's CPUs are in the cluster (at most ``timeout``
    seconds) and stops every process it started on exit (SIGTERM, then SIGKILL after 3 s).

    Each ``ray start`` runs in a session of its own, and only the processes of those sessions are
    stopped: other Ray clusters of the machine are left alone (``ray stop`` would stop them all).
    ``env``: the environment of the Ray processes, and so of the actors (default: this one's).
    """
    _import_ray()
    temp = Path(tempfile.mkdtemp(prefix="umm-ray-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    penv = {**(env if env is not None else os.environ), "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp}"]
    cluster = LocalCluster(address, temp)
    log = open(temp / "ray-start.log", "ab")  # closed in finally
    try:
        head = [*_ray_cli(), "start", "--head", f"--port={port}", f"--num-cpus={nodes[0]}", "--include-dashboard=false",
                "--node-ip-address=127.0.0.1", f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", *common]
        cluster.procs.append(subprocess.Popen(head, env=penv, stdout=log, stderr=log, start_new_session=True))
        _wait_port(("127.0.0.1", port), cluster, timeout)
        for cpus in nodes[1:]:
            worker = [*_ray_cli(), "start", f"--address={address}", f"--num-cpus={cpus}",
                      "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}", *common]
            cluster.procs.append(subprocess.Popen(worker, env=penv, stdout=log, stderr=log, start_new_session=True))
        _wait_cpus(cluster, sum(nodes), timeout)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            _stop_session(proc)
        log.close()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _wait_port(hp: tuple[str, int], cluster: LocalCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in cluster.procs):
            break
        with contextlib.suppress(OSError), socket.create_connection(hp, timeout=1):
            return
        time.sleep(0.2)
    raise RayPoolError(f"the local Ray head did not start in {timeout:.0f} s; see {cluster.temp_dir / 'ray-start.log'}")


def _wait_cpus(cluster: LocalCluster, cpus: int, timeout: float) -> None:
    """Poll the cluster's resources from a short-lived process (the caller's own ``ray.init``
    stays free) until it has ``cpus`` CPUs."""
    probe = ("import ray,sys,time\n"
             f"ray.init(address={cluster.address!r}, logging_level='ERROR', log_to_driver=False)\n"
             f"d=time.monotonic()+{timeout}\n"
             f"while time.monotonic()<d and ray.cluster_resources().get('CPU',0)<{cpus}: time.sleep(0.2)\n"
             f"sys.exit(0 if ray.cluster_resources().get('CPU',0)>={cpus} else 1)\n")
    try:
        rc = subprocess.run([sys.executable, "-c", probe], timeout=timeout + 30, capture_output=True).returncode
    except subprocess.TimeoutExpired:
        rc = 1
    if rc != 0:
        raise RayPoolError(f"the local Ray cluster did not reach {cpus} CPUs in {timeout:.0f} s; "
                           f"see {cluster.temp_dir / 'ray-start.log'}")
