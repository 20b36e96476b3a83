"""The genome: a typed layer-wise parameter set (layer group × model × parameter), what CMA-ES writes.

Layout. ``values`` is float64 ``[groups, models, params]``; with ``filters`` (e.g.
``("self_attn", "mlp")``) it is ``[groups, models, sets, params]`` where set ``s <
len(filters)`` holds the values of tensors whose name contains ``filters[s]`` (first match wins,
as in mergekit) and the last set holds every other tensor. :attr:`Genome.values4` always gives
the 4-D view. Group ``g`` covers the contiguous layers ``L`` with ``L * groups // num_layers ==
g`` (block sizes differ by at most one). ``models`` are the merge sources (the base excluded for
methods with a base), in the order of :meth:`MergeRecipe.source_models`.

Non-layer tensors (embeddings, final norm, lm_head) take the values of **group 0**: mergekit
evaluates every gradient at ``t = 0`` for them, so this is what keeps :meth:`to_recipe` exact.
Filters still apply to them (``lm_head`` matches a filter ``"lm_head"``).

Recipe form (:meth:`to_recipe`): each per-model parameter is written as a scalar when it is the
same everywhere, else as a gradient of ``num_layers`` entries (entry ``L`` = the value of
layer ``L``'s group), and with filters as a list of ``{filter, value}`` rules ending with a
catch-all rule. Resolving that recipe with mergekit's rules gives the genome's value for every
tensor, up to the float64 rounding of mergekit's interpolation formula (≤ 1e-15 relative).
Parameters that are *global* in mergekit (slerp's ``t``) go to the top-level ``parameters``;
they need a single model (slerp has one besides the base).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umm.errors import UmmError
from umm.merge.methods.registry import get_method
from umm.merge.params import FilterRule, resolve_tensor_params
from umm.merge.recipe import MergeRecipe, ModelEntry

# Sensible search bounds per parameter (lower, upper); unlisted parameters are unbounded.
PARAM_BOUNDS: Mapping[str, tuple[float, float]] = {
    "density": (0.0, 1.0),
    "t": (0.0, 1.0),
    "gamma": (0.0, 1.0),
    "epsilon": (0.0, 0.5),
}
_START: Mapping[str, float] = {"density": 1.0, "t": 0.5}


class GenomeError(UmmError):
    """A genome that is inconsistent, or a recipe that a genome cannot express."""


@dataclass(frozen=True, eq=False)
class Genome:
    """Layer-wise merge parameters; immutable (``values`` is a read-only array)."""

    method: str
    base_model: str | None
    models: tuple[str, ...]
    num_layers: int
    groups: int
    param_names: tuple[str, ...]
    values: np.ndarray
    global_params: Mapping[str, float | bool] = field(default_factory=dict)
    filters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if method.search_refusal:
            raise GenomeError(f"evolve cannot search merge_method {self.method}: {method.search_refusal}")
        set_ = object.__setattr__
        set_(self, "models", tuple(self.models))
        set_(self, "param_names", tuple(self.param_names))
        set_(self, "global_params", dict(self.global_params))
        if self.filters is not None:
            set_(self, "filters", tuple(self.filters))
        if not self.models:
            raise GenomeError("a genome needs at least one model")
        if len(set(self.models)) != len(self.models):
            raise GenomeError(f"models listed more than once: {self.models}")
        if method.requires_base and not self.base_model:
            raise GenomeError(f"{self.method} needs a base_model")
        if self.base_model in self.models:
            raise GenomeError("models are the merge sources and must not include the base model")
        if not method.uses_base and self.base_model is not None:
            raise GenomeError(f"{self.method} does not use a base model: list it under models instead")
        if self.method == "slerp" and len(self.models) != 1:
            raise GenomeError("slerp merges the base with exactly one model")
        lo, hi = method.min_sources, method.max_sources
        if len(self.models) < lo or (hi is not None and len(self.models) > hi):
            raise GenomeError(f"{self.method} merges {lo} to {hi or 'any number of'} models, got {len(self.models)}")
        if not (1 <= self.groups <= max(1, self.num_layers)):
            raise GenomeError(f"groups must be between 1 and num_layers ({self.num_layers}), got {self.groups}")
        valid = [*method.tensor_params, *(k for k, d in method.global_params.items() if not isinstance(d, bool))]
        for p in self.param_names:
            if p not in valid:
                raise GenomeError(f"{self.method} has no parameter {p!r} for a genome; valid: {', '.join(valid)}")
            if p in method.global_params and len(self.models) != 1:
                raise GenomeError(f"{p!r} is a global parameter of {self.method}: a genome with it needs one model")
        if len(set(self.param_names)) != len(self.param_names):
            raise GenomeError(f"parameters listed more than once: {self.param_names}")
        for k in self.global_params:
            if k in self.param_names or k not in method.global_params:
                raise GenomeError(f"global_params: {k!r} is not a fixed global parameter of {self.method}")
        arr = np.array(self.values, dtype=np.float64)
        expected = (self.groups, len(self.models), *(() if self.filters is None else (self.sets,)), len(self.param_names))
        if arr.shape != expected:
            raise GenomeError(f"values has shape {arr.shape}, expected {expected}")
        arr.setflags(write=False)
        set_(self, "values", arr)

    # --------------------------------------------------------------------------- structure
    @property
    def sets(self) -> int:
        """Number of tensor sets: one per filter plus the catch-all."""
        return len(self.filters or ()) + 1

    @property
    def values4(self) -> np.ndarray:
        """``values`` as ``[groups, models, sets, params]`` (a read-only view)."""
        return self.values if self.filters is not None else self.values[:, :, None, :]

    def group_of_layer(self, layer: int) -> int:
        """The group of layer ``layer`` (contiguous blocks)."""
        if not 0 <= layer < max(1, self.num_layers):
            raise GenomeError(f"layer {layer} out of range for {self.num_layers} layers")
        return layer * self.groups // max(1, self.num_layers)

    def set_of(self, tensor_name: str) -> int:
        """The tensor set of a tensor name: the first filter it contains, else the catch-all."""
        for i, f in enumerate(self.filters or ()):
            if f in tensor_name:
                return i
        return self.sets - 1

    def value(self, tensor_name: str) -> np.ndarray:
        """``[models, params]`` values for one tensor (non-layer tensors use group 0)."""
        from umm.merge.params import layer_index

        layer = layer_index(tensor_name)
        g = 0 if layer is None else self.group_of_layer(layer)
        return self.values4[g, :, self.set_of(tensor_name), :]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds per coordinate of :meth:`to_vector` (±inf where unbounded)."""
        lo = np.array([PARAM_BOUNDS.get(p, (-math.inf, math.inf))[0] for p in self.param_names])
        hi = np.array([PARAM_BOUNDS.get(p, (-math.inf, math.inf))[1] for p in self.param_names])
        shape = self.values.shape
        return np.broadcast_to(lo, shape).ravel().copy(), np.broadcast_to(hi, shape).ravel().copy()

    # ------------------------------------------------------------------------------ vectors
    def to_vector(self) -> np.ndarray:
        """A flat float64 copy of ``values`` (C order) for the optimizer."""
        return self.values.ravel().copy()

    def with_vector(self, vector: Sequence[float] | np.ndarray) -> Genome:
        """A genome with the same layout and the values of ``vector`` (from :meth:`to_vector`)."""
        v = np.asarray(vector, dtype=np.float64)
        if v.size != self.values.size:
            raise GenomeError(f"vector has {v.size} values, the genome {self.values.size}")
        return dataclasses.replace(self, values=v.reshape(self.values.shape))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Genome):
            return NotImplemented
        return all(
            getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self) if f.name != "values"
        ) and np.array_equal(self.values, other.values)

    __hash__ = None  # type: ignore[assignment]

    # ---------------------------------------------------------------------------- creation
    @classmethod
    def uniform(
        cls,
        method: str,
        base_model: str | None,
        models: Sequence[str],
        num_layers: int,
        groups: int,
        param_names: Sequence[str] | None = None,
        *,
        filters: Sequence[str] | None = None,
        global_params: Mapping[str, float | bool] | None = None,
    ) -> Genome:
        """The usual start: weight 1/n, density 1, t 0.5, other parameters at the method's default.

        ``param_names`` defaults to ``weight`` (+ ``density`` for sparsifying methods; ``t`` for slerp).
        """
        m = get_method(method)
        if param_names is None:
            if method == "slerp":
                param_names = ("t",)
            elif "density" in m.tensor_params and method != "task_arithmetic":
                param_names = ("weight", "density")
            else:
                param_names = ("weight",)
        n = len(models)
        start = []
        for p in param_names:
            if p == "weight":
                start.append(1.0 / max(1, n))
            elif p in _START:
                start.append(_START[p])
            elif p not in m.tensor_params and p not in m.global_params:
                start.append(0.0)  # rejected with the list of valid parameters below
            else:
                default = m.tensor_params.get(p, m.global_params.get(p))
                if default is None or isinstance(default, bool):
                    raise GenomeError(f"no start value for parameter {p!r}")
                start.append(float(default))
        sets = () if filters is None else (len(filters) + 1,)
        values = np.broadcast_to(np.array(start, dtype=np.float64), (groups, n, *sets, len(start))).copy()
        return cls(
            method=method,
            base_model=base_model,
            models=tuple(models),
            num_layers=num_layers,
            groups=groups,
            param_names=tuple(param_names),
            values=values,
            global_params=dict(global_params or {}),
            filters=None if filters is None else tuple(filters),
        )

    # ------------------------------------------------------------------------------ recipes
    def to_recipe(self, **extra: Any) -> MergeRecipe:
        """The equivalent mergekit recipe (``extra``: dtype, out_dtype, tokenizer_source, name, ...)."""
        method = get_method(self.method)
        v = self.values4
        layer_groups = [self.group_of_layer(L) for L in range(max(1, self.num_layers))]
        per_model: list[dict[str, Any]] = [{} for _ in self.models]
        top: dict[str, Any] = dict(self.global_params)
        for p_idx, p in enumerate(self.param_names):
            for m_idx in range(len(self.models)):
                value = self._param_value(v[:, m_idx, :, p_idx], layer_groups)
                if p in method.global_params:
                    top[p] = value
                else:
                    per_model[m_idx][p] = value
        data: dict[str, Any] = {
            "merge_method": self.method,
            "base_model": self.base_model,
            "models": [ModelEntry(model=m, parameters=per_model[i]) for i, m in enumerate(self.models)],
            "parameters": top,
            **extra,
        }
        return MergeRecipe.model_validate(data)

    def _param_value(self, table: np.ndarray, layer_groups: list[int]) -> Any:
        """One parameter of one model, ``table`` = [groups, sets] -> scalar, gradient or rules."""

        def per_set(s: int) -> float | list[float]:
            col = [float(table[g, s]) for g in layer_groups]
            return col[0] if all(x == col[0] for x in col) else col

        forms = [per_set(s) for s in range(self.sets)]
        if all(f == forms[0] for f in forms):
            return forms[0]
        rules = [FilterRule(filter=f, value=forms[i]) for i, f in enumerate(self.filters or ())]
        return [*rules, FilterRule(value=forms[-1])]

    @classmethod
    def from_recipe(cls, recipe: MergeRecipe, num_layers: int, groups: int) -> Genome:
        """The genome of ``recipe`` with ``groups`` layer groups; :class:`GenomeError` if inexpressible.

        Genome parameters: the method's per-model parameters that the recipe sets, plus global
        numeric ones that are required (slerp's ``t``) or vary by layer/tensor; fixed global
        parameters written in the recipe go to ``global_params``.
        """
        recipe.validate_for_merge()
        if recipe.is_stacked(num_layers):
            raise GenomeError(
                "the recipe stacks layers (slices with partial layer ranges); evolve searches merges "
                "that keep the models' layers: use 'models:' or one slice spanning every layer"
            )
        method = get_method(recipe.merge_method)
        sources = tuple(recipe.source_models())
        levels = [*(recipe.model_parameters(m) for m in sources), *recipe.shared_parameter_levels()]
        shared = recipe.shared_parameter_levels()
        names = [p for p in method.tensor_params if any(p in lv for lv in levels)]
        fixed: dict[str, float | bool] = {}
        for p, default in method.global_params.items():
            written = [lv[p] for lv in shared if p in lv]
            if default is None or (written and isinstance(written[0], list)):
                names.append(p)
            elif written and isinstance(written[0], (bool, int, float)):
                fixed[p] = written[0]
        filters = _common_filters([lv[p] for lv in levels for p in names if p in lv])

        probe = cls.uniform(recipe.merge_method, recipe.merge_base(), sources, num_layers, groups, names,
                            filters=filters, global_params=fixed) if names else None
        if probe is None:
            raise GenomeError(f"the recipe sets no per-layer parameter of {method.name}")
        out = np.full(probe.values4.shape, np.nan)

        def params_of(name: str) -> np.ndarray:
            tp = resolve_tensor_params(recipe, method, name, num_layers)
            rows = []
            for m_idx in range(len(sources)):
                rows.append([tp.per_model[m_idx][p] if p in method.tensor_params else tp.global_[p] for p in names])
            return np.array(rows, dtype=np.float64)

        for s in range(probe.sets):
            for layer in range(max(1, num_layers)):
                got = params_of(_probe_name(probe, s, layer))
                g = probe.group_of_layer(layer)
                if np.isnan(out[g, :, s, :]).all():
                    out[g, :, s, :] = got
                elif not np.allclose(out[g, :, s, :], got, rtol=1e-12, atol=1e-12):
                    raise GenomeError(
                        f"the recipe's values change inside layer group {g} (layer {layer}); "
                        f"it is not expressible with {groups} groups (try groups={num_layers})"
                    )
            got = params_of(_probe_name(probe, s, None))
            if not np.allclose(out[0, :, s, :], got, rtol=1e-12, atol=1e-12):
                raise GenomeError(
                    "the recipe gives non-layer tensors (embeddings, norm, lm_head) other values than "
                    "layer group 0; a genome ties them to group 0 (mergekit's t = 0 rule)"
                )
        values = out if filters is not None else out[:, :, 0, :]
        return dataclasses.replace(probe, values=values)


def _common_filters(values: list[Any]) -> tuple[str, ...] | None:
    """The filter sequence shared by every rule list among ``values`` (None when there are none)."""
    found: tuple[str, ...] | None = None
    for value in values:
        rules = [value] if isinstance(value, FilterRule) else value
        if not (isinstance(rules, list) and rules and isinstance(rules[0], FilterRule)):
            continue
        fs = [r.filter for r in rules]
        if fs and fs[-1] in (None, "*"):
            fs = fs[:-1]
        if any(f in (None, "*") for f in fs):
            raise GenomeError("a catch-all filter rule must come last to be expressible as a genome")
        if found is None:
            found = tuple(fs)  # type: ignore[arg-type]
        elif tuple(fs) != found:
            raise GenomeError(f"filter rules differ between parameters ({found} vs {tuple(fs)}); not expressible")
    return found


def _probe_name(genome: Genome, s: int, layer: int | None) -> str:
    """A tensor name that falls in set ``s`` and layer ``layer`` (None: a non-layer tensor)."""
    prefix = "model." if layer is None else f"model.layers.{layer}."
    if s < genome.sets - 1:
        return f"{prefix}{(genome.filters or ())[s]}.weight"
    for leaf in ("embed_tokens.weight", "norm.weight", "w.weight", "x", "_"):
        name = prefix + leaf
        if genome.set_of(name) == s:
            return name
    raise GenomeError("the filters match every tensor name; the catch-all set is unreachable")
