"""A small, deterministic causal-LM training loop for the tiny experts.

Prompt/target pairs are tokenized separately (``tokenizer(prompt) + tokenizer(target) + eos``),
exactly as the evaluator will see a prompt and generate after it; the loss is computed on the
target tokens (and the final eos) only. AdamW, linear warmup then cosine decay to
``min_lr_ratio * lr``, gradient clipping, seeded data order and initialisation, a fixed number of
CPU threads: the same inputs and config give bit-identical weights on the same machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from umm.ui import progress

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    max_length: int = 128


@dataclass
class TrainResult:
    """What a run did: steps, loss per step, mean loss of the last tenth of the steps, wall time."""

    steps: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Example:
    """One tokenized training example: ids and labels (``IGNORE`` on prompt tokens)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int = 128) -> list[Example]:
    """Tokenize ``(prompt, target)`` pairs; the loss covers ``target + eos`` only.

    A pair with an empty prompt is a pretraining document: it keeps its first ``max_length``
    tokens. Raises ``ValueError`` naming the pair when any other does not fit in ``max_length``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; the model could not learn to stop")
    out = []
    for i, (prompt, target) in enumerate(pairs):
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target)["input_ids"] + [eos]
        if not prompt:
            t = t[:max_length]
        elif len(p) + len(t) > max_length:
            raise ValueError(f"example {i} has {len(p) + len(t)} tokens > max_length {max_length}: {prompt!r}")
        out.append(Example(tuple(p + t), tuple([IGNORE] * len(p) + t)))
    return out


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine down to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress_ = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress_))


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: seeded epoch-wise permutations, concatenated."""
    if n_examples <= 0:
        raise ValueError("no training examples")
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    flat: list[int] = []
    while len(flat) < need:
        flat.extend(torch.randperm(n_examples, generator=gen).tolist())
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE
    )


def train_causal_lm(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``(prompt, target)`` pairs for ``cfg.steps`` steps.

    ``threads`` fixes torch's intra-op threads for the run (restored afterwards); keep it the
    same to reproduce weights bit for bit. The model is left in eval mode on ``device``.
    """
    examples = encode_pairs(tokenizer, pairs, cfg.max_length)
    order = batch_order(len(examples), cfg.steps, cfg.batch_size, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        model.to(device)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
        )
        losses: list[float] = []
        start = time.perf_counter()
        bar = progress(total=cfg.steps, desc=desc, unit="step", leave=False)
        for step, idx in enumerate(order):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            loss = _loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower the learning rate")
            losses.append(value)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    result = TrainResult(steps=cfg.steps, final_loss=sum(tail) / len(tail), seconds=seconds, losses=losses)
    logger.info("%s: %d steps, final loss %.4f, %.1fs", desc, cfg.steps, result.final_loss, seconds)
    return result
