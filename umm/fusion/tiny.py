"""A tiny seeded GPT-NeoX model with a SentencePiece-style tokenizer, for heterogeneous fusion.

:func:`umm.experts.random_models.make_random_llama` gives Llama models with a byte-level BPE
tokenizer; this module gives a model of another family whose tokenizer splits text differently
(BPE over ``▁``-marked words, like Llama-2/Mistral tokenizers), so tests, benches and demos can
fuse models that share neither weights nor vocabulary.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

import torch

from umm.ui import transformers_bars_off

logger = logging.getLogger(__name__)

_CORPUS = (
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Answer: 3 + 4 = 7 "
    "#### 7\ndef add(a, b):\n    return a + b\nThe quick brown fox jumps over the lazy dog. "
    "Write a function that returns the sum of a list. Compute 12 * 3 = 36. Instruction Response "
)


def make_metaspace_tokenizer(vocab_size: int = 300, corpus: str = _CORPUS):  # -> PreTrainedTokenizerFast
    """A small ``▁``-marked BPE tokenizer (``tokenizers`` library) covering printable ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


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
