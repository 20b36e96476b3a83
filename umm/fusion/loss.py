"""The pivot's training loss from sparse targets: never a dense vocabulary-sized target.

``loss = lam * CE(gold) + (1 - lam) * CE(fused target, student)`` averaged over response tokens
(FuseLLM's objective, ``lam = 0.9``). With ``lse = logsumexp(logits)``, the student's
log-probability of any id is ``logits[id] - lse``, so both terms only gather the ``K`` target
logits and the gold logit per position: memory is one ``[B, L]`` log-normaliser on top of the
student's own logits instead of a second ``[B, L, V]`` target tensor.
"""

from __future__ import annotations

import torch


def _up(x: torch.Tensor) -> torch.Tensor:
    """Half precisions to float32; float32/float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
    lse = torch.logsumexp(_up(logits), dim=-1)  # [B, L]
    gold_logit = _up(logits.gather(-1, gold_ids.clamp_min(0).unsqueeze(-1)).squeeze(-1))
    ce_gold = lse - gold_logit
    tgt_logit = _up(logits.gather(-1, torch.where(target_mask, target_ids, 0).long()))
    p = torch.where(target_mask, target_logprobs.to(lse.dtype).exp(), torch.zeros_like(tgt_logit))
    ce_kd = -(p * (tgt_logit - lse.unsqueeze(-1))).sum(-1)
    m = response_mask.to(ce_gold.dtype)
    n = m.sum().clamp_min(1.0)
    return (ce_gold * m).sum() / n, (ce_kd * m).sum() / n


def sparse_distill_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    gold_ids: torch.Tensor,
    response_mask: torch.Tensor,
    lam: float = 0.9,
) -> torch.Tensor:
    """``lam * CE(gold) + (1 - lam) * CE(target, student)``; see :func:`sparse_distill_terms`."""
    ce_gold, ce_kd = sparse_distill_terms(
        logits, target_ids, target_logprobs, target_mask, gold_ids, response_mask
    )
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
