"""A small, deterministic causal-LM training loop for the tiny experts.

Prompt/target pairs are tokenized separately (``tokenizer(prompt) + tokenizer(target) + eos``),
exactly as the evaluator will see a prompt and generate after it; the loss is computed on the
target tokens (and the final eos) only. The optimisation is umm's one loop (:mod:`umm.training`:
AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping); with seeded
data order and initialisation and a fixed number of CPU threads, the same inputs and config give
bit-identical weights on the same machine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from umm.training import Loss, OnStep, adamw, train_steps, warmup_cosine

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


def _loss(model, batch: dict[str, torch.Tensor]) -> Loss:
    """Next-token cross-entropy over the labelled tokens (the target and its eos)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    return Loss(torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE
    ))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (if given) within the block, restored after."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_causal_lm(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    desc: str = "train",
    on_step: OnStep | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(prompt, target)`` pairs for ``cfg.steps`` steps.

    The loop is :func:`umm.training.train_steps` (one batch per step, learning rate
    :func:`umm.training.warmup_cosine` from ``cfg.lr`` down to ``cfg.min_lr_ratio * cfg.lr``);
    ``on_step`` receives each step's report (run name ``desc``). ``threads`` fixes torch's
    intra-op threads for the run (restored afterwards); keep it the same to reproduce weights bit
    for bit. The model is left in eval mode on ``device``.
    """
    examples = encode_pairs(tokenizer, pairs, cfg.max_length)
    order = batch_order(len(examples), cfg.steps, cfg.batch_size, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def loss_of(batch: list[Example]) -> Loss:
        return _loss(model, {k: v.to(device) for k, v in collate(batch, pad_id).items()})

    def lr_at(step: int) -> float:
        return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, cfg.lr * cfg.min_lr_ratio)

    losses: list[float] = []
    with _torch_threads(threads):
        torch.manual_seed(cfg.seed)
        model.to(device)
        model.train()
        opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.98))
        start = time.perf_counter()
        plan = ([[examples[i] for i in idx]] for idx in order)
        for report in train_steps(model, opt, plan, loss_of, lr_at=lr_at, total=cfg.steps,
                                  grad_clip=cfg.grad_clip or None, run=desc):
            losses.append(report.loss)
            if on_step is not None:
                on_step(report)
        seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    result = TrainResult(steps=cfg.steps, final_loss=sum(tail) / len(tail), seconds=seconds, losses=losses)
    logger.info("%s: %d steps, final loss %.4f, %.1fs", desc, cfg.steps, result.final_loss, seconds)
    return result
