"""Seeded random Llama-shaped checkpoints, saved with ``save_pretrained``.

Tests, benches and the merge example need real Hugging Face model folders without a model hub.
An *expert* is made as ``base + noise`` so that task vectors (expert - base) are small and
realistic for task-arithmetic style merges.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from umm.experts.tokenizers import train_tokenizer
from umm.ui import transformers_bars_off

logger = logging.getLogger(__name__)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > "
    "def add(a, b):\n    return a + b\nQuestion: Tom has 3 apples and buys 4 more. "
    "How many apples does he have? Answer: 3 + 4 = 7 #### 7\n"
)


def make_tokenizer(vocab_size: int = 384, corpus: str = _CORPUS):  # -> PreTrainedTokenizerFast
    """A small byte-level BPE tokenizer of ``corpus`` (digits merge like letters), right-padded."""
    return train_tokenizer("bytelevel", [corpus] * 4, vocab_size, split_digits=False, padding_side=None)


def make_random_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 384,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "2GB",
    base: str | Path | None = None,
    noise: float = 0.02,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a seeded Llama checkpoint (config, safetensors, tokenizer) to ``out_dir``.

    With ``base`` given, the new model is that model's weights plus ``noise * N(0, 1)`` noise
    (an "expert" of that base) and its config and tokenizer are the base's; the other shape
    arguments are then ignored.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
    else:
        tokenizer = make_tokenizer(min(vocab_size, 384))
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or hidden_size * 2 + hidden_size // 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=256,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    with transformers_bars_off():
        model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    logger.info("wrote random llama (seed %d) to %s", seed, out)
    return out
