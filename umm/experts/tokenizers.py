"""umm's one builder of tiny tokenizers, trained with the ``tokenizers`` library: the two families
of the tiny expert suite, and (with a few options) the tokenizers of the random test models.

- ``bytelevel``: byte-level BPE (``Ġ`` space marker), as Llama-3/GPT-2 use: every byte is encodable.
- ``metaspace``: BPE over characters with a ``▁`` metaspace, as SentencePiece-BPE models
  (Llama-2, Mistral) use; characters outside the training alphabet become ``<unk>``.

In the suite, both split digits one per token (so arithmetic is learnable by a tiny model) and carry
``<pad>``, ``<s>``, ``</s>`` (and ``<unk>`` for ``metaspace``). They add no special tokens when
encoding: training and evaluation both see exactly ``tokenizer(text)``. The two vocabularies
differ on purpose: fusing a model of one family into the other needs token alignment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

logger = logging.getLogger(__name__)

TokenizerKind = Literal["bytelevel", "metaspace"]
SPECIALS = ("<pad>", "<s>", "</s>")

# Characters a text may contain besides the corpus's own: keeps unseen text encodable.
_ALPHABET = [chr(c) for c in range(33, 127)] + ["\n", "▁"]


def train_tokenizer(
    kind: TokenizerKind,
    corpus: Iterable[str],
    vocab_size: int,
    *,
    split_digits: bool = True,
    mark_first_word: bool = False,
    specials: Sequence[str] | None = None,
    pad_token: str = "<pad>",
    padding_side: Literal["left"] | None = "left",
):  # -> PreTrainedTokenizerFast
    """Train a BPE tokenizer of ``kind`` on ``corpus`` and wrap it for ``transformers``.

    The one tiny-tokenizer builder of umm: the expert suite uses the defaults (see the module
    docstring); the random test models (:mod:`umm.experts.random_models`)
    keep digits whole, and ``metaspace`` ones mark the first word too (``mark_first_word``:
    SentencePiece's ``prepend_scheme="always"``). ``specials`` default to ``<pad> <s> </s>`` (plus
    ``<unk>`` for ``metaspace``); ``<s>``/``</s>`` are bos/eos. ``pad_token`` pads on the left, as
    decoder-only generation wants, or with ``padding_side=None`` on transformers' default side (right,
    and not written to ``tokenizer_config.json``).

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
        words: Any = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        default_specials = list(SPECIALS)
        extra: dict[str, str] = {}
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        scheme = "always" if mark_first_word else "never"
        words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = _ALPHABET
        default_specials = [*SPECIALS, "<unk>"]
        extra = {"unk_token": "<unk>"}
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bytelevel' or 'metaspace'")
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), words]) if split_digits else words
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials) if specials is not None else default_specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token=pad_token,
        **({"padding_side": padding_side} if padding_side else {}),
        **extra,
    )
    logger.info("trained %s tokenizer: %d tokens on %d texts", kind, len(wrapped), len(texts))
    return wrapped
