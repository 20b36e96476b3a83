"""A tiny seeded GPT-NeoX model with a SentencePiece-style tokenizer, for heterogeneous fusion.

:func:`umm.experts.random_models.make_random_llama` gives Llama models with a byte-level BPE
tokenizer; this module gives a model of another family whose tokenizer splits text differently
(BPE over ``▁``-marked words, like Llama-2/Mistral tokenizers), so tests, benches and demos can
fuse models that share neither weights nor vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from umm.experts.tokenizers import train_tokenizer
from umm.ui import transformers_bars_off

logger = logging.getLogger(__name__)

_CORPUS = (
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Answer: 3 + 4 = 7 "
    "#### 7\ndef add(a, b):\n    return a + b\nThe quick brown fox jumps over the lazy dog. "
    "Write a function that returns the sum of a list. Compute 12 * 3 = 36. Instruction Response "
)


def make_metaspace_tokenizer(vocab_size: int = 300, corpus: str = _CORPUS):  # -> PreTrainedTokenizerFast
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
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with transformers_bars_off():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("wrote random GPT-NeoX (seed %d) to %s", seed, out)
    return out
