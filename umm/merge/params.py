"""Parameter values with mergekit's semantics: scalars, layer gradients and filter rules.

A parameter value is one of (exactly mergekit's ``ParameterSetting``):

- a scalar (``0.5``, ``true``);
- a *gradient*, a list of numbers interpolated over the layer index: for layer ``L`` of ``N``
  layers ``t = L / (N - 1)`` (``t = 1`` when ``N == 1``), ``x = t · (len - 1)``, ``i = int(x)``,
  ``value = (1 - (x - i)) · g[i] + (x - i) · g[min(i + 1, len - 1)]``;
- a list of ``{filter, value}`` rules: the first rule whose ``filter`` is a substring of the
  tensor name (or is missing / ``"*"``) gives the value (itself a scalar or a gradient); when no
  rule matches (or the list is empty) the value is *unset* (``None``) and the next level of
  precedence is consulted.

In a ``slices:`` recipe ``L`` and ``N`` are the layer's offset in its slice and the slice's
length (see :mod:`umm.merge.layout`). Tensors outside the numbered layers (embeddings, final
norm, lm_head) are evaluated at ``t = 0`` — the first element of any gradient — as mergekit does for its "pre" and "post"
weights. Precedence (:func:`resolve_tensor_params`): the model's own ``parameters`` > the
slice's ``parameters`` > the recipe's top-level ``parameters`` > the method's default.
Global parameters (``normalize``, ``t``, ...) are read from the slice and top level only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from pydantic import BaseModel, ConfigDict, StrictBool

from umm.errors import UmmError

if TYPE_CHECKING:
    from umm.merge.layout import Route
    from umm.merge.methods.base import MergeMethod
    from umm.merge.recipe import MergeRecipe

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


class FilterRule(BaseModel):
    """``{filter: substring, value: scalar | gradient}``; no filter (or ``"*"``) matches every tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    filter: str | None = None
    value: Union[StrictBool, float, list[float]]  # noqa: UP007 (pydantic union order matters)


ParamValue = Union[StrictBool, float, list[float], FilterRule, list[FilterRule]]  # noqa: UP007


class ParameterError(UmmError):
    """A parameter value cannot be evaluated (bad layer index, empty gradient, ...)."""


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters for one tensor: ``per_model[i]`` belongs to ``models[i]``.

    ``models`` are the recipe's merge sources (:meth:`MergeRecipe.source_models`), i.e. the
    order of the ``tensors`` argument of :meth:`MergeMethod.merge`.
    """

    per_model: tuple[Mapping[str, float], ...]
    global_: Mapping[str, float | bool]
    models: tuple[str, ...] = field(default=())


def layer_index(tensor_name: str) -> int | None:
    """The block index in names like ``model.layers.7.mlp...`` (also ``h.N``, ``blocks.N``, ``layer.N``)."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_t(tensor_name: str, num_layers: int) -> float:
    """mergekit's interpolation position of a tensor: ``L / (N - 1)`` in layers, 0 elsewhere."""
    layer = layer_index(tensor_name)
    if layer is None:
        return 0.0
    if layer >= num_layers:
        raise ParameterError(f"tensor {tensor_name!r} is in layer {layer} but the model has {num_layers} layers")
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(gradient: list[float], t: float) -> float:
    """A gradient's value at position ``t`` in [0, 1] (mergekit's formula, bit for bit)."""
    if not gradient:
        raise ParameterError("a gradient (list of values) must not be empty")
    scaled = t * (len(gradient) - 1)
    i0 = int(scaled)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * gradient[i0] + frac * gradient[i1]


def evaluate(value: Any, tensor_name: str, t: float) -> float | bool | None:
    """A parameter value for one tensor at position ``t``; ``None`` when no filter rule matches."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        value = FilterRule.model_validate(value)
    if isinstance(value, FilterRule):
        value = [value]
    if isinstance(value, list):
        if not value:
            return None  # an empty list is unset (mergekit 0.1.5)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return interpolate([float(v) for v in value], t)
        if all(isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]
        for rule in value:
            rule = FilterRule.model_validate(rule) if isinstance(rule, Mapping) else rule
            if not isinstance(rule, FilterRule):
                raise ParameterError(f"cannot mix numbers and filter rules in one list: {value!r}")
            if rule.filter is None or rule.filter == "*" or (tensor_name and rule.filter in tensor_name):
                return evaluate(rule.value, tensor_name, t)
        return None
    raise ParameterError(f"unexpected parameter value {value!r}")


def resolve(value: ParamValue, tensor_name: str, num_layers: int) -> float | bool | None:
    """``value`` for ``tensor_name`` of a model with ``num_layers`` layers (mergekit semantics).

    Returns ``None`` when ``value`` is a list of filter rules none of which matches: the caller
    then falls back to the next level of precedence.
    """
    return evaluate(value, tensor_name, layer_t(tensor_name, num_layers))


def _first(levels: list[Mapping[str, Any]], key: str, tensor_name: str, t: float) -> float | bool | None:
    for params in levels:
        if key in params:
            value = evaluate(params[key], tensor_name, t)
            if value is not None:
                return value
    return None


def resolve_tensor_params(
    recipe: MergeRecipe, method: MergeMethod, tensor_name: str, num_layers: int, route: Route | None = None
) -> TensorParams:
    """Every parameter of ``method`` for one output tensor, per merge source and global.

    ``route`` (from the recipe's :meth:`~umm.merge.recipe.MergeRecipe.layout`) gives the
    tensor's slice, gradient position and models; without it the recipe must keep the inputs'
    layers (no layer stacking) and the tensor's position is ``layer_t(tensor_name, num_layers)``.
    Per-model parameters take precedence over the slice's and the top-level ``parameters``;
    defaults come from the method; a missing required parameter raises :class:`ParameterError`.
    """
    if route is None:
        recipe.check_layer_count(num_layers)
        if recipe.is_stacked(num_layers):
            raise ParameterError(
                "this recipe stacks layers (slices with partial layer ranges): resolve its tensors "
                "through the recipe's layout (umm.merge.inputs.open_inputs), not by input tensor name"
            )
        t, k, sources = layer_t(tensor_name, num_layers), 0, list(recipe.source_models())
    else:
        t, k, sources = route.t, route.slice_index, list(route.models)
    shared = recipe.shared_parameter_levels(k)
    per_model: list[dict[str, float]] = []
    for model in sources:
        levels = [recipe.model_parameters(model, k), *shared]
        values: dict[str, float] = {}
        for key, default in method.tensor_params.items():
            v = _first(levels, key, tensor_name, t)
            if v is None:
                v = default
            if v is None:
                raise ParameterError(
                    f"{method.name}: missing required parameter '{key}' for model {model} "
                    f"(tensor {tensor_name}); set it in the model's parameters or the top-level parameters"
                )
            values[key] = _finite(float(v), key, model, tensor_name)
        per_model.append(values)
    global_: dict[str, float | bool] = {}
    for key, default in method.global_params.items():
        v = _first(shared, key, tensor_name, t)
        if v is None:
            v = default
        if v is None:
            raise ParameterError(
                f"{method.name}: missing required parameter '{key}' (tensor {tensor_name}); "
                "set it in the top-level parameters"
            )
        global_[key] = v if isinstance(v, bool) else _finite(float(v), key, "", tensor_name)
    return TensorParams(per_model=tuple(per_model), global_=global_, models=tuple(sources))


def _finite(v: float, key: str, model: str, tensor_name: str) -> float:
    if not math.isfinite(v):
        where = f" for model {model}" if model else ""
        raise ParameterError(f"parameter '{key}'{where} is {v} for tensor {tensor_name}; it must be finite")
    return v
