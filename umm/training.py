"""The one optimisation loop of umm, shared by the expert suite and fusion.

:func:`umm.experts.train.train_causal_lm` (next-token CE on prompt/target pairs) and
:func:`umm.fusion.train.train_pivot` (gold CE + distillation on fused targets) differ only in their
batches and their loss. Both get from here:

- :func:`warmup_cosine`: the learning-rate schedule, linear warm-up then cosine decay to a floor;
- :func:`adamw`: AdamW with weight decay on matrices only (not biases, not norm weights);
- :func:`train_steps`: the optimizer steps, each over one or more micro-batches (gradient
  accumulation: each micro-batch's loss is divided by their number), gradient clipping, a check
  that the loss stayed finite, and one :class:`StepReport` per step.

Nothing here draws random numbers: the callers seed, order their batches and save checkpoints,
so the same inputs give bit-identical weights on the same machine. Nothing here prints either:
a caller passes the reports on (``on_step``) to whatever shows progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch

B = TypeVar("B")


@dataclass(frozen=True)
class StepReport:
    """One finished optimizer step: which run, how far, the loss (mean over the micro-batches),
    the learning rate it used and the loss's named terms (e.g. ``ce_gold``), also means."""

    run: str
    step: int  # steps done, counting this one (1 .. total)
    total: int
    loss: float
    lr: float
    terms: Mapping[str, float] = field(default_factory=dict)


#: receives each :class:`StepReport` (progress bars, logs); the library itself prints nothing
OnStep = Callable[[StepReport], None]


class Loss(NamedTuple):
    """A micro-batch's loss to minimise, and named terms to report (not differentiated)."""

    total: torch.Tensor
    terms: Mapping[str, torch.Tensor] = {}


def warmup_cosine(step: int, total: int, warmup: int, peak: float = 1.0, floor: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based) of ``total``.

    ``peak * (step + 1) / warmup`` during the ``warmup`` first steps, then
    ``floor + (peak - floor) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (total - warmup)``
    clipped to 1. With the defaults it is a factor to multiply a base learning rate by.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; weight decay applies to matrices (``ndim >= 2``) whose
    name does not contain ``norm``, and to nothing else."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        eps=eps,
    )


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Iterable[Sequence[B]],
    loss_of: Callable[[B], Loss],
    *,
    lr_at: Callable[[int], float],
    total: int,
    start: int = 0,
    grad_clip: float | None = None,
    run: str = "train",
) -> Iterator[StepReport]:
    """Run one optimizer step per item of ``plan`` (its micro-batches), yielding a report after each.

    Step ``start + i`` (0-based) uses the learning rate ``lr_at(start + i)``; its gradient is the
    mean of the micro-batches' gradients, clipped to norm ``grad_clip`` unless that is ``None``.
    Raises ``FloatingPointError`` when a step's loss is not finite. Stop early by not asking for
    the next report (e.g. to checkpoint and return).
    """
    for step, micro in enumerate(plan, start):
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss, terms = _accumulate(micro, loss_of)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{run}: loss became {loss} at step {step}; lower the learning rate")
        yield StepReport(run, step + 1, total, loss, lr, terms)


def _accumulate(micro: Sequence[B], loss_of: Callable[[B], Loss]) -> tuple[float, dict[str, float]]:
    """Backpropagate each micro-batch's loss divided by their number; the mean loss and terms."""
    n = len(micro)
    loss = 0.0
    terms: dict[str, float] = {}
    for batch in micro:
        out = loss_of(batch)
        (out.total / n).backward()
        loss += float(out.total.detach()) / n
        for name, value in out.terms.items():
            terms[name] = terms.get(name, 0.0) + float(value.detach()) / n
    return loss, terms
