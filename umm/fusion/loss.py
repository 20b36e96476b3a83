"""The pivot's training loss from sparse targets: never a dense vocabulary-sized target.

``loss = lam * CE(gold) + (1 - lam) * CE(fused target, student)`` averaged over response tokens
(FuseLLM's objective, ``lam = 0.9``). With ``lse = logsumexp(logits)``, the student's
log-probability of any id is ``logits[id] - lse``, so both terms only gather the ``K`` target
logits and the gold logit per position, and the backward pass writes the gradient as one dense
tensor (a custom autograd function): no ``[B, L, V]`` target, no ``[B, L, V]`` log-softmax.
"""

from __future__ import annotations

from typing import Any

import torch


def _up(x: torch.Tensor) -> torch.Tensor:
    """Half precisions to float32; float32/float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _SparseDistillCE(torch.autograd.Function):
    """Both CE terms from ``lse`` and gathered logits; backward builds one dense gradient.

    d CE(gold)/dx = softmax(x) - onehot(gold) and d CE(p, q)/dx = (sum p) softmax(x) - scatter(p),
    so the gradient is ``coef * softmax(x)`` with the gold and target entries subtracted: one
    ``[B, L, V]`` tensor written in place, instead of the several autograd would keep.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target_ids: torch.Tensor, target_p: torch.Tensor,
                gold_ids: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _up(logits)
        lse = torch.logsumexp(x, dim=-1)
        ce_gold = lse - x.gather(-1, gold_ids.unsqueeze(-1)).squeeze(-1)
        ce_kd = (target_p * (lse.unsqueeze(-1) - x.gather(-1, target_ids))).sum(-1)
        ctx.save_for_backward(logits, lse, target_ids, target_p, gold_ids, weight)
        return (ce_gold * weight).sum(), (ce_kd * weight).sum()

    @staticmethod
    def backward(ctx: Any, g_gold: torch.Tensor, g_kd: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, lse, target_ids, target_p, gold_ids, weight = ctx.saved_tensors
        coef = (g_gold + g_kd * target_p.sum(-1)) * weight
        grad = _up(logits).sub(lse.unsqueeze(-1)).exp_().mul_(coef.unsqueeze(-1))
        grad.scatter_add_(-1, gold_ids.unsqueeze(-1), (-g_gold * weight).unsqueeze(-1))
        grad.scatter_add_(-1, target_ids, -(g_kd * weight).unsqueeze(-1) * target_p)
        return grad.to(logits.dtype), None, None, None, None


def sparse_distill_terms(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    gold_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE on gold, CE of the sparse target against the student), each a mean over response tokens.

    Shapes: ``logits [B, L, V]`` where row ``t`` predicts ``gold_ids[:, t]`` (the caller shifts);
    ``target_* [B, L, K]`` (``target_logprobs`` are log-probabilities, ignored where
    ``target_mask`` is false); ``response_mask [B, L]`` selects the positions that count.
    """
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask = response_mask.to(dt)
    weight = mask / mask.sum().clamp_min(1.0)
    p = torch.where(target_mask, target_logprobs.to(dt).exp(), torch.zeros((), dtype=dt, device=logits.device))
    ids = torch.where(target_mask, target_ids, torch.zeros_like(target_ids)).long()
    return _SparseDistillCE.apply(logits, ids, p, gold_ids.clamp_min(0).long(), weight)


def sparse_distill_loss(*tensors: torch.Tensor, lam: float = 0.9) -> torch.Tensor:
    """``lam * CE(gold) + (1 - lam) * CE(target, student)`` of ``tensors``, the six arguments of
    :func:`sparse_distill_terms` in its order (``logits, target_ids, target_logprobs, target_mask,
    gold_ids, response_mask``)."""
    ce_gold, ce_kd = sparse_distill_terms(*tensors)
    return lam * ce_gold + (1.0 - lam) * ce_kd


def dense_distill_loss(
    logits: torch.Tensor, target_probs: torch.Tensor, gold_ids: torch.Tensor,
    response_mask: torch.Tensor, lam: float = 0.9,
) -> torch.Tensor:
    """The same objective from a dense ``[B, L, V]`` target (FuseLLM's way): reference and bench only."""
    logq = torch.log_softmax(_up(logits), dim=-1)
    ce_gold = -logq.gather(-1, gold_ids.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce_kd = -(target_probs.to(logq.dtype) * logq).sum(-1)
    m = response_mask.to(logq.dtype)
    n = m.sum().clamp_min(1.0)
    return lam * (ce_gold * m).sum() / n + (1.0 - lam) * (ce_kd * m).sum() / n
