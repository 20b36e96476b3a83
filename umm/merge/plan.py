"""Planning: split a merge into jobs with a memory estimate each. One planner serves disk and memory.

:func:`plan_jobs` turns :class:`~umm.merge.inputs.MergeInputs` into :class:`Job` records:

* element-wise, non-random methods (linear, task arithmetic, ...) split large tensors into
  blocks of rows of about ``chunk_bytes`` of float32 work each;
* TIES and breadcrumbs (whose magnitude cuts depend on the whole tensor) are split the same way
  after a *prepare* job per large tensor that computes each model's cuts
  (:meth:`~umm.merge.methods.base.MergeMethod.prepare`); the tensor's block jobs use its state;
* random methods (DARE, DELLA: the generator stream must not depend on the split) and small
  tensors get one job per tensor.

Each job carries its estimated peak working memory, which :mod:`umm.merge.schedule` admits
against a budget. Planning resolves every tensor's parameters, so a parameter error stops the
merge before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from umm.merge.inputs import MergeInputs

#: Float32 work per block of rows of an element-wise merge (1 Mi elements).
DEFAULT_CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Job:
    """One unit of work: a whole tensor, a block of its rows, or a tensor's prepare step."""

    name: str
    start: int | None  # None: the whole tensor
    end: int | None
    est_bytes: int     # estimated peak working memory of the job
    out_bytes: int
    kind: str = "merge"  # "prepare": compute the tensor's whole-tensor state (no output)
    uses_state: bool = False  # a block job that needs the tensor's prepared state
    block_rows: int = 0  # prepare: rows read at a time


@dataclass(frozen=True)
class _TensorPlan:
    """How one tensor is merged: its size, bytes per element of work, and whether it is split."""

    name: str
    rows: int
    row_elems: int
    out_item: int
    per_elem: int
    can_chunk: bool
    prepared: bool


def _tensor_plan(inputs: MergeInputs, name: str) -> _TensorPlan:
    """Whether ``name`` may be merged in blocks of rows, and its working bytes per element."""
    method = inputs.method
    params = inputs.tensor_params(name)
    is_float = inputs.in_dtypes[name].is_floating_point
    can_chunk = not method.random and (
        method.is_elementwise(params.per_model, params.global_)
        or (is_float and method.can_merge_rows(params.per_model, params.global_))
    )
    prepared = can_chunk and is_float and method.needs_prepare(params.per_model, params.global_)
    shape = inputs.shapes[name]
    base, tensors, _ = inputs.reads(name)
    n_in = len(tensors) + (base is not None)  # the inputs this tensor reads
    in_item = inputs.in_dtypes[name].itemsize
    out_item = inputs.out_dtypes[name].itemsize
    if can_chunk and not prepared:  # inputs as stored + a float32 accumulator + the cast result
        per_elem = n_in * in_item + 4 + out_item
    else:  # GTA methods also hold float32 deltas of every model and a few temporaries
        per_elem = n_in * in_item + 4 * (n_in + 3) + out_item
    rows = shape[0] if shape else 1
    return _TensorPlan(name, rows, math.prod(shape) // rows if rows else 0, out_item, per_elem,
                       can_chunk and bool(shape), prepared)


def _prepare_job(inputs: MergeInputs, t: _TensorPlan, step: int) -> Job:
    """The prepare job: a block of base + one model as stored, ``|d|`` and the histogram's indices."""
    in_item = inputs.in_dtypes[t.name].itemsize
    est = min(t.rows, step) * t.row_elems * (2 * in_item + 12)
    if inputs.tensor_params(t.name).global_.get("rescale"):  # one model's whole delta for the L1 sums
        est += t.rows * t.row_elems * 12
    return Job(t.name, None, None, est, 0, kind="prepare", block_rows=step)


def _tensor_jobs(inputs: MergeInputs, name: str, chunk_bytes: int) -> list[Job]:
    """The jobs of one tensor: whole, or (a prepare job and) blocks of rows."""
    t = _tensor_plan(inputs, name)
    numel = math.prod(inputs.shapes[name])
    if not (t.can_chunk and t.rows > 1 and numel * 4 > chunk_bytes):
        return [Job(name, None, None, numel * t.per_elem, numel * t.out_item)]
    step = max(1, chunk_bytes // (4 * max(1, t.row_elems)))
    jobs = [_prepare_job(inputs, t, step)] if t.prepared else []
    for s in range(0, t.rows, step):
        e = min(t.rows, s + step)
        n = (e - s) * t.row_elems
        jobs.append(Job(name, s, e, n * t.per_elem, n * t.out_item, uses_state=t.prepared))
    return jobs


def plan_jobs(inputs: MergeInputs, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Job]:
    """Every job of the merge, tensor by tensor; a tensor's prepare job comes before its blocks."""
    return [job for name in inputs.tensor_names for job in _tensor_jobs(inputs, name, chunk_bytes)]
