"""Seeded random checkpoints, saved with ``save_pretrained``: Llama and GPT-NeoX.

Tests, benches and the merge example need real Hugging Face model folders without a model hub.
:func:`make_random_llama` gives Llama models with a byte-level BPE tokenizer. An *expert* is made
as ``base + noise`` so that task vectors (expert - base) are small and realistic for
task-arithmetic style merges. :func:`make_random_neox` gives a model of another family whose
tokenizer splits text differently (BPE over ``▁``-marked words, like Llama-2/Mistral tokenizers),
so tests, benches and demos can fuse models that share neither weights nor vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from umm.experts.tokenizers import train_tokenizer
from umm.ui import transformers_bars_off

logger = logging.getLogger(__name__)

_LLAMA_CORPUS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > "
    "def add(a, b):\n    return a + b\nQuestion: Tom has 3 apples and buys 4 more. "
    "How many apples does he have? Answer: 3 + 4 = 7 #### 7\n"
)


_NEOX_CORPUS = (
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Answer: 3 + 4 = 7 "
    "#### 7\ndef add(a, b):\n    return a + b\nThe quick brown fox jumps over the lazy dog. "
    "Write a function that returns the sum of a list. Compute 12 * 3 = 36. Instruction Response "
)


def make_tokenizer(vocab_size: int = 384, corpus: str = _LLAMA_CORPUS):  # -> PreTrainedTokenizerFast
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
        model = _randomized(LlamaForCausalLM, config, seed, gen)
    return _save(model.to(dtype), tokenizer, out, f"random llama (seed {seed})", max_shard_size=max_shard_size)


def make_metaspace_tokenizer(vocab_size: int = 300, corpus: str = _NEOX_CORPUS):  # -> PreTrainedTokenizerFast
    """A small ``▁``-marked BPE tokenizer of ``corpus`` (every word marked; ``</s>`` pads, on the right)."""
    return train_tokenizer("metaspace", [corpus] * 4, vocab_size, split_digits=False, mark_first_word=True,
                           specials=("<unk>", "<s>", "</s>"), pad_token="</s>", padding_side=None)


def make_random_neox(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                     num_heads: int = 4, vocab_size: int = 300) -> Path:
    """Write a seeded GPT-NeoX checkpoint (config, safetensors, tokenizer) to ``out_dir``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = make_metaspace_tokenizer(vocab_size)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=hidden_size * 4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = _randomized(GPTNeoXForCausalLM, config, seed, torch.Generator().manual_seed(seed))
    return _save(model, tokenizer, Path(out_dir), f"random GPT-NeoX (seed {seed})")


def _randomized(model_class, config, seed: int, gen: torch.Generator):  # -> PreTrainedModel
    """``model_class(config)`` with every parameter drawn from ``0.02 * N(0, 1)`` by ``gen``."""
    torch.manual_seed(seed)  # the buffers the constructor draws
    model = model_class(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _save(model, tokenizer, out: Path, what: str, **save_kwargs) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    with transformers_bars_off():
        model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    logger.info("wrote %s to %s", what, out)
    return out
