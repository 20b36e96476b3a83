"""Batched greedy (or seeded sampled) decoding with the KV cache, left padding and per-row stop sequences.

Two interchangeable back ends produce the same greedy text: ``"loop"``, our own decode loop
(one forward per new token over the whole batch, rows that finished are masked out of the stop
check, the loop ends when every row has stopped) and ``"hf"`` (``model.generate`` with
``stop_strings``). ``bench/bench_eval.py`` measures both; :data:`DEFAULT_BACKEND` is the faster
one on the tiny models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

logger = logging.getLogger(__name__)

Backend = Literal["loop", "hf"]
DEFAULT_BACKEND: Backend = "loop"


def render_prompt(tokenizer: Any, prompt: str, chat: bool) -> tuple[str, bool]:
    """The text to tokenize and whether it already holds the special tokens (chat template)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, True
    return prompt, False


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def _context_limit(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def generation_budget(model: Any, max_new_tokens: int, temperature: float) -> tuple[int, int | None]:
    """``(max_new_tokens, context limit)``: the arguments checked, and the new tokens cut to half
    the context when they would fill it (with a warning). ``model``: anything with a ``config``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    limit = _context_limit(model)
    if limit is not None and max_new_tokens >= limit:
        max_new_tokens = max(1, limit // 2)
        logger.warning("max_new_tokens reduced to %d to fit the model's context of %d", max_new_tokens, limit)
    return max_new_tokens, limit


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool, max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids per prompt; prompts longer than ``max_prompt_tokens`` keep their last tokens."""
    out = []
    truncated = 0
    for p in prompts:
        text, has_special = render_prompt(tokenizer, p, chat)
        ids = tokenizer(text, add_special_tokens=not has_special)["input_ids"]
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[len(ids) - max_prompt_tokens :]
            truncated += 1
        out.append(list(ids))
    if truncated:
        logger.warning("%d prompt(s) longer than the model's context were cut from the left", truncated)
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    chat: bool = False,
    device: Any = None,
    backend: Backend = DEFAULT_BACKEND,
    on_batch: Callable[[int], None] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, cut at the first stop sequence).

    Greedy when ``temperature == 0`` (the default), else sampled at that temperature from a
    generator seeded with ``seed``; deterministic either way for the same arguments. Prompts are
    sorted by length into batches (less padding) and the outputs are returned in input order.
    ``on_batch(n)`` is called after each batch of ``n`` prompts.
    """
    import torch

    if not prompts:
        return []
    max_new_tokens, limit = generation_budget(model, max_new_tokens, temperature)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts, chat, None if limit is None else limit - max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    eos_ids = _eos_ids(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(encoded)
    sampler = None
    if temperature > 0:
        sampler = torch.Generator(device=dev).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), max(1, batch_size)):
                idx = order[start : start + max(1, batch_size)]
                batch = [encoded[i] for i in idx]
                if backend == "hf":
                    texts = _generate_hf(model, tokenizer, batch, max_new_tokens, stop, pad_id, eos_ids, dev,
                                         temperature, seed + start)
                else:
                    texts = _generate_loop(model, tokenizer, batch, max_new_tokens, stop, pad_id, eos_ids, dev,
                                           temperature, sampler)
                for i, t in zip(idx, texts):
                    outputs[i] = cut_at_stop(t, stop)
                if on_batch is not None:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    return outputs


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def _left_pad(batch: list[list[int]], pad_id: int, dev: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, b in enumerate(batch):
        if b:
            ids[r, width - len(b) :] = torch.tensor(b, dtype=torch.long)
            mask[r, width - len(b) :] = 1
    return ids.to(dev), mask.to(dev)


def _forward_arguments(model) -> tuple[str, bool]:
    """The name under which ``model.forward`` takes and returns its KV cache, and whether it takes
    ``logits_to_keep``.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name still works, with a
    deprecation warning on every run); earlier versions know only ``past_key_values``.
    ``logits_to_keep=1`` (transformers >= 4.50) projects only the last position onto the
    vocabulary, the only one the loop reads.
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _stopped_rows(tokenizer, generated: list[list[int]], rows: list[int], stop: Sequence[str], window: int) -> list[int]:
    """The ``rows`` whose last ``window`` generated tokens decode to text holding a stop sequence.

    A stop sequence of k characters spans at most k tokens (every token decodes to >= 1 byte),
    so the window holds any stop that the newest token completed; a stop seen late would only
    cost steps (outputs are cut at the first stop).
    """
    tails = ((r, tokenizer.decode(generated[r][-window:], skip_special_tokens=True)) for r in rows)
    return [r for r, tail in tails if any(s and s in tail for s in stop)]


def _generate_loop(model, tokenizer, batch, max_new_tokens, stop, pad_id, eos_ids, dev, temperature=0.0,
                   sampler=None) -> list[str]:
    """Greedy (or sampled) decoding of one left-padded batch with the KV cache.

    The attention mask of every step is a view of one mask allocated up front (prompt mask,
    then ones for the new tokens); the stop check decodes only the rows still running.
    """
    import torch

    ids, mask = _left_pad(batch, pad_id, dev)
    n, width = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([mask, torch.ones((n, max_new_tokens), dtype=mask.dtype, device=dev)], dim=-1)
    generated: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    window = max((len(s.encode("utf-8")) for s in stop if s), default=0) + 2
    eos_t = torch.tensor(sorted(eos_ids), device=dev) if eos_ids else None
    past = None
    cache_arg, keep_arg = _forward_arguments(model)
    extra = {"logits_to_keep": 1} if keep_arg else {}
    step_ids, step_pos = ids, positions
    for step in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=full_mask[:, : width + step], position_ids=step_pos,
                    use_cache=True, **{cache_arg: past}, **extra)
        past = getattr(out, cache_arg)
        logits = out.logits[:, -1, :]
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=sampler).squeeze(-1)
        else:
            nxt = logits.argmax(dim=-1)
        toks = nxt.tolist()
        eos_flags = torch.isin(nxt, eos_t).tolist() if eos_t is not None else [False] * n
        grown = []
        for r in range(n):
            if done[r]:
                continue
            if eos_flags[r]:
                done[r] = True
                continue
            generated[r].append(toks[r])
            grown.append(r)
        if window > 2 and grown:
            for r in _stopped_rows(tokenizer, generated, grown, stop, window):
                done[r] = True
        if all(done):
            break
        step_ids = nxt.unsqueeze(-1)
        step_pos = step_pos[:, -1:] + 1
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


def _generate_hf(model, tokenizer, batch, max_new_tokens, stop, pad_id, eos_ids, dev, temperature=0.0,
                 seed=0) -> list[str]:
    import torch

    ids, mask = _left_pad(batch, pad_id, dev)
    kwargs: dict[str, Any] = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) if eos_ids else None,
    )
    stops = [s for s in stop if s]
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=tokenizer)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        # seed the sampling without disturbing the caller's global RNG state
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            seqs = model.generate(**kwargs)
    else:
        seqs = model.generate(**kwargs)
    texts = []
    for row in seqs[:, ids.shape[1] :].tolist():
        cut = [t for t in row]
        for j, t in enumerate(row):
            if t in eos_ids:
                cut = row[:j]
                break
        texts.append(tokenizer.decode(cut, skip_special_tokens=True))
    return texts
