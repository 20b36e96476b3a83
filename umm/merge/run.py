"""Running a merge: read each job's rows, merge them, hand the blocks to a sink. Disk or memory.

:func:`merge_tensors` is the engine: it plans the jobs (:mod:`umm.merge.plan`), runs them on the
memory-budgeted pool (:mod:`umm.merge.schedule`) and feeds each merged block to a *sink*
(``sink(name, row_start, tensor)``). The disk merge (:mod:`umm.merge.disk`) passes the
checkpoint writer's ``write_rows``; :func:`merge_state_dict` fills a dict of tensors, so the
CMA-ES search can merge a candidate without disk.

Inputs are read with ``os.preadv`` into fresh buffers (never memory-mapped), so page-cache pages
are not charged to this process and every buffer is freed as soon as its job ends. Every input
block is checked for NaN/Inf (for methods that carry NaN/Inf into their result, by screening the
result). Random methods draw from :func:`umm.merge.tensor_generator` ``(seed, tensor name)``, so
results do not depend on tensor order, threads or chunking.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from umm.checkpoints.admission import check_finite as check_finite_tensor
from umm.errors import UmmError
from umm.merge.inputs import MergeInputs, open_inputs
from umm.merge.methods.registry import tensor_generator
from umm.merge.plan import DEFAULT_CHUNK_BYTES, Job, plan_jobs
from umm.merge.schedule import DEFAULT_MEMORY_BUDGET, run_jobs

#: A sink receives each merged block: tensor name, first row of the block, the rows (out dtype).
Sink = Callable[[str, int, torch.Tensor], None]


def default_workers(threads: int | None) -> int:
    """Worker threads: ``threads``, or by default up to 4 by CPU count."""
    return max(1, threads or min(4, os.cpu_count() or 1))


def resolve_seed(seed: int | None) -> int:
    """The seed of random methods: ``seed`` if given, else 0 (as mergekit's ``--random-seed``,
    it is a run option, not a recipe key)."""
    return 0 if seed is None else int(seed)


def _run_prepare(inputs: MergeInputs, job: Job, device: torch.device) -> Any:
    """The method's whole-tensor state of ``job.name``, reading rows of one model at a time."""
    name = job.name

    def reader(index: int, input_name: str) -> Callable[[int, int], torch.Tensor]:
        src = inputs.sources[index]

        def read(start: int, end: int) -> torch.Tensor:
            t = src.read_rows(input_name, start, end)
            return t if device.type == "cpu" else t.to(device)

        return read

    params = inputs.tensor_params(name)
    base_at, tensors_at, _ = inputs.reads(name)
    base = reader(*base_at) if base_at is not None else None
    tensors = [reader(*at) for at in tensors_at]
    return inputs.method.prepare(base, tensors, inputs.shapes[name], params.per_model, params.global_,
                                 block_rows=job.block_rows)


def _read_blocks(inputs: MergeInputs, job: Job, screen_inputs: bool) -> dict[tuple[int, str], torch.Tensor]:
    """The job's rows of every input of its tensor (by source index and input name), as stored;
    each checked for NaN/Inf if ``screen_inputs``."""
    base, tensors, ref = inputs.reads(job.name)
    blocks: dict[tuple[int, str], torch.Tensor] = {}
    for i, input_name in [*([base] if base is not None else []), *tensors, ref]:
        if (i, input_name) in blocks:
            continue
        t = inputs.sources[i].read_rows(input_name, job.start, job.end)
        if screen_inputs:
            check_finite_tensor(t, input_name, inputs.names[i])
        blocks[(i, input_name)] = t
    return blocks


def _run_merge(inputs: MergeInputs, job: Job, device: torch.device, seed: int, check_finite: bool,
               state: Any = None) -> torch.Tensor:
    """Merge the job's rows; returns them on CPU in the output dtype."""
    method, name = inputs.method, job.name
    # methods that carry NaN/Inf into the result are screened once, on the result (cheaper)
    screen_result = check_finite and method.propagates_nonfinite
    blocks = _read_blocks(inputs, job, check_finite and not screen_result)
    base_at, tensors_at, ref_at = inputs.reads(name)
    out_dtype = inputs.out_dtypes[name]
    if not inputs.in_dtypes[name].is_floating_point:
        return blocks[ref_at].to(out_dtype)
    if device.type != "cpu":
        blocks = {k: b.to(device, non_blocking=True) for k, b in blocks.items()}
    params = inputs.tensor_params(name)
    base = blocks[base_at] if base_at is not None else None
    tensors = [blocks[at] for at in tensors_at]
    gen = tensor_generator(seed, name, device=device) if getattr(method, "random", False) else None
    extra = {"state": state, "row_offset": job.start or 0} if job.uses_state else {}
    result = method.merge(base, tensors, params.per_model, params.global_, generator=gen, **extra)
    if screen_result and result.numel() and not bool(torch.isfinite(result.sum())):
        for (i, input_name), t in blocks.items():  # name the culprit; finite inputs that overflowed pass
            check_finite_tensor(t, input_name, inputs.names[i])
    del blocks, tensors, base
    if result.dtype != out_dtype:
        result = result.to(out_dtype)
    return result.cpu() if result.device.type != "cpu" else result


def _select(jobs: list[Job], inputs: MergeInputs, names: Iterable[str] | None) -> list[Job]:
    """The jobs of the tensors in ``names`` (all when ``None``); unknown names are an error."""
    if names is None:
        return jobs
    wanted = set(names)
    unknown = wanted - set(inputs.tensor_names)
    if unknown:
        raise UmmError(f"unknown tensor(s): {sorted(unknown)[:5]}")
    return [j for j in jobs if j.name in wanted]


class _Runner:
    """Runs the jobs of one :func:`merge_tensors` call (from worker threads): a prepare job
    publishes its tensor's state, the tensor's block jobs wait for it; once ``stop`` is set
    (an error elsewhere) jobs not yet begun do nothing."""

    def __init__(self, inputs: MergeInputs, jobs: list[Job], sink: Sink, device: torch.device,
                 seed: int, check_finite: bool) -> None:
        self.inputs, self.sink, self.device = inputs, sink, device
        self.seed, self.check_finite = seed, check_finite
        self.stop = threading.Event()
        # prepared state of each tensor split after a prepare job (set by it, read by its blocks)
        self.states: dict[str, Future] = {j.name: Future() for j in jobs if j.kind == "prepare"}

    def __call__(self, job: Job) -> None:
        """Run ``job``: publish a tensor's state, or merge a block into the sink."""
        if job.kind == "prepare":
            self._prepare(job)
        elif not self.stop.is_set():
            state = self.states[job.name].result() if job.uses_state else None
            block = _run_merge(self.inputs, job, self.device, self.seed, self.check_finite, state)
            self.sink(job.name, job.start or 0, block)

    def _prepare(self, job: Job) -> None:
        """Compute and publish the tensor's state; its block jobs get the error if it fails."""
        fut = self.states[job.name]
        try:
            if self.stop.is_set():
                raise UmmError("merge stopped before this tensor was prepared")
            fut.set_result(_run_prepare(self.inputs, job, self.device))
        except BaseException as exc:
            fut.set_exception(exc)
            raise


def merge_tensors(
    inputs: MergeInputs,
    sink: Sink,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    seed: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    memory_budget: int | None = None,
    check_finite: bool = True,
    names: Iterable[str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Merge every tensor of ``inputs`` (or only ``names``) and hand each block to ``sink``.

    ``sink`` may be called from worker threads, concurrently, blocks in any order (a tensor's
    block jobs wait for its prepare job, which is always submitted before them). Returns the
    number of tensors produced. ``on_bytes(out_bytes)`` is called from this thread as blocks
    complete. Errors from any job are raised here after the pool stops.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UmmError("--device cuda asked for but CUDA is not available; use --device cpu")
    jobs = _select(plan_jobs(inputs, chunk_bytes), inputs, names)
    runner = _Runner(inputs, jobs, sink, dev, seed, check_finite)
    done: set[str] = set()

    def finished(job: Job) -> None:
        done.add(job.name)
        if on_bytes is not None:
            on_bytes(job.out_bytes)

    run_jobs(jobs, runner, workers=default_workers(threads), stop=runner.stop, on_done=finished,
             memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
    return len(done)


def merge_state_dict(
    recipe: Any,
    *,
    device: str = "cpu",
    threads: int | None = None,
    seed: int | None = None,
    out_dtype: torch.dtype | None = None,
    inputs: MergeInputs | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in memory: ``{name: tensor}`` on CPU (for evaluating a candidate without disk).

    ``seed``: see :func:`resolve_seed`. ``inputs``: already opened inputs to reuse (their recipe
    is replaced).
    """
    own = inputs is None
    inp = inputs if inputs is not None else open_inputs(recipe, out_dtype=out_dtype)
    if not own:
        inp.recipe = recipe
        inp.params.clear()
    try:
        out = {n: torch.empty(inp.shapes[n], dtype=inp.out_dtypes[n]) for n in inp.tensor_names}

        def sink(name: str, start: int, block: torch.Tensor) -> None:
            t = out[name]
            if t.dim() == 0:
                t.copy_(block)
            else:
                t[start : start + block.shape[0]].copy_(block)

        merge_tensors(inp, sink, device=device, threads=threads, seed=resolve_seed(seed))
        return out
    finally:
        if own:
            inp.close()
