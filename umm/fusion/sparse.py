"""Sparse next-token distributions: ``K`` (id, log-probability) entries per position.

A :class:`SparseDist` holds ``ids [T, K]`` (int64), ``logprobs [T, K]`` (float32) and
``mask [T, K]`` (bool: which entries are real). Masked entries carry id 0 and log-probability
``-inf`` and are ignored everywhere. Nothing here ever builds a ``[T, vocab]`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SENTINEL = torch.iinfo(torch.int64).max


@dataclass
class SparseDist:
    ids: torch.Tensor  # [T, K] int64
    logprobs: torch.Tensor  # [T, K] float32, -inf where masked
    mask: torch.Tensor  # [T, K] bool

    def __post_init__(self) -> None:
        if not (self.ids.shape == self.logprobs.shape == self.mask.shape) or self.ids.dim() != 2:
            raise ValueError(
                f"SparseDist tensors must share one [T, K] shape, got {tuple(self.ids.shape)}, "
                f"{tuple(self.logprobs.shape)}, {tuple(self.mask.shape)}"
            )

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def probs(self) -> torch.Tensor:
        return torch.where(self.mask, self.logprobs.exp(), torch.zeros_like(self.logprobs))

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """``[T, vocab]`` probabilities: for tests and the dense baseline of the bench only."""
        out = torch.zeros(self.length, vocab_size, dtype=torch.float32)
        return out.scatter_add_(1, torch.where(self.mask, self.ids, 0), self.probs())

    @classmethod
    def from_probs(cls, ids: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> SparseDist:
        mask = mask & (probs > 0)
        lp = torch.where(mask, probs.clamp_min(1e-38).log(), torch.full_like(probs, -torch.inf))
        return cls(torch.where(mask, ids, 0), lp.float(), mask)

    @classmethod
    def one_hot(cls, ids: torch.Tensor) -> SparseDist:
        """Probability 1 on ``ids [T]`` (the gold-token fallback)."""
        t = ids.shape[0]
        return cls(ids.long().view(t, 1), torch.zeros(t, 1), torch.ones(t, 1, dtype=torch.bool))


def merge_duplicates(ids: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> SparseDist:
    """Sum the probabilities of entries of a row that share an id; rows keep their width."""
    key = torch.where(mask, ids.long(), torch.full_like(ids, _SENTINEL, dtype=torch.int64))
    key_s, order = key.sort(dim=1, stable=True)
    p_s = torch.where(mask, probs, torch.zeros_like(probs)).float().gather(1, order)
    new_run = torch.ones_like(key_s, dtype=torch.bool)
    new_run[:, 1:] = key_s[:, 1:] != key_s[:, :-1]
    run = new_run.long().cumsum(1) - 1
    out_p = torch.zeros_like(p_s).scatter_add_(1, run, p_s)
    out_ids = torch.full_like(key_s, _SENTINEL).scatter_(1, run, key_s)
    out_mask = (out_ids != _SENTINEL) & (out_p > 0)
    return SparseDist.from_probs(torch.where(out_mask, out_ids, 0), out_p, out_mask)


def renormalise(d: SparseDist, temperature: float = 1.0) -> SparseDist:
    """Softmax over the kept entries of each row (of ``logprobs / temperature``).

    Equal to FuseLLM's softmax over the kept top-k logits, since log-probabilities and logits
    differ by a per-row constant. Rows with no entry stay empty.
    """
    lp = torch.where(d.mask, d.logprobs / temperature, torch.full_like(d.logprobs, -torch.inf))
    lse = torch.logsumexp(lp, dim=1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return SparseDist(d.ids, torch.where(d.mask, lp - lse, lp), d.mask)

