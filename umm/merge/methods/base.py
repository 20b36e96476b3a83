"""The :class:`MergeMethod` record every method module builds, and the checks they share.

A method is a pure function over the tensors of one parameter name: ``merge(base, tensors,
tensor_params, global_params)`` returns the merged tensor in float32 and never modifies its
inputs. Parameters follow mergekit: *tensor parameters* are per model (``weight``, ``density``,
``gamma``, ``epsilon``), *global parameters* are per tensor for the whole merge (``normalize``,
``rescale``, ``lambda``, ``int8_mask``, ``t``). ``None`` as a default means "required".
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from umm.errors import UmmError

logger = logging.getLogger(__name__)

ParamMap = Mapping[str, float | bool]
MergeFn = Callable[
    [torch.Tensor | None, Sequence[torch.Tensor], Sequence[Mapping[str, float]], Mapping[str, float | bool], "torch.Generator | None"],
    torch.Tensor,
]
#: Reads rows ``[start, end)`` of one model's tensor, as stored (any float dtype).
RowReader = Callable[[int, int], torch.Tensor]
#: ``prepare_fn(base, tensors, shape, tensor_params, global_params, block_rows)`` -> state.
PrepareFn = Callable[
    [RowReader | None, Sequence[RowReader], tuple[int, ...], Sequence[Mapping[str, float]],
     Mapping[str, float | bool], int],
    Any,
]
# Decides, from the resolved parameters, whether a call is elementwise (slice of result == result of slice).
ElementwiseFn = Callable[[Sequence[Mapping[str, float]], Mapping[str, float | bool]], bool]


class MergeParameterError(UmmError):
    """A merge method got a parameter it does not know, lacks a required one, or got a bad value."""


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its parameters (with mergekit's defaults) and its tensor function.

    ``tensors`` excludes the base model when ``requires_base`` is true (the base is passed as
    ``base``); for methods that do not use a base (``linear``) every source is in ``tensors``.
    ``elementwise`` is true when, for any parameters, merging a row slice of every input gives
    the same slice of the merged tensor (the executor may then merge in chunks);
    :meth:`is_elementwise` refines it for concrete parameters (e.g. TIES with density 1).

    Methods whose result depends on the whole tensor only through a little state (TIES and
    breadcrumbs: each model's magnitude cuts and rescale factor) have a ``prepare_fn``:
    :meth:`prepare` computes that state from the whole tensor, reading rows of one model at a
    time, and ``merge(..., state=, row_offset=)`` then merges any block of rows element-wise,
    exactly as the whole-tensor merge would have (:meth:`can_merge_rows` says when).
    """

    name: str
    requires_base: bool
    tensor_params: Mapping[str, float | None]
    global_params: Mapping[str, float | bool | None]
    random: bool
    elementwise: bool
    fn: MergeFn = field(repr=False, compare=False)
    elementwise_fn: ElementwiseFn | None = field(default=None, repr=False, compare=False)
    prepare_fn: PrepareFn | None = field(default=None, repr=False, compare=False)
    #: A NaN/Inf in any input always makes the result NaN/Inf at that position (the result is
    #: a sum of finite multiples of every input: w*Inf is +-Inf or NaN, and NaN/Inf survive
    #: sums), so the executor may screen the float32 result instead of each input.
    propagates_nonfinite: bool = False
    #: A base is used when the recipe names one, and the method also runs without (nuslerp):
    #: with a base it is passed as ``base`` and is not one of ``tensors``.
    optional_base: bool = False
    #: How many models a tensor merges (besides the base): at least / at most (None: any).
    min_sources: int = 1
    max_sources: int | None = None
    #: Why the evolutionary search cannot search this method ("" when it can).
    search_refusal: str = ""
    summary: str = ""
    reference_url: str = ""
    #: The method's formula and defaults; also its ``__doc__``, so ``help`` tools show it.
    doc: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.doc:
            object.__setattr__(self, "__doc__", self.doc)

    @property
    def uses_base(self) -> bool:
        """Whether a named base model is passed as ``base`` (required or optional)."""
        return self.requires_base or self.optional_base

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter name this method accepts (tensor parameters first)."""
        return tuple(self.tensor_params) + tuple(self.global_params)

    def fill_tensor_params(self, params: Mapping[str, float], model: str = "") -> dict[str, float]:
        """``params`` completed with this method's defaults; unknown or missing-required -> error."""
        unknown = sorted(set(params) - set(self.tensor_params))
        if unknown:
            raise MergeParameterError(
                f"{self.name}: unknown per-model parameter(s) {unknown}{_for(model)}; "
                f"valid: {sorted(self.tensor_params)}"
            )
        out: dict[str, float] = {}
        for key, default in self.tensor_params.items():
            value = params.get(key, default)
            if value is None:
                raise MergeParameterError(f"{self.name}: missing required parameter '{key}'{_for(model)}")
            out[key] = _number(self.name, key, value)
        return out

    def fill_global_params(self, params: Mapping[str, float | bool]) -> dict[str, float | bool]:
        """``params`` completed with this method's defaults; unknown or missing-required -> error."""
        unknown = sorted(set(params) - set(self.global_params))
        if unknown:
            raise MergeParameterError(
                f"{self.name}: unknown global parameter(s) {unknown}; valid: {sorted(self.global_params)}"
            )
        out: dict[str, float | bool] = {}
        for key, default in self.global_params.items():
            value = params.get(key, default)
            if value is None:
                raise MergeParameterError(f"{self.name}: missing required parameter '{key}'")
            out[key] = value if isinstance(value, bool) else _number(self.name, key, value)
        return out

    def merge(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        tensor_params: Sequence[Mapping[str, float]],
        global_params: Mapping[str, float | bool],
        *,
        generator: torch.Generator | None = None,
        state: Any = None,
        row_offset: int = 0,
    ) -> torch.Tensor:
        """Merge one tensor; returns a new float32 tensor on the inputs' device.

        With ``state`` (from :meth:`prepare` on the whole tensor) the inputs are the rows
        ``row_offset ..`` of the tensor, and the result is those rows of the whole merge.
        """
        if len(tensors) != len(tensor_params):
            raise MergeParameterError(
                f"{self.name}: got {len(tensors)} tensors but {len(tensor_params)} parameter sets"
            )
        if self.requires_base and base is None:
            raise MergeParameterError(f"{self.name} needs a base model (set base_model in the recipe)")
        shape = base.shape if base is not None else (tensors[0].shape if tensors else None)
        if shape is None:
            raise MergeParameterError(f"{self.name}: nothing to merge (no tensors)")
        for x in tensors:
            if x.shape != shape:
                raise MergeParameterError(f"{self.name}: shape mismatch {tuple(x.shape)} vs {tuple(shape)}")
            if not x.is_floating_point():
                raise MergeParameterError(f"{self.name}: cannot merge non-float tensor of dtype {x.dtype}")
        if self.random and generator is None and _needs_randomness(tensor_params):
            raise MergeParameterError(
                f"{self.name} is random: pass generator=tensor_generator(seed, tensor_name)"
            )
        tparams = [self.fill_tensor_params(p) for p in tensor_params]
        gparams = self.fill_global_params(global_params)
        if state is None:
            return self.fn(base, tensors, tparams, gparams, generator)
        return self.fn(base, tensors, tparams, gparams, generator, state=state, row_offset=row_offset)

    def can_merge_rows(
        self, tensor_params: Sequence[Mapping[str, float]], global_params: Mapping[str, float | bool]
    ) -> bool:
        """Whether blocks of rows can be merged exactly: element-wise, or after :meth:`prepare`."""
        if self.is_elementwise(tensor_params, global_params):
            return True
        return self.prepare_fn is not None and not self.random

    def needs_prepare(
        self, tensor_params: Sequence[Mapping[str, float]], global_params: Mapping[str, float | bool]
    ) -> bool:
        """Whether merging blocks of rows needs the whole-tensor state of :meth:`prepare`."""
        return self.can_merge_rows(tensor_params, global_params) and not self.is_elementwise(
            tensor_params, global_params
        )

    def prepare(
        self,
        base: RowReader | None,
        tensors: Sequence[RowReader],
        shape: Sequence[int],
        tensor_params: Sequence[Mapping[str, float]],
        global_params: Mapping[str, float | bool],
        *,
        block_rows: int,
    ) -> Any:
        """The whole-tensor state for merging blocks of rows of a tensor of ``shape`` (>= 1 dim).

        ``base`` / ``tensors`` read rows ``[start, end)`` of each input; they are read
        ``block_rows`` rows at a time, one model at a time (a ``rescale`` holds one model's whole
        delta). Returns ``None`` for element-wise parameters (no state needed).
        """
        if not self.can_merge_rows(tensor_params, global_params):
            raise MergeParameterError(f"{self.name} cannot be merged in blocks of rows with these parameters")
        if self.is_elementwise(tensor_params, global_params):
            return None
        if len(tensors) != len(tensor_params):
            raise MergeParameterError(
                f"{self.name}: got {len(tensors)} tensors but {len(tensor_params)} parameter sets"
            )
        if self.requires_base and base is None:
            raise MergeParameterError(f"{self.name} needs a base model (set base_model in the recipe)")
        if not shape:
            raise MergeParameterError(f"{self.name}: prepare needs a tensor of at least one dimension")
        tparams = [self.fill_tensor_params(p) for p in tensor_params]
        gparams = self.fill_global_params(global_params)
        assert self.prepare_fn is not None
        return self.prepare_fn(base, tensors, tuple(shape), tparams, gparams, max(1, int(block_rows)))

    def is_elementwise(
        self, tensor_params: Sequence[Mapping[str, float]], global_params: Mapping[str, float | bool]
    ) -> bool:
        """Whether merging row chunks with these parameters equals chunking the merged tensor."""
        if self.elementwise:
            return True
        if self.elementwise_fn is None:
            return False
        tparams = [self.fill_tensor_params(p) for p in tensor_params]
        return self.elementwise_fn(tparams, self.fill_global_params(global_params))


def _needs_randomness(tensor_params: Sequence[Mapping[str, float]]) -> bool:
    return any(float(p.get("density", 1.0)) < 1.0 for p in tensor_params)


def _for(model: str) -> str:
    return f" for model {model}" if model else ""


def _number(method: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeParameterError(f"{method}: parameter '{key}' must be a number, got {value!r}")
    return float(value)


def tensor_generator(seed: int, tensor_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, tensor_name)`` only.

    Random methods draw from it, so a merge is reproducible whatever the order in which tensors
    are processed or how many threads run. Streams differ between device types (CPU vs CUDA).
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32; may alias ``x`` (never write into the result)."""
    return x if x.dtype == torch.float32 else x.float()


def base_float32(method: str, base: torch.Tensor | None) -> torch.Tensor:
    """The base in float32 (may alias ``base``: never write into it); an error naming ``method``
    when the recipe gave no base."""
    if base is None:
        raise MergeParameterError(f"{method} needs a base model (set base_model in the recipe)")
    return as_float32(base)


def unchanged_base(b32: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The result of merging nothing into the base: a new float32 tensor equal to it."""
    return b32.clone() if b32 is base else b32


def fresh_float32(x: torch.Tensor) -> torch.Tensor:
    """A new float32 copy of ``x`` (one allocation, safe to modify in place)."""
    return x.to(dtype=torch.float32, copy=True)
