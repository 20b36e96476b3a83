"""Merge recipes: mergekit's YAML, parsed into frozen pydantic models and written back.

Accepted keys (mergekit's ``MergeConfiguration``): ``merge_method``, ``models`` (each
``model`` + optional ``parameters``), ``slices``, ``base_model``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source`` (``base``, ``union`` or a model), ``tokenizer``,
``chat_template``, ``modules``, plus ``name``, which mergekit ignores. Unknown keys are an error
that lists the valid ones. A recipe written by :meth:`MergeRecipe.to_yaml` is valid mergekit YAML.

What umm can run (:meth:`MergeRecipe.validate_for_merge`): a ``models:`` recipe, or a
``slices:`` recipe: slices one after the other, each with sources of equal layer counts
(``layer_range: [start, end)``), the output layers renumbered from 0 (layer stacking, see
:mod:`umm.merge.layout`); ``modules`` and ``tokenizer`` are parsed but rejected with a "not
supported yet" error. A model may appear in several slices, once per slice.

Models and the base (as mergekit): for methods with a base (task arithmetic, TIES, slerp, ...)
the base may also be listed under ``models``; it is then not merged as a task vector and its
parameters are ignored. For ``linear`` a ``base_model`` is simply one more weighted input.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from umm import configfile
from umm.errors import UmmError
from umm.merge.layout import Layout, build_layout
from umm.merge.layout import SliceSource as LayoutSource
from umm.merge.params import FilterRule, ParameterError, ParamValue, evaluate

DTYPES = ("float32", "float16", "bfloat16")


class RecipeError(UmmError):
    """A recipe that cannot be parsed or cannot be run."""


def _none_to_empty(value: Any) -> Any:
    """YAML ``parameters:`` with nothing after it is null; mergekit reads it as no parameters."""
    return {} if value is None else value


class ModelEntry(BaseModel):
    """One input model and its per-model parameters.

    ``layer_range`` is accepted because mergekit-evolve writes it here (mergekit ignores it in
    ``models:`` recipes); umm requires it to span every layer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = {}
    layer_range: tuple[int, int] | None = None

    _params = field_validator("parameters", mode="before")(_none_to_empty)


class SliceSource(BaseModel):
    """A model's layer range inside a slice (mergekit's ``InputSliceDefinition``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = {}

    _params = field_validator("parameters", mode="before")(_none_to_empty)


class OutputSlice(BaseModel):
    """One output slice (mergekit's ``OutputSliceDefinition``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, ParamValue] = {}

    _params = field_validator("parameters", mode="before")(_none_to_empty)


class MergeRecipe(BaseModel):
    """A merge recipe (mergekit's YAML schema). Frozen; build a new one to change it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    merge_method: str
    models: list[ModelEntry] = []
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: dict[str, ParamValue] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    modules: dict[str, Any] | None = None
    name: str | None = None

    _params = field_validator("parameters", mode="before")(_none_to_empty)
    _models = field_validator("models", mode="before")(lambda v: [] if v is None else v)

    # ----------------------------------------------------------------------------------- I/O
    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> MergeRecipe:
        """Parse YAML text; errors name the key path (and the YAML line for syntax errors)."""
        data = configfile.parse_yaml(text, source, RecipeError)
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a YAML mapping with at least 'merge_method' and 'models'")
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> MergeRecipe:
        """Validate a parsed recipe mapping."""
        moe = [k for k in ("experts", "gate_mode", "experts_per_token") if k in data]
        if moe:
            raise RecipeError(
                f"{source}: {', '.join(moe)}: this is a mergekit-moe config (MoE assembly from dense "
                "experts), which umm does not support; umm merges models of one architecture tensor by "
                "tensor (umm merge) or fuses their distributions (umm fuse)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_explain(exc, source)) from None

    @classmethod
    def load(cls, path: str | Path) -> MergeRecipe:
        """Read and parse a recipe file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {p}: {exc.strerror or exc}") from None
        return cls.from_yaml(text, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """Plain data in mergekit's layout, without unset or empty fields."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key in ("models", "parameters"):
            if not data.get(key):
                data.pop(key, None)
        for entry in data.get("models", []):
            if entry.get("layer_range") is not None:
                entry["layer_range"] = list(entry["layer_range"])
            if not entry.get("parameters"):
                entry.pop("parameters", None)
            else:
                entry["parameters"] = {k: _plain(v) for k, v in entry["parameters"].items()}
        for sl in data.get("slices") or []:
            for src in sl["sources"]:
                src["layer_range"] = list(src["layer_range"])
                if not src.get("parameters"):
                    src.pop("parameters", None)
            if not sl.get("parameters"):
                sl.pop("parameters", None)
        if "parameters" in data:
            data["parameters"] = {k: _plain(v) for k, v in data["parameters"].items()}
        order = ["name", "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template", "modules"]
        return {k: data[k] for k in order if k in data}

    def to_yaml(self) -> str:
        """The recipe as mergekit-compatible YAML (number lists in flow style)."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)

    # ------------------------------------------------------------------------------ queries
    def model_paths(self) -> list[str]:
        """Every model read by the merge: the base first (if any), then the inputs, deduplicated."""
        out: list[str] = []
        for m in ([self.base_model] if self.base_model else []) + self._input_models():
            if m not in out:
                out.append(m)
        return out

    def source_models(self) -> list[str]:
        """The models passed as ``tensors`` to :meth:`MergeMethod.merge`, in order.

        For methods with a base, the inputs other than the base; for ``linear`` every input,
        followed by the base when it is not listed (mergekit adds it as one more input).
        """
        from umm.merge.methods.registry import get_method

        method = get_method(self.merge_method)
        inputs = _dedup(self._input_models())
        if method.uses_base and self.base_model:
            return [m for m in inputs if m != self.base_model]
        if self.base_model and self.base_model not in inputs:
            inputs.append(self.base_model)
        return inputs

    def merge_base(self) -> str | None:
        """The model passed as ``base`` to :meth:`MergeMethod.merge` (``None`` for ``linear``)."""
        from umm.merge.methods.registry import get_method

        return self.base_model if get_method(self.merge_method).uses_base else None

    def model_parameters(self, model: str, slice_index: int = 0) -> dict[str, ParamValue]:
        """The per-model parameters written for ``model`` (in slice ``slice_index``; empty if none)."""
        if self.slices:
            for src in self.slices[slice_index].sources:
                if src.model == model:
                    return src.parameters
            return {}
        for entry in self.models:
            if entry.model == model:
                return entry.parameters
        return {}

    def shared_parameter_levels(self, slice_index: int = 0) -> list[dict[str, ParamValue]]:
        """Parameter mappings below the per-model level (of slice ``slice_index``), highest first."""
        levels = []
        if self.slices:
            levels.append(self.slices[slice_index].parameters)
        levels.append(self.parameters)
        return levels

    def check_layer_count(self, num_layers: int) -> None:
        """Every layer range must lie inside the models' ``num_layers`` layers (``models:``
        entries, which mergekit-evolve may give a ``layer_range``, must span them all)."""
        for entry in self.models:
            if entry.layer_range is not None and tuple(entry.layer_range) != (0, num_layers):
                raise RecipeError(
                    f"model {entry.model}: layer_range {list(entry.layer_range)} does not cover the "
                    f"model's {num_layers} layers; to take part of a model's layers use 'slices:'"
                )
        for k, sl in enumerate(self.slices or []):
            for src in sl.sources:
                if src.layer_range[1] > num_layers:
                    raise RecipeError(
                        f"slice {k}: model {src.model} layer_range {list(src.layer_range)} goes past "
                        f"the model's {num_layers} layers"
                    )

    def is_stacked(self, num_layers: int) -> bool:
        """Whether the output layers differ from the inputs' (several slices, or partial ranges)."""
        return bool(self.slices) and not (
            len(self.slices) == 1 and all(tuple(s.layer_range) == (0, num_layers) for s in self.slices[0].sources)
        )

    def layout(self, tensor_names: list[str], num_layers: int, ref_model: str) -> Layout:
        """Which input tensors make each output tensor (:mod:`umm.merge.layout`), for models
        whose tensors are ``tensor_names`` with ``num_layers`` layers."""
        self.check_layer_count(num_layers)
        if self.slices:
            slices = [[LayoutSource(s.model, *s.layer_range) for s in sl.sources] for sl in self.slices]
        else:
            base = self.merge_base()
            models = ([base] if base else []) + self.source_models()  # mergekit's order of inputs
            slices = [[LayoutSource(m, 0, num_layers) for m in models]]
        return build_layout(slices, self.merge_base(), ref_model, tensor_names, num_layers)

    def _input_models(self) -> list[str]:
        if self.slices:
            return [s.model for sl in self.slices for s in sl.sources]
        return [e.model for e in self.models]

    # ---------------------------------------------------------------------------- validation
    def validate_for_merge(self) -> None:
        """Raise :class:`RecipeError` if umm cannot run this recipe, saying what to change."""
        from umm.merge.methods.registry import get_method

        method = get_method(self.merge_method)
        if self.modules:
            raise RecipeError("'modules' recipes are not supported yet; use 'models'")
        if self.tokenizer:
            raise RecipeError("'tokenizer' settings are not supported yet; use tokenizer_source: base")
        if self.slices is not None and self.models:
            raise RecipeError("a recipe has exactly one of 'models' or 'slices', not both")
        if self.slices is not None:
            self._check_slices()
        elif not self.models:
            raise RecipeError("the recipe lists no models: add a 'models:' list")
        for inputs in self._slice_models():
            dupes = sorted({m for m in inputs if inputs.count(m) > 1})
            if dupes:
                raise RecipeError(f"model(s) listed more than once: {dupes}")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value.removeprefix("torch.") not in DTYPES:
                raise RecipeError(f"{key}: {value!r} is not supported; valid: {', '.join(DTYPES)}")
        if method.requires_base and not self.base_model:
            raise RecipeError(f"merge_method {method.name} needs a base_model")
        sources = self.source_models()
        if not sources:
            raise RecipeError("the recipe has no model to merge besides the base")
        self._check_counts(method)
        valid_all = sorted(method.param_names)
        for where, params in self._parameter_sets():
            for key, value in params.items():
                if key not in method.param_names:
                    raise RecipeError(
                        f"{where}: unknown parameter {key!r} for {method.name}; valid: {', '.join(valid_all)}"
                    )
                if where.startswith("model ") and key in method.global_params:
                    raise RecipeError(
                        f"{where}: {key!r} is a global parameter of {method.name}; move it to the "
                        f"top-level 'parameters' (per-model parameters: {', '.join(method.tensor_params) or 'none'})"
                    )
                default = {**method.tensor_params, **method.global_params}.get(key)
                _check_value(where, key, value, boolean=isinstance(default, bool))
        slice_sources = [[m for m in ms if m != self.merge_base()] for ms in self._slice_models()]
        if not self.slices:
            slice_sources = [sources]
        for k, models in enumerate(slice_sources):
            shared = self.shared_parameter_levels(k)
            for model in models:
                for key, default in method.tensor_params.items():
                    if default is None and not any(
                        key in level for level in [self.model_parameters(model, k), *shared]
                    ):
                        raise RecipeError(
                            f"model {model}: missing required parameter {key!r} for {method.name} "
                            "(set it under the model's parameters or the top-level parameters)"
                        )
            for key, default in method.global_params.items():
                if default is None and not any(key in level for level in shared):
                    raise RecipeError(f"{method.name} needs parameter {key!r} in the top-level 'parameters'")
        if self.tokenizer_source not in (None, "base", "union") and self.tokenizer_source not in self.model_paths():
            raise RecipeError(
                f"tokenizer_source {self.tokenizer_source!r} is none of 'base', 'union' or a model of the recipe"
            )

    def _check_slices(self) -> None:
        assert self.slices is not None
        if not self.slices:
            raise RecipeError("'slices' is empty: list at least one slice with its sources")
        for k, sl in enumerate(self.slices):
            if not sl.sources:
                raise RecipeError(f"slice {k} has no sources")
            for src in sl.sources:
                start, end = src.layer_range
                if not 0 <= start < end:
                    raise RecipeError(
                        f"slice {k}: model {src.model} layer_range {[start, end]} must be [start, end) "
                        "with 0 <= start < end"
                    )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) != 1:
                raise RecipeError(
                    f"slice {k}: every source must have the same number of layers, got "
                    f"{[list(s.layer_range) for s in sl.sources]}"
                )
            if sl.residual_weight is not None:
                raise RecipeError("slice residual_weight is not supported yet")
            if sl.base_model is not None and sl.base_model != self.base_model:
                raise RecipeError("a slice base_model different from the recipe's base_model is not supported yet")

    def _slice_models(self) -> list[list[str]]:
        """The models of each slice (of the ``models:`` list when there are no slices)."""
        if self.slices:
            return [[s.model for s in sl.sources] for sl in self.slices]
        return [[e.model for e in self.models]]

    def _check_counts(self, method: Any) -> None:
        """Each slice gives the method a base (when it needs one) and an allowed number of models."""
        base = self.base_model if method.uses_base else None
        for k, models in enumerate(self._slice_models()):
            where = f"slice {k}: " if self.slices and len(self.slices) > 1 else ""
            if self.slices and method.requires_base and base not in models:
                raise RecipeError(
                    f"{where}{method.name} needs the base_model {base} among the slice's sources "
                    "(with the same number of layers)"
                )
            merged = [m for m in models if m != base]
            if not self.slices and base is None and self.base_model and self.base_model not in merged:
                merged.append(self.base_model)  # linear & co.: the base is one more input
            n = len(merged)
            lo, hi = method.min_sources, method.max_sources
            if n < lo or (hi is not None and n > hi):
                want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                total = n + (1 if base is not None else 0)
                what = "exactly two models (base_model and one other)" if method.name == "slerp" else (
                    f"{want} model(s)" + (" besides the base_model" if base is not None else ""))
                raise RecipeError(f"{where}{method.name} merges {what}; got {total}: {models}")

    def _parameter_sets(self) -> list[tuple[str, dict[str, ParamValue]]]:
        out: list[tuple[str, dict[str, ParamValue]]] = [("parameters", self.parameters)]
        for k, sl in enumerate(self.slices or []):
            out.append((f"slice {k} parameters", sl.parameters))
            out += [(f"model {s.model}", s.parameters) for s in sl.sources]
        else:
            out += [(f"model {e.model}", e.parameters) for e in self.models]
        return out


def _dedup(items: list[str]) -> list[str]:
    out: list[str] = []
    for m in items:
        if m not in out:
            out.append(m)
    return out


def _check_value(where: str, key: str, value: Any, *, boolean: bool) -> None:
    def numbers(v: Any) -> list[Any]:
        if isinstance(v, FilterRule):
            return numbers(v.value)
        if isinstance(v, list):
            return [x for item in v for x in numbers(item)]
        return [v]

    for x in numbers(value):
        if isinstance(x, bool):
            if not boolean:
                raise RecipeError(f"{where}: {key} must be a number, got {x}")
        elif not math.isfinite(x):
            raise RecipeError(f"{where}: {key} must be finite, got {x}")


def _plain(value: Any) -> Any:
    """Drop ``filter: null`` from dumped rules (mergekit reads a missing filter the same way)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not (k == "filter" and v is None)}
    return value


_FIELDS = {
    "MergeRecipe": MergeRecipe,
    "models": ModelEntry,
    "slices": OutputSlice,
    "sources": SliceSource,
}


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "(top level)"
        if "parameters" in loc[:-1] and err["type"] != "extra_forbidden":
            cut = loc.index("parameters") + 2
            lines.append(
                f"{'.'.join(loc[:cut])}: a parameter is a number, true/false, a list of numbers "
                "(gradient over layers) or a list of {filter, value} rules"
            )
        elif err["type"] == "extra_forbidden":
            parent = next((p for p in reversed(loc[:-1]) if p in _FIELDS), "MergeRecipe")
            model = FilterRule if "parameters" in loc[:-1] else _FIELDS[parent]
            lines.append(
                f"unknown key {loc[-1]!r} at {path}; valid keys: {', '.join(model.model_fields)}"
            )
        elif err["type"] == "missing":
            lines.append(f"missing key {path}")
        else:
            lines.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    seen: list[str] = []
    for line in lines:
        if line not in seen:
            seen.append(line)
    return f"{source}: " + "; ".join(seen[:6])


class _Dumper(yaml.SafeDumper):
    """YAML dumper writing lists of numbers in flow style, like mergekit."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flow = bool(data) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)

__all__ = ["DTYPES", "FilterRule", "MergeRecipe", "ModelEntry", "OutputSlice", "ParamValue", "ParameterError",
           "RecipeError", "SliceSource", "evaluate"]
