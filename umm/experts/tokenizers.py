"""The two tokenizer families of the tiny expert suite, trained with the ``tokenizers`` library.

- ``bytelevel``: byte-level BPE (``Ġ`` space marker), as Llama-3/GPT-2 use: every byte is encodable.
- ``metaspace``: BPE over characters with a ``▁`` metaspace, as SentencePiece-BPE models
  (Llama-2, Mistral) use; characters outside the training alphabet become ``<unk>``.

Both split digits one per token (so arithmetic is learnable by a tiny model) and carry
``<pad>``, ``<s>``, ``</s>`` (and ``<unk>`` for ``metaspace``). They add no special tokens when
encoding: training and evaluation both see exactly ``tokenizer(text)``. The two vocabularies
differ on purpose: fusing a model of one family into the other needs token alignment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

logger = logging.getLogger(__name__)

TokenizerKind = Literal["bytelevel", "metaspace"]
SPECIALS = ("<pad>", "<s>", "</s>")

# Characters a text may contain besides the corpus's own: keeps unseen text encodable.
_ALPHABET = [chr(c) for c in range(33, 127)] + ["\n", "▁"]


def train_tokenizer(kind: TokenizerKind, corpus: Iterable[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Train a tokenizer of ``kind`` on ``corpus`` and wrap it for ``transformers``.

    Deterministic for a given corpus (the ``tokenizers`` trainers are). ``save_pretrained`` on the
    result writes ``tokenizer.json`` + ``tokenizer_config.json``, loadable with ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus)
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        specials = list(SPECIALS)
        extra: dict[str, str] = {}
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
        alphabet = _ALPHABET
        specials = [*SPECIALS, "<unk>"]
        extra = {"unk_token": "<unk>"}
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bytelevel' or 'metaspace'")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only generation pads on the left
        **extra,
    )
    logger.info("trained %s tokenizer: %d tokens on %d texts", kind, len(wrapped), len(texts))
    return wrapped
