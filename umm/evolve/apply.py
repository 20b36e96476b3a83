"""Apply a candidate recipe to a live model in place: no disk write, no reload.

:class:`LiveMerge` reads every source tensor once (through the merge executor's checked
:func:`~umm.merge.inputs.open_inputs`, so incompatible models fail here with the executor's
error naming the tensor or tokenizer), keeps float32 copies on the device, and for each
candidate computes every checkpoint tensor with the recipe's merge method (the same pure function,
parameters resolution and per-tensor random generator as ``umm merge``) and copies it into the
live model's parameter (or the part of a fused parameter it became). The result equals the streamed merge of the
same recipe, up to the live model's dtype.

TIES (magnitude top-k, then sign election) is the other fast path: the sources are cached as
float32 task vectors and, per tensor and model, the stable descending rank of ``|delta|`` (int32,
computed once by a sort); a candidate's density ``k`` is then the comparison ``rank < k`` instead
of a selection over the tensor. The rest (weights, sign election, disjoint mean) depends on the
candidate and runs through the method's own function (its ``state`` hook), so the result is the
streamed merge's, bit for bit.

Memory: (number of models) x (parameters) x (4 bytes, or 2 with a bfloat16 cache) on the
device, plus the live model; a TIES search adds an int32 rank per expert entry (as much again
as the task vectors).
Tied embeddings are handled by the model: ``named_parameters`` yields a tied weight once.
Models that transformers converts on load (renamed tensors, MoE experts fused into one stacked
parameter) are merged tensor by tensor under their checkpoint names, exactly as on disk, and each
result is written into the entries of the live parameter it becomes
(:func:`~umm.checkpoints.placement.checkpoint_slots`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from umm.checkpoints.placement import Slot, checkpoint_slots
from umm.errors import UmmError

logger = logging.getLogger(__name__)


#: methods whose merge is a fixed linear combination of the inputs (see :meth:`LiveMerge.apply`)
FAST_METHODS = frozenset({"linear", "task_arithmetic"})
#: methods that keep the ``int(density * n)`` largest ``|delta|`` of each task vector (ties first
#: by lower flat index); with a base they run on cached task vectors and ranks (:class:`RankedTopK`)
RANKED_METHODS = frozenset({"ties"})
#: entries per block of rows when merging a TIES tensor in memory
RANKED_BLOCK = 1 << 18


class LiveMergeError(UmmError):
    """The live model does not match the checkpoints, or a candidate changes the models."""


def _cached(t: torch.Tensor, device: torch.device, cache_dtype: torch.dtype) -> torch.Tensor:
    return t.to(device, cache_dtype if t.dtype == cache_dtype else torch.float32)


def descending_rank(delta: torch.Tensor) -> torch.Tensor:
    """int32 rank of every entry of ``|delta|`` (flat) in a stable descending sort: 0 is the
    largest, equal magnitudes rank by lower flat index first (the order of TIES's top-k)."""
    flat = delta.detach().abs().reshape(-1)
    n = flat.numel()
    if n >= 2**31:
        raise LiveMergeError(f"a tensor of {n} entries is too large for int32 ranks")
    if flat.dtype == torch.float32:
        # |d| >= 0: its bit patterns order as the values; an ascending stable sort of their
        # negation (int32, radix) is a few times faster than a descending float sort
        order = torch.sort(flat.view(torch.int32).neg(), stable=True).indices
    else:
        order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.int32, device=flat.device)
    rank[order] = torch.arange(n, dtype=torch.int32, device=flat.device)
    return rank


class RankedTopK:
    """TIES's magnitude sparsification of one whole task vector from its cached
    :func:`descending_rank`: keep ``rank < max(1, int(density * n))`` (all if ``density >= 1``,
    none if ``<= 0``), then the optional L1 rescale; the same entries and values as
    :func:`umm.merge.methods.sparsify.magnitude`. Used as a ``state`` entry of the method's
    function (``apply(d, flat_start)``, whole tensors only)."""

    def __init__(self, rank: torch.Tensor, density: float, rescale: bool) -> None:
        self.rank = rank
        self.density = float(density)
        self.rescale = bool(rescale)

    def apply(self, d: torch.Tensor, flat_start: int) -> torch.Tensor:
        """Sparsify ``d``, the entries ``flat_start ..`` of the task vector, in place (a block of
        rows without rescale; the whole tensor with it, whose L1 sums the rescale needs)."""
        from umm.merge.methods.sparsify import keep_and_rescale

        n = self.rank.numel()
        whole = flat_start == 0 and d.numel() == n
        if self.rescale and not whole:
            raise ValueError("RankedTopK rescales whole tensors only")
        if self.density >= 1:
            return d
        if self.density <= 0 or n == 0:
            return d.zero_()
        k = max(1, int(self.density * n))
        rank = self.rank if whole else self.rank[flat_start : flat_start + d.numel()]
        return keep_and_rescale(d, rank < k, self.rescale)


class LiveMerge:
    """Source tensors cached on ``device``; :meth:`apply` merges a recipe into ``model``.

    ``recipe`` fixes the models that are read and cached; a recipe given to :meth:`apply` may use
    any of them, with any method and parameters. ``seed`` seeds random methods (DARE, DELLA) as
    ``umm merge --seed`` does (its default is 0 too), so the written recipe reproduces the model.
    ``cache_dtype``: sources stored in exactly this dtype are cached as they are (bfloat16 halves
    the memory for bf16 checkpoints, losslessly); everything else is cached in float32. The
    arithmetic is float32 either way.

    ``sink``: when given (a generation engine's ``load_weights``, :mod:`umm.eval.backends`), each
    merged tensor is handed to it as ``(name, tensor in the parameter's dtype)``, one at a time in
    one call, instead of being copied into ``model``, which then only gives the names, shapes and
    dtypes (it may live on the ``meta`` device).
    """

    def __init__(
        self,
        recipe: Any,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        cache_dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        sink: Callable[[Iterable[tuple[str, torch.Tensor]]], Any] | None = None,
    ) -> None:
        from umm.merge.inputs import open_inputs

        self.device = torch.device(device)
        self.model = model
        #: where merged tensors go instead of ``model``'s parameters (an engine's ``load_weights``)
        self.sink = sink
        self.seed = int(seed)
        #: CPU worker threads for methods without a fused path (TIES, DARE, SLERP, ...)
        self.threads = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))
        inputs = open_inputs(recipe)  # incompatible models: IncompatibleCheckpointsError naming `umm fuse`
        try:
            self.method = inputs.method
            self.model_paths = list(inputs.names)
            self.num_layers = inputs.num_layers
            self.base_index = inputs.base_index
            #: sources other than the base are cached as float32 task vectors (expert - base) when
            #: the search method is linear/task_arithmetic/ties with a base: a linear candidate is
            #: then base + sum_i c_i * delta_i, written in one pass per model (see :meth:`apply`)
            self.delta_mode = self.base_index is not None and (
                self.method.name in FAST_METHODS or self.method.name in RANKED_METHODS
            )
            self.slots = self._slots(model, inputs.shapes)
            self.inputs: dict[str, list[torch.Tensor]] = {}
            for name in self.slots:
                cached = [_cached(src.read_rows(name), self.device, cache_dtype) for src in inputs.sources]
                if self.delta_mode:
                    base = cached[self.base_index]
                    for i, t in enumerate(cached):
                        if i != self.base_index:
                            cached[i] = t.float().sub_(base)
                self.inputs[name] = cached
        finally:
            inputs.close()
        self.tensor_names = list(self.slots)
        self._index = {p: i for i, p in enumerate(self.model_paths)}
        self._buffer: torch.Tensor | None = None
        #: (tensor, cached index) -> descending_rank of the task vector (TIES), filled lazily
        self._ranks: dict[tuple[str, int], torch.Tensor] = {}
        if self.delta_mode and self.method.name in RANKED_METHODS:
            t0 = time.perf_counter()
            for name in self.tensor_names:
                for i in range(len(self.model_paths)):
                    if i != self.base_index:
                        self.rank(name, i)
            logger.info("ranked |task vectors| for %s in %.1f s", self.method.name, time.perf_counter() - t0)
        logger.info(
            "live merge ready: %d tensors x %d models cached on %s", len(self.tensor_names),
            len(self.model_paths), self.device,
        )

    @staticmethod
    def _slots(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, Slot]:
        """The live model's floating-point parameters, as the checkpoint tensors they hold
        (:func:`~umm.checkpoints.placement.checkpoint_slots`), checked against the checkpoints' shapes."""
        slots = checkpoint_slots(model)
        missing = [f"{n} ({s.param_name})" if s.param_name != n else n for n, s in slots.items() if n not in shapes]
        if missing:
            raise LiveMergeError(
                f"the live model has parameter(s) the checkpoints do not: {missing[:5]}; "
                "load the live model from the base model folder of the recipe"
            )
        for name, slot in slots.items():
            if slot.shape != tuple(shapes[name]):
                raise LiveMergeError(
                    f"tensor {name!r}: live model shape {slot.shape} != checkpoint shape {tuple(shapes[name])}"
                )
        return {n: s for n, s in slots.items() if s.param.is_floating_point()}

    def _plan(self, recipe: Any) -> tuple[Any, int | None]:
        """Method and base index (in the cached model order) of ``recipe``."""
        from umm.merge import get_method

        paths = [str(p) for p in recipe.model_paths()]
        unknown = [p for p in paths if p not in self._index]
        if unknown:
            raise LiveMergeError(
                f"recipe models {unknown} differ from the models loaded for the search {self.model_paths}"
            )
        base = recipe.merge_base()
        return get_method(recipe.merge_method), (self._index[str(base)] if base is not None else None)

    @torch.no_grad()
    def merged_tensor(
        self, recipe: Any, name: str, plan: tuple[Any, int | None] | None = None
    ) -> torch.Tensor:
        """The float32 merged value of one tensor under ``recipe`` (on the device), computed by
        the method's own function, exactly as ``umm merge`` does."""
        from umm.merge import resolve_tensor_params, tensor_generator

        method, base_index = plan or self._plan(recipe)
        params = resolve_tensor_params(recipe, method, name, self.num_layers)
        if self.delta_mode and method.name in RANKED_METHODS and base_index == self.base_index:
            return self._ranked_merge(method, name, params)
        base = self.source(name, base_index) if base_index is not None else None
        tensors = [self.source(name, self._index[str(m)]) for m in params.models]
        gen = (
            tensor_generator(self.seed, name, device=self.device)
            if getattr(method, "random", False)
            else None
        )
        return method.merge(base, tensors, params.per_model, params.global_, generator=gen)

    def rank(self, name: str, index: int) -> torch.Tensor:
        """:func:`descending_rank` of the cached task vector ``index`` of tensor ``name``
        (computed on first use, delta mode only)."""
        key = (name, index)
        r = self._ranks.get(key)
        if r is None:
            if not self.delta_mode or index == self.base_index:
                raise LiveMergeError(f"no task vector of model {index} is cached for {name!r}")
            r = self._ranks[key] = descending_rank(self.inputs[name][index])
        return r

    def _ranked_merge(self, method: Any, name: str, params: Any) -> torch.Tensor:
        """TIES of one tensor from the cached task vectors and ranks: the method's function run
        on a zero base with the task vectors as sources (so each delta is the cached one,
        exactly), sparsified through :class:`RankedTopK`, plus the base."""
        gp = method.fill_global_params(params.global_)
        idx = [self._index[str(m)] for m in params.models]
        state = [
            RankedTopK(self.rank(name, i), float(method.fill_tensor_params(p)["density"]), bool(gp["rescale"]))
            for i, p in zip(idx, params.per_model)
        ]
        base = self.inputs[name][self.base_index]  # type: ignore[index]
        deltas = [self.inputs[name][i] for i in idx]
        if gp["rescale"] or base.dim() == 0:
            zero = torch.zeros((), dtype=torch.float32, device=self.device).expand(base.shape)
            return method.merge(zero, deltas, params.per_model, params.global_, state=state).add_(base)
        # blocks of rows: the method's temporaries stay small (cache-resident, no page faults)
        out = torch.empty(base.shape, dtype=torch.float32, device=self.device)
        rows = base.shape[0]
        step = max(1, RANKED_BLOCK // max(1, base[0].numel()))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            zero = torch.zeros((), dtype=torch.float32, device=self.device).expand(base[r0:r1].shape)
            block = method.merge(zero, [d[r0:r1] for d in deltas], params.per_model, params.global_,
                                 state=state, row_offset=r0)
            torch.add(block, base[r0:r1], out=out[r0:r1])
        return out

    def source(self, name: str, index: int) -> torch.Tensor:
        """Tensor ``name`` of model ``model_paths[index]`` as read (rebuilt as base + delta in
        delta mode: equal up to one float32 rounding, exact for bf16 checkpoints)."""
        t = self.inputs[name][index]
        if self.delta_mode and index != self.base_index:
            return torch.add(self.inputs[name][self.base_index].float(), t)
        return t

    def _linear_coefficients(
        self, recipe: Any, name: str, plan: tuple[Any, int | None]
    ) -> list[tuple[int, float]] | None:
        """For linear and task_arithmetic the merge is ``sum_i c_i * tensor_i``; the (cached
        index, c_i) pairs of one tensor (the base's coefficient included), or None for the
        other methods, which go through :meth:`merged_tensor`."""
        from umm.merge import resolve_tensor_params

        method, base_index = plan
        if method.name not in FAST_METHODS:
            return None
        params = resolve_tensor_params(recipe, method, name, self.num_layers)
        weights = [float(p["weight"]) for p in params.per_model]
        idx = [self._index[str(m)] for m in params.models]
        g = params.global_
        if method.name == "linear":
            total = sum(weights) if g["normalize"] else 1.0
            if total == 0:
                return None  # let the method raise its own error
            coeffs = [(i, w / total) for i, w in zip(idx, weights)]
        else:
            if base_index is None:
                return None
            total = float(torch.tensor(weights, dtype=torch.float32).sum()) if g["normalize"] else 1.0
            if abs(total) < 1e-8:
                total = 1.0
            scale = float(g["lambda"]) / total
            coeffs = [(base_index, 1.0 - sum(w * scale for w in weights))]
            coeffs += [(i, w * scale) for i, w in zip(idx, weights)]
        return self._on_cache(coeffs)

    def _on_cache(self, coeffs: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """Rewrite ``sum_i c_i * source_i`` as a combination of the cached tensors, base first.

        In delta mode source_i = base + delta_i, so the base's coefficient becomes the sum of all
        coefficients (1 for task arithmetic: base + sum_i c_i delta_i)."""
        merged: dict[int, float] = {}
        for i, c in coeffs:
            merged[i] = merged.get(i, 0.0) + c
        if self.delta_mode:
            b = self.base_index
            assert b is not None
            base_c = sum(merged.values())
            if abs(base_c - 1.0) < 1e-12:
                base_c = 1.0  # task arithmetic: exactly base + sum_i c_i delta_i
            rest = [(i, c) for i, c in merged.items() if i != b]
            return [(b, base_c), *rest]
        return list(merged.items())

    @torch.no_grad()
    def apply(self, recipe: Any) -> float:
        """Write the merge of ``recipe`` (same models, any method) into the live model's
        parameters; returns the seconds taken.

        linear and task_arithmetic take a fused path: ``base + sum_i c_i * delta_i`` (delta mode)
        or ``sum_i c_i * tensor_i``, accumulated in float32 straight into the parameter, one pass
        per model; it equals the method's function up to float32 rounding. Other methods call
        the method's function on the (rebuilt) source tensors.
        """
        plan = self._plan(recipe)
        t0 = time.perf_counter()
        if self.sink is not None:
            self.sink(self._merged_pairs(recipe, plan))
            self._synchronize()
            return time.perf_counter() - t0
        generic: list[str] = []
        for name, slot in self.slots.items():
            coeffs = self._linear_coefficients(recipe, name, plan)
            if coeffs is None:
                generic.append(name)
                continue
            view = slot.view
            direct = view is not None and view.dtype == torch.float32 and view.is_contiguous()
            out = view if direct else self._scratch(slot.shape)
            self._combine(self.inputs[name], coeffs, out)
            slot.write(out)
        if generic:
            self._apply_generic(recipe, generic, plan)
        self._synchronize()
        return time.perf_counter() - t0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _combine(cached: list[torch.Tensor], coeffs: list[tuple[int, float]], out: torch.Tensor) -> torch.Tensor:
        """``out = sum_i c_i * cached[i]`` for the (index, c_i) pairs of :meth:`_linear_coefficients`,
        accumulated in float32 (``out``), one pass per model."""
        (i0, c0), rest = coeffs[0], coeffs[1:]
        if c0 == 1.0 and rest and cached[i0].dtype == torch.float32:
            (i1, c1), rest = rest[0], rest[1:]
            torch.add(cached[i0], cached[i1], alpha=c1, out=out)  # base + c1 * delta1, one pass
        else:
            out.copy_(cached[i0])  # upcast first: float32 arithmetic whatever the cache dtype
            if c0 != 1.0:
                out.mul_(c0)
        for i, c in rest:
            out.add_(cached[i], alpha=c)
        return out

    @torch.no_grad()
    def _merged_pairs(self, recipe: Any, plan: tuple[Any, int | None]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor in the parameter's dtype)`` for every parameter, computed when
        asked for (one new tensor at a time: the consumer may keep or free it)."""
        for name, slot in self.slots.items():
            coeffs = self._linear_coefficients(recipe, name, plan)
            if coeffs is None:
                merged = self.merged_tensor(recipe, name, plan)
            else:
                merged = self._combine(self.inputs[name], coeffs, self._scratch(slot.shape))
            yield name, merged.to(slot.param.dtype, copy=True)

    @torch.no_grad()
    def _apply_generic(self, recipe: Any, names: list[str], plan: tuple[Any, int | None]) -> None:
        """The method's own function per tensor; on CPU over a few threads (torch releases the
        GIL), largest tensors first, as the streaming executor does."""

        def one(name: str) -> None:
            with torch.no_grad():
                self.slots[name].write(self.merged_tensor(recipe, name, plan))

        workers = self.threads if self.device.type == "cpu" else 1
        if workers <= 1 or len(names) == 1:
            for name in names:
                one(name)
            return
        from concurrent.futures import ThreadPoolExecutor

        names = sorted(names, key=lambda n: -self.slots[n].numel)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="umm-live-merge") as pool:
            for f in [pool.submit(one, n) for n in names]:
                f.result()

    def _scratch(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._buffer[:numel].view(shape)

    @torch.no_grad()
    def load_source(self, index: int) -> None:
        """Put the unmerged model ``model_paths[index]`` into the live model (or the sink)."""
        if self.sink is not None:
            self.sink((name, self.source(name, index).to(slot.param.dtype, copy=True))
                      for name, slot in self.slots.items())
            return
        for name, slot in self.slots.items():
            slot.write(self.source(name, index))
