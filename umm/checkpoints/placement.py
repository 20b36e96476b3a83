"""Where each checkpoint tensor lives in a loaded model, whose parameters may be named and laid out
differently from the files.

transformers converts some checkpoints when it loads them: it renames tensors (GPT-NeoX's
``embed_out`` becomes ``lm_head``) and fuses others (Mixtral's and Qwen2-MoE's per-expert
``experts.E.w1/w3`` become rows of one stacked ``experts.gate_up_proj`` parameter);
``save_pretrained`` reverts that conversion, so the files keep their own names. Whoever writes a
checkpoint tensor into a live model (the in-memory merge of ``umm evolve``) needs the entries of
the live parameter that the tensor became.

:func:`checkpoint_slots` answers it with the model's own reverse conversion (what
``save_pretrained`` runs, with the conversions the model was loaded with):

1. every live parameter, as a ``meta`` tensor, goes through the reverse conversion; a checkpoint
   name that receives a parameter's tensor object itself is that whole parameter (a rename, or
   no conversion at all: the common case, which costs nothing);
2. the parameters a converter consumed are traced: each is filled with its entries' global flat
   indices and converted again, so the index tensor a checkpoint name receives lists, in its
   layout, the live entries it becomes. Indices that run contiguously through one parameter are a
   view of that parameter; any other order (a transpose) is kept as an index list for a scatter.

Every entry of every live parameter must be reached exactly once, or :class:`PlacementError`.
The trace holds one integer per traced entry (the fused parameters only), transiently. Without
``revert_weight_conversion`` (transformers before 5) names are the parameters' own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from umm.checkpoints.errors import CheckpointError
from umm.checkpoints.loading import first_line


class PlacementError(CheckpointError):
    """The model's conversion does not map its parameters one to one onto checkpoint tensors."""


@dataclass(frozen=True, eq=False)
class Slot:
    """The entries of live parameter ``param_name`` that checkpoint tensor ``name`` (``shape``) becomes:
    the flat entries ``start ..`` of the parameter in order (:attr:`view`), or, with ``start`` None,
    the flat positions ``index`` in the checkpoint tensor's row-major order. Both are resolved
    against ``param.data`` at each use, so they stay right if the parameter's storage is replaced."""

    name: str
    shape: tuple[int, ...]
    param_name: str
    param: torch.nn.Parameter
    start: int | None
    index: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def view(self) -> torch.Tensor | None:
        """The parameter's entries as a tensor of the checkpoint's shape (``None`` for a scatter slot)."""
        if self.start is None:
            return None
        data = self.param.data
        if self.start == 0 and self.numel == data.numel():
            return data.view(self.shape) if data.is_contiguous() else data
        return data.view(-1)[self.start : self.start + self.numel].view(self.shape)

    def write(self, value: torch.Tensor) -> None:
        """Copy ``value`` (the checkpoint tensor's shape, any dtype) into the live parameter."""
        with torch.no_grad():
            view = self.view
            if view is not None:
                same = (value.data_ptr(), value.shape, value.stride()) == (view.data_ptr(), view.shape, view.stride())
                if not same:  # a result computed in place needs no copy
                    view.copy_(value)
            else:
                assert self.index is not None
                flat = self.param.data.view(-1)
                flat.index_copy_(0, self.index, value.reshape(-1).to(flat.dtype))

    def read(self) -> torch.Tensor:
        """The live value of this checkpoint tensor (a view when possible)."""
        view = self.view
        if view is not None:
            return view
        assert self.index is not None
        return self.param.data.view(-1)[self.index].view(self.shape)


def _whole(name: str, param_name: str, param: torch.nn.Parameter) -> Slot:
    return Slot(name, tuple(param.shape), param_name, param, 0)


def _revert():  # -> Callable[[model, dict], dict] | None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: no load-time conversions
        return None
    return revert_weight_conversion


def _reverted(revert, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``revert(model, state)``; whatever it raises is a :class:`PlacementError` naming the model."""
    try:
        return dict(revert(model, dict(state)))
    except Exception as e:
        raise PlacementError(
            f"transformers cannot map {type(model).__name__}'s parameters back to checkpoint tensors: {first_line(e)}"
        ) from None


def checkpoint_slots(model: torch.nn.Module) -> dict[str, Slot]:
    """Checkpoint tensor name -> :class:`Slot` for every parameter of ``model`` (see the module docstring).

    Tied parameters appear once (``named_parameters`` yields them once), under the name the
    reverse conversion gives them.
    """
    params = dict(model.named_parameters())
    revert = _revert()
    if revert is None:
        return {n: _whole(n, n, p) for n, p in params.items()}
    meta = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in params.items()}
    by_id = {id(t): n for n, t in meta.items()}
    slots: dict[str, Slot] = {}
    for name, t in _reverted(revert, model, meta).items():
        source = by_id.get(id(t))
        if source is not None:
            slots[name] = _whole(name, source, params[source])
    passed = {s.param_name for s in slots.values()}
    traced_names = [n for n in params if n not in passed]
    if traced_names:
        slots.update(_traced(model, revert, {n: params[n] for n in traced_names}, set(slots)))
    _check_one_to_one(slots, params)
    return slots


def _traced(model: torch.nn.Module, revert, params: dict[str, torch.nn.Parameter], taken: set[str]) -> dict[str, Slot]:
    """Slots of the checkpoint tensors converted from ``params``: each parameter filled with its
    entries' global flat indices, reverted, and each result located (see the module docstring)."""
    starts: list[int] = []
    total = 0
    for p in params.values():
        starts.append(total)
        total += p.numel()
    for n, p in params.items():
        if not p.data.is_contiguous():
            raise PlacementError(f"live parameter {n!r} is not contiguous; cannot place checkpoint tensors in it")
    itype = torch.int32 if total < 2**31 else torch.int64
    filled = {n: torch.arange(s, s + p.numel(), dtype=itype).view(p.shape)
              for (n, p), s in zip(params.items(), starts)}
    names = list(params)
    bounds = torch.tensor([*starts, total], dtype=torch.int64)
    out: dict[str, Slot] = {}
    for ck_name, idx in _reverted(revert, model, filled).items():
        if ck_name in taken:
            raise PlacementError(f"checkpoint tensor {ck_name!r} is made from more than one live parameter")
        flat = idx.reshape(-1).to(torch.int64)
        if flat.numel() == 0:
            raise PlacementError(f"checkpoint tensor {ck_name!r} is empty after the conversion")
        k = int(torch.searchsorted(bounds, flat[0], right=True)) - 1
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if int(flat.min()) < lo or int(flat.max()) >= hi:
            raise PlacementError(f"checkpoint tensor {ck_name!r} mixes entries of several live parameters")
        pname, param = names[k], params[names[k]]
        local = flat - lo
        first = int(local[0])
        in_order = bool((local == torch.arange(first, first + local.numel())).all())
        if in_order:
            out[ck_name] = Slot(ck_name, tuple(idx.shape), pname, param, first)
        else:
            out[ck_name] = Slot(ck_name, tuple(idx.shape), pname, param, None, local.to(param.device))
    return out


def _check_one_to_one(slots: dict[str, Slot], params: dict[str, torch.nn.Parameter]) -> None:
    """Every entry of every parameter is the target of exactly one checkpoint entry: the counts agree
    and, where a parameter is not one whole view, every entry is reached (so none twice)."""
    parts: dict[str, list[Slot]] = {n: [] for n in params}
    for s in slots.values():
        parts[s.param_name].append(s)
    for n, p in params.items():
        held = sum(s.numel for s in parts[n])
        if held != p.numel():
            raise PlacementError(f"live parameter {n!r} has {p.numel()} entries but its checkpoint tensors hold {held}")
        if len(parts[n]) == 1 and parts[n][0].index is None:
            continue
        seen = torch.zeros(p.numel(), dtype=torch.bool)
        for s in parts[n]:
            seen[s.index.cpu() if s.index is not None else slice(s.start, s.start + s.numel)] = True
        if not bool(seen.all()):
            raise PlacementError(f"checkpoint entries land twice on some entries of {n!r} and never on others")

