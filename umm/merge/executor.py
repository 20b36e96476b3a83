"""The streaming merge executor: one tensor (or one block of rows) at a time, bounded memory.

:func:`merge` runs a recipe end to end: open every checkpoint (headers only), check that they are
compatible (same architecture, tensor shapes and tokenizer) before any work, plan the output
(every tensor's name, dtype, shape: from the base model's headers and ``out_dtype``), then merge
tensor by tensor and stream each result into :class:`~umm.checkpoints.writer.CheckpointWriter`,
which publishes the folder atomically at the end.

:func:`merge_tensors` is the engine underneath and works without a disk target: it feeds each
merged block to a *sink* (``sink(name, row_start, tensor)``), so the CMA-ES search can merge a
candidate in memory (:func:`merge_state_dict`).

How memory stays bounded:

* inputs are read with ``os.preadv`` into fresh buffers (never memory-mapped), so page-cache
  pages are not charged to this process and every buffer is freed as soon as its job ends;
* for element-wise, non-random methods (linear, task arithmetic, ...) large tensors are split
  into blocks of rows of about ``chunk_bytes`` of float32 work each;
* TIES and breadcrumbs (whose magnitude thresholds depend on the whole tensor) are split the
  same way after a *prepare* job per large tensor: it reads the rows of the base and of one
  model at a time and computes each model's cuts (:meth:`MergeMethod.prepare`); the tensor's
  block jobs wait for it and then merge their rows element-wise, exactly as the whole tensor;
* random methods (DARE, DELLA: the generator stream must not depend on the split) get whole
  tensors;
* jobs run on a small thread pool (``threads`` workers overlap reading, computing and writing;
  torch releases the GIL) but a job only starts when its estimated working memory fits in
  ``memory_budget`` alongside the jobs already running (a job larger than the budget runs alone).

Random methods draw from :func:`umm.merge.tensor_generator` ``(seed, tensor name)``, so results
do not depend on tensor order, threads or chunking.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from umm.checkpoints.admission import check_finite as check_finite_tensor
from umm.errors import UmmError

logger = logging.getLogger(__name__)

#: Float32 work per block of rows of an element-wise merge (1 Mi elements).
DEFAULT_CHUNK_BYTES = 4 * 2**20
#: Estimated working memory the pool may hold at once; a larger single job runs alone.
DEFAULT_MEMORY_BUDGET = 512 * 2**20

#: A sink receives each merged block: tensor name, first row of the block, the rows (out dtype).
Sink = Callable[[str, int, torch.Tensor], None]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(name: str | None, what: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` (also ``bf16``, ``torch.bfloat16``) -> ``torch.bfloat16``; ``None`` -> ``None``."""
    if name is None:
        return None
    key = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_NAMES[key]
    except KeyError:
        valid = ", ".join(sorted({"float32", "float16", "bfloat16", "float64"}))
        raise UmmError(f"unknown {what} {name!r}; valid: {valid}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------
# Tensor sources
# ---------------------------------------------------------------------------------------------


class CheckpointSource:
    """Reads blocks of rows of a checkpoint's tensors (:meth:`Checkpoint.get_rows`: ``os.preadv``
    into fresh buffers, never memory-mapped). Thread-safe."""

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self.path = Path(ckpt.path)

    def read_rows(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of tensor ``name`` (whole tensor by default), as stored."""
        if start is None or not self.ckpt.tensors[name].shape:
            return self.ckpt.get_tensor(name)
        return self.ckpt.get_rows(name, start, end)

    def close(self) -> None:
        """Nothing to release: the checkpoint's files are closed by :meth:`MergeInputs.close`."""


class MemorySource:
    """A dict of tensors (e.g. cached by the CMA-ES search) with the same interface."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<memory>") -> None:
        self.tensors = tensors
        self.path = path

    def read_rows(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if start is None or t.dim() == 0 else t[start:end]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


@dataclass
class MergeInputs:
    """What one merge reads: the method, its models and the tensors to produce.

    ``sources[i]`` / ``names[i]`` are the models in ``recipe.model_paths()`` order;
    ``base_index`` points at the model passed as ``base`` (``None`` for base-less methods);
    ``merge_indices`` are the models passed as ``tensors`` (``recipe.source_models()`` order);
    ``ref_index`` is the model whose config, tokenizer and tensor layout the output takes.
    """

    recipe: Any
    method: Any
    names: list[str]
    sources: list[Any]
    base_index: int | None
    merge_indices: list[int]
    ref_index: int
    num_layers: int
    tensor_names: list[str]
    shapes: dict[str, tuple[int, ...]]
    in_dtypes: dict[str, torch.dtype]
    out_dtypes: dict[str, torch.dtype]
    checkpoints: list[Any] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def tensor_params(self, name: str) -> Any:
        """The resolved :class:`~umm.merge.TensorParams` of tensor ``name`` (cached)."""
        from umm.merge import resolve_tensor_params

        p = self.params.get(name)
        if p is None:
            p = resolve_tensor_params(self.recipe, self.method, name, self.num_layers)
            self.params[name] = p
        return p

    def close(self) -> None:
        for s in self.sources:
            s.close()
        for c in self.checkpoints:
            close = getattr(c, "close", None)
            if close is not None:
                close()

    @property
    def output_bytes(self) -> int:
        total = 0
        for n in self.tensor_names:
            numel = 1
            for d in self.shapes[n]:
                numel *= d
            total += numel * torch.empty((), dtype=self.out_dtypes[n]).element_size()
        return total


def _model_roles(recipe: Any) -> tuple[list[str], int | None, list[int], int]:
    """Model paths (base first), index of the ``base`` argument, indices of ``tensors``, reference.

    The reference model (config, tokenizer, output layout) is the ``base_model`` if the recipe
    names one (also for ``linear``, where it is merged as one more input), else the first model.
    """
    paths = list(recipe.model_paths())
    merge_base = recipe.merge_base()
    base_index = paths.index(merge_base) if merge_base is not None else None
    merge_indices = [paths.index(m) for m in recipe.source_models()]
    ref_index = paths.index(recipe.base_model) if recipe.base_model else 0
    return paths, base_index, merge_indices, ref_index


def open_inputs(recipe: Any, *, out_dtype: torch.dtype | None = None) -> MergeInputs:
    """Validate the recipe, open every checkpoint and check they can be merged (before any work).

    Raises :class:`UmmError` subclasses naming the model, file or tensor at fault.
    """
    from umm.checkpoints.fingerprint import require_compatible
    from umm.checkpoints.reader import Checkpoint
    from umm.merge import get_method

    recipe.validate_for_merge()
    method = get_method(recipe.merge_method)
    paths, base_index, merge_indices, ref_index = _model_roles(recipe)
    ckpts: list[Any] = []
    try:
        for p in paths:
            if not Path(p).exists():
                raise UmmError(
                    f"model folder not found: {p} (relative paths are read from the current "
                    f"directory {os.getcwd()}; umm reads local folders only, download models first)"
                )
            ckpts.append(Checkpoint.open(p))
        if len(ckpts) > 1:
            require_compatible(ckpts)
    except BaseException:
        for c in ckpts:
            c.close()
        raise
    ref = ckpts[ref_index]
    out = out_dtype
    if out is None:
        out = parse_dtype(recipe.out_dtype, "out_dtype") or parse_dtype(recipe.dtype, "dtype")
    names = list(ref.tensors)
    shapes = {n: tuple(ref.tensors[n].shape) for n in names}
    in_dtypes = {n: ref.tensors[n].dtype for n in names}
    out_dtypes = {
        n: (out if (out is not None and in_dtypes[n].is_floating_point) else in_dtypes[n]) for n in names
    }
    num_layers = ref.num_layers if ref.num_layers is not None else 0
    return MergeInputs(
        recipe=recipe,
        method=method,
        names=paths,
        sources=[CheckpointSource(c) for c in ckpts],
        base_index=base_index,
        merge_indices=merge_indices,
        ref_index=ref_index,
        num_layers=num_layers,
        tensor_names=names,
        shapes=shapes,
        in_dtypes=in_dtypes,
        out_dtypes=out_dtypes,
        checkpoints=ckpts,
    )


@dataclass(frozen=True)
class _Job:
    name: str
    start: int | None  # None: the whole tensor
    end: int | None
    est_bytes: int     # estimated peak working memory of the job
    out_bytes: int
    kind: str = "merge"  # "prepare": compute the tensor's whole-tensor state (no output)
    uses_state: bool = False  # a block job that needs the tensor's prepared state
    block_rows: int = 0  # prepare: rows read at a time


def plan_jobs(inputs: MergeInputs, chunk_bytes: int) -> list[_Job]:
    """Split the work into jobs: whole tensors, or blocks of rows (for element-wise methods, and
    after a ``prepare`` job for methods with whole-tensor state, see :meth:`MergeMethod.prepare`).

    Resolves every tensor's parameters first, so a parameter error stops the merge before any work.
    """
    method = inputs.method
    n_in = len(inputs.sources)
    jobs: list[_Job] = []
    for name in inputs.tensor_names:
        params = inputs.tensor_params(name)
        is_float = inputs.in_dtypes[name].is_floating_point
        can_chunk = not method.random and (
            method.is_elementwise(params.per_model, params.global_)
            or (is_float and method.can_merge_rows(params.per_model, params.global_))
        )
        prepared = can_chunk and is_float and method.needs_prepare(params.per_model, params.global_)
        shape = inputs.shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        in_item = torch.empty((), dtype=inputs.in_dtypes[name]).element_size()
        out_item = torch.empty((), dtype=inputs.out_dtypes[name]).element_size()
        rows = shape[0] if shape else 1
        if can_chunk and not prepared:  # inputs as stored + a float32 accumulator + the cast result
            per_elem = n_in * in_item + 4 + out_item
        else:  # GTA methods also hold float32 deltas of every model and a few temporaries
            per_elem = n_in * in_item + 4 * (n_in + 3) + out_item
        if can_chunk and shape and rows > 1 and numel * 4 > chunk_bytes:
            row_elems = numel // rows
            step = max(1, chunk_bytes // (4 * max(1, row_elems)))
            if prepared:  # a block of base + one model as stored, |d| and the histogram's indices
                est = min(rows, step) * row_elems * (2 * in_item + 12)
                if params.global_.get("rescale"):  # one model's whole delta for the L1 sums
                    est += numel * 12
                jobs.append(_Job(name, None, None, est, 0, kind="prepare", block_rows=step))
            for s in range(0, rows, step):
                e = min(rows, s + step)
                jobs.append(_Job(name, s, e, (e - s) * row_elems * per_elem, (e - s) * row_elems * out_item,
                                 uses_state=prepared))
        else:
            jobs.append(_Job(name, None, None, numel * per_elem, numel * out_item))
    return jobs


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


class _Budget:
    """Admits jobs while their estimated memory fits; one oversized job may run alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def take(self, n: int) -> None:
        self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _prepare_job(inputs: MergeInputs, job: _Job, device: torch.device) -> Any:
    """The method's whole-tensor state of ``job.name``, reading rows of one model at a time."""
    name = job.name

    def reader(src: Any) -> Callable[[int, int], torch.Tensor]:
        def read(start: int, end: int) -> torch.Tensor:
            t = src.read_rows(name, start, end)
            return t if device.type == "cpu" else t.to(device)

        return read

    params = inputs.tensor_params(name)
    base = reader(inputs.sources[inputs.base_index]) if inputs.base_index is not None else None
    tensors = [reader(inputs.sources[i]) for i in inputs.merge_indices]
    return inputs.method.prepare(base, tensors, inputs.shapes[name], params.per_model, params.global_,
                                 block_rows=job.block_rows)


def _run_job(
    inputs: MergeInputs,
    job: _Job,
    device: torch.device,
    seed: int,
    check_finite: bool,
    state: Any = None,
) -> torch.Tensor:
    from umm.merge import tensor_generator

    method = inputs.method
    name = job.name
    # methods that carry NaN/Inf into the result are screened once, on the result (cheaper)
    screen_result = check_finite and method.propagates_nonfinite
    blocks = []
    for src, model in zip(inputs.sources, inputs.names):
        t = src.read_rows(name, job.start, job.end)
        if check_finite and not screen_result:
            check_finite_tensor(t, name, model)
        blocks.append(t)
    out_dtype = inputs.out_dtypes[name]
    if not inputs.in_dtypes[name].is_floating_point:
        ref = blocks[inputs.ref_index]
        return ref.to(out_dtype)
    if device.type != "cpu":
        blocks = [b.to(device, non_blocking=True) for b in blocks]
    params = inputs.tensor_params(name)
    base = blocks[inputs.base_index] if inputs.base_index is not None else None
    tensors = [blocks[i] for i in inputs.merge_indices]
    gen = tensor_generator(seed, name, device=device) if getattr(method, "random", False) else None
    if job.uses_state:
        result = method.merge(base, tensors, params.per_model, params.global_, generator=gen,
                              state=state, row_offset=job.start or 0)
    else:
        result = method.merge(base, tensors, params.per_model, params.global_, generator=gen)
    if screen_result and result.numel() and not bool(torch.isfinite(result.sum())):
        for t, model in zip(blocks, inputs.names):  # name the culprit; finite inputs that overflowed pass
            check_finite_tensor(t, name, model)
    del blocks, tensors, base
    if result.dtype != out_dtype:
        result = result.to(out_dtype)
    if result.device.type != "cpu":
        result = result.cpu()
    return result


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
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Merge every tensor of ``inputs`` (or only ``names``) and hand each block to ``sink``.

    ``sink`` may be called from worker threads, concurrently, blocks in any order (a tensor's
    block jobs wait for its prepare job, which is always submitted before them). Returns the
    number of tensors produced. ``on_progress(out_bytes)`` is called from this thread as blocks
    complete. Errors from any job are raised here after the pool stops.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UmmError("--device cuda asked for but CUDA is not available; use --device cpu")
    workers = max(1, threads or min(4, os.cpu_count() or 1))
    jobs = plan_jobs(inputs, chunk_bytes)
    if names is not None:
        wanted = set(names)
        unknown = wanted - set(inputs.tensor_names)
        if unknown:
            raise UmmError(f"unknown tensor(s): {sorted(unknown)[:5]}")
        jobs = [j for j in jobs if j.name in wanted]
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
    budget = _Budget(memory_budget)
    done_names: set[str] = set()
    stop = threading.Event()
    # prepared state of each tensor split after a prepare job (set by that job, read by its blocks)
    states: dict[str, Future] = {j.name: Future() for j in jobs if j.kind == "prepare"}

    def work(job: _Job) -> _Job:
        try:
            if job.kind == "prepare":
                fut = states[job.name]
                try:
                    if stop.is_set():
                        raise UmmError("merge stopped before this tensor was prepared")
                    fut.set_result(_prepare_job(inputs, job, dev))
                except BaseException as exc:
                    fut.set_exception(exc)
                    raise
                return job
            if stop.is_set():
                return job
            state = states[job.name].result() if job.uses_state else None
            block = _run_job(inputs, job, dev, seed, check_finite, state)
            sink(job.name, job.start or 0, block)
            return job
        finally:
            budget.give(job.est_bytes)

    pending: set[Future] = set()
    it = iter(jobs)
    nxt: _Job | None = next(it, None)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="umm-merge") as pool:
        try:
            while nxt is not None or pending:
                # submit while workers are free and memory fits
                while nxt is not None and len(pending) < workers:
                    with budget.cond:
                        if not budget.fits(nxt.est_bytes):
                            break
                        budget.take(nxt.est_bytes)
                    pending.add(pool.submit(work, nxt))
                    nxt = next(it, None)
                if not pending:
                    continue
                finished, pending = wait(pending, timeout=None, return_when=FIRST_COMPLETED)
                for f in finished:
                    job = f.result()  # re-raises a job's error
                    done_names.add(job.name)
                    if on_progress is not None:
                        on_progress(job.out_bytes)
        except BaseException:
            stop.set()
            for f in pending:
                f.cancel()
            raise
    return len(done_names)


def merge_state_dict(
    recipe: Any,
    *,
    device: str = "cpu",
    threads: int | None = None,
    seed: int | None = None,
    out_dtype: torch.dtype | None = None,
    inputs: MergeInputs | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in memory: ``{name: tensor}`` on CPU (for evaluating a candidate without disk)."""
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

        merge_tensors(inp, sink, device=device, threads=threads, seed=_seed(recipe, seed))
        return out
    finally:
        if own:
            inp.close()


def _seed(recipe: Any, seed: int | None) -> int:
    """The seed of random methods: ``seed`` if given, else 0 (as mergekit's ``--random-seed``,
    it is a run option, not a recipe key)."""
    return 0 if seed is None else int(seed)


# ---------------------------------------------------------------------------------------------
# To disk
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did: where, what, how long, how much memory and disk."""

    out_dir: Path
    method: str
    models: tuple[str, ...]
    base_model: str | None
    num_tensors: int
    output_bytes: int
    shards: int
    out_dtype: str
    device: str
    threads: int
    seed: int
    wall_s: float
    peak_rss_bytes: int


def _tokenizer_dir(inputs: MergeInputs) -> Path:
    """The folder whose tokenizer files are copied (``tokenizer_source``: base/union/<model>)."""
    from umm.checkpoints.errors import IncompatibleCheckpointsError
    from umm.checkpoints.fingerprint import tokenizer_fingerprint

    recipe = inputs.recipe
    ref = Path(inputs.names[inputs.ref_index])
    src = getattr(recipe, "tokenizer_source", None)
    if src is None or src == "base":
        return ref
    fps = {p: tokenizer_fingerprint(p) for p in inputs.names}
    if src == "union":
        if len(set(fps.values())) > 1:
            raise IncompatibleCheckpointsError(
                "tokenizer_source: union needs a vocabulary merge, but the models' tokenizers "
                "differ; umm merges identical tokenizers only: use `umm fuse` (distribution fusion) "
                "for heterogeneous models"
            )
        return ref
    path = Path(str(src))
    if not path.is_dir():
        valid = ", ".join(["base", "union", *inputs.names])
        raise UmmError(f"tokenizer_source {src!r} is not a model folder; valid: {valid}")
    if tokenizer_fingerprint(path) != fps[str(ref)]:
        raise IncompatibleCheckpointsError(
            f"tokenizer_source {src} has a different tokenizer from the merged models; a merge "
            "keeps the models' vocabulary: use `umm fuse` (distribution fusion) to change tokenizers"
        )
    return path


def _updated_config(ref_dir: Path, out_dtypes: Mapping[str, torch.dtype]) -> dict[str, Any] | None:
    import json

    cfg_path = ref_dir / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    float_dtypes = {d for d in out_dtypes.values() if d.is_floating_point}
    if len(float_dtypes) == 1:
        name = dtype_name(next(iter(float_dtypes)))
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
        cfg["dtype"] = name
    return cfg


def merge(
    recipe: Any,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    show_progress: bool = True,
    seed: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MergeSummary:
    """Run ``recipe`` and write the merged model folder to ``out_dir`` (atomically).

    Checks (before merging): the output folder (refused if it exists and is not empty, unless
    ``overwrite``), the recipe, that every model exists, is safetensors, and is compatible with
    the others. During: every input block is checked for NaN/Inf (for methods that carry
    NaN/Inf into their result, by screening the result). Any failure removes the temporary
    output; with ``overwrite`` the old folder stays until the new one is complete.

    ``threads``: worker threads, also torch's thread count (default: up to 4 workers by CPU
    count, with the cores shared out between them as torch threads); restored on return.
    """
    from umm import __version__
    from umm.checkpoints.writer import (
        TOKENIZER_FILES,
        CheckpointWriter,
        TensorSpec,
        check_output_dir,
        model_card,
        parse_size,
    )
    from umm.ui import progress

    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    max_shard = parse_size(shard_size)
    workers = max(1, threads or min(4, os.cpu_count() or 1))
    the_seed = _seed(recipe, seed)
    inputs = open_inputs(recipe)
    torch_threads = torch.get_num_threads()
    # automatic: workers x torch threads = the cores (more threads would only spin)
    torch.set_num_threads(max(1, threads or (os.cpu_count() or 1) // workers))
    try:
        tok_dir = _tokenizer_dir(inputs)
        ref_dir = Path(inputs.names[inputs.ref_index])
        specs = [TensorSpec(n, inputs.out_dtypes[n], inputs.shapes[n]) for n in inputs.tensor_names]
        recipe_yaml = recipe.to_yaml()
        with CheckpointWriter(out, specs, max_shard_bytes=max_shard, overwrite=overwrite) as writer:
            bar = progress(total=inputs.output_bytes, desc=f"merge ({inputs.method.name})", unit="B",
                           unit_scale=True, disable=None if show_progress else True)
            try:
                n = merge_tensors(
                    inputs, writer.write_rows, device=device, threads=workers, seed=the_seed,
                    chunk_bytes=chunk_bytes, on_progress=bar.update,
                )
            finally:
                bar.close()
            cfg = _updated_config(ref_dir, inputs.out_dtypes)
            if cfg is not None:
                writer.write_json("config.json", cfg)
            writer.copy_files(ref_dir, ["generation_config.json"])
            writer.copy_files(tok_dir, TOKENIZER_FILES)
            writer.write_text("umm_recipe.yaml", recipe_yaml)
            writer.write_text("mergekit_config.yml", recipe_yaml)
            out_dt = {dtype_name(d) for d in inputs.out_dtypes.values()}
            writer.write_text("README.md", model_card(
                method=inputs.method.name,
                sources=inputs.names,
                base_model=inputs.names[inputs.base_index] if inputs.base_index is not None else None,
                parameters=dict(getattr(recipe, "parameters", {}) or {}),
                recipe_yaml=recipe_yaml,
                out_dtype=", ".join(sorted(out_dt)),
                version=__version__,
            ))
            writer.finalize()
            shards = len(writer.plan.files)
    finally:
        inputs.close()
        torch.set_num_threads(torch_threads)
    return MergeSummary(
        out_dir=out.absolute(),
        method=inputs.method.name,
        models=tuple(inputs.names),
        base_model=inputs.names[inputs.base_index] if inputs.base_index is not None else None,
        num_tensors=n,
        output_bytes=inputs.output_bytes,
        shards=shards,
        out_dtype=", ".join(sorted({dtype_name(d) for d in inputs.out_dtypes.values()})),
        device=str(device),
        threads=workers,
        seed=the_seed,
        wall_s=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
    )
