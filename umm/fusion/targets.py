"""Fused training targets for the pivot: every teacher projected onto the pivot's tokens, fused.

For each example kept by the pivot's tokenisation: each teacher's sparse output is projected onto
the pivot's response tokens (:func:`umm.fusion.align.project_to_pivot`, or used as is when the
teacher tokenises the response exactly as the pivot does with the same vocabulary), then the
teachers are fused per sequence with MinCE or AvgCE on their cross-entropies.

The cross-entropies compared across teachers are, by default (``ce_unit="char"``), each model's
total negative log-likelihood of the gold response divided by the number of characters its own
tokens decode to: a per-token mean would favour the tokenizer that cuts the same text into more,
easier pieces. ``ce_unit="token"`` compares the stored per-token means (FuseLLM's way).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from umm.errors import UmmError
from umm.fusion.align import (
    VocabMap,
    align_sequences,
    build_vocab_map,
    normalised_vocab,
    project_to_pivot,
    token_string,
)
from umm.fusion.data import InstructionData, TokenizedData
from umm.fusion.fuse import FusionFunction
from umm.fusion.sparse import SparseDist, merge_duplicates, renormalise
from umm.fusion.teacher import TeacherOutputs, TeacherSequence
from umm.progress import ProgressSink, track

CE_UNITS = ("char", "token")

logger = logging.getLogger(__name__)


@dataclass
class FusedItem:
    """A pivot training sequence: ids (prompt + response) and the target of each response token."""

    input_ids: list[int]
    n_prompt: int
    target: SparseDist  # [len(input_ids) - n_prompt, K] over pivot ids


@dataclass
class FusedTargets:
    items: list[FusedItem | None]
    teacher_names: list[str]
    fallback_fraction: list[float] = field(default_factory=list)  # per teacher
    chosen: list[int] = field(default_factory=list)  # MinCE: sequences won by each teacher
    vocab_maps: list[dict[str, int] | None] = field(default_factory=list)

    @property
    def n_sequences(self) -> int:
        return sum(1 for it in self.items if it is not None)


def build_fused_targets(
    pivot_tokenizer: Any,
    pivot_data: TokenizedData,
    data: InstructionData,
    teachers: Sequence[TeacherOutputs],
    source_tokenizers: Sequence[Any],
    *,
    fusion: str = "minCE",
    vocab_map_method: str = "exact+edit",
    temperature: float = 1.0,
    ce_unit: str = "char",
    on_progress: ProgressSink | None = None,
) -> FusedTargets:
    """Project every teacher onto ``pivot_data`` and fuse them (see module docstring);
    ``on_progress`` receives a bar of the sequences."""
    if ce_unit not in CE_UNITS:
        raise UmmError(f"unknown ce_unit {ce_unit!r}; use one of {', '.join(CE_UNITS)}")
    if len(teachers) != len(source_tokenizers):
        raise UmmError("one tokenizer per teacher is needed")
    for t in teachers:
        if t.data_sha256 != data.sha256 or len(t) != len(data):
            raise UmmError(f"teacher outputs in {t.dir} were computed on other data; rerun its teacher pass")
    fn = FusionFunction(fusion)
    piv_vocab = normalised_vocab(pivot_tokenizer)
    vocabs = [normalised_vocab(tok) for tok in source_tokenizers]
    same_vocab = [v == piv_vocab for v in vocabs]
    maps: list[VocabMap | None] = []
    for tok, t, same in zip(source_tokenizers, teachers, same_vocab):
        if same:
            maps.append(None)
            continue
        alignments = _corpus_alignments(t, pivot_data, vocabs[len(maps)], piv_vocab) if vocab_map_method == "stats" else None
        maps.append(build_vocab_map(tok, pivot_tokenizer, method=vocab_map_method, alignments=alignments))

    items: list[FusedItem | None] = []
    fallbacks = [0] * len(teachers)
    positions = [0] * len(teachers)
    chosen = [0] * len(teachers)
    for i, piv in enumerate(track(pivot_data.items, on_progress, "aligning teachers", "seq")):
        if piv is None:
            items.append(None)
            continue
        piv_gold = piv.response_ids
        dists: list[SparseDist] = []
        ces: list[float] = []
        for j, t in enumerate(teachers):
            seq = t[i]
            if seq is None:
                continue
            src_gold = seq.gold_ids.tolist()
            if same_vocab[j] and src_gold == piv_gold:
                d = renormalise(SparseDist(seq.topk_ids, seq.topk_logprobs, torch.isfinite(seq.topk_logprobs)),
                                temperature)
                d = merge_duplicates(d.ids, d.probs(), d.mask)
                n_fb = 0
            else:
                vm = maps[j] or build_vocab_map(source_tokenizers[j], pivot_tokenizer)
                maps[j] = vm
                d, n_fb = project_to_pivot(seq.topk_ids, seq.topk_logprobs, src_gold, piv_gold,
                                           vocabs[j], piv_vocab, vm, temperature=temperature)
            fallbacks[j] += n_fb
            positions[j] += len(piv_gold)
            dists.append(d)
            ces.append(sequence_ce(seq, source_tokenizers[j], ce_unit))
        if not dists:
            items.append(None)
            continue
        if fn.method == "minCE":
            present = [j for j, t in enumerate(teachers) if t[i] is not None]
            chosen[present[int(torch.argmax(fn.weights(ces)))]] += 1
        items.append(FusedItem(list(piv.input_ids), piv.n_prompt, fn(dists, ces)))
    frac = [f / p if p else 0.0 for f, p in zip(fallbacks, positions)]
    for t, f in zip(teachers, frac):
        logger.info("teacher %s: %.1f%% of pivot positions fell back to the gold token", t.model_path.name, 100 * f)
    return FusedTargets(items, [t.model_path.name for t in teachers], frac, chosen,
                        [m.stats if m is not None else None for m in maps])


def sequence_ce(seq: TeacherSequence, tokenizer: Any, unit: str = "char") -> float:
    """The cross-entropy of one teacher on one gold response, in nats per ``unit``.

    ``token``: the stored mean over the model's own response tokens. ``char``: that mean times the
    number of tokens (the total NLL), divided by the length of the text those tokens decode to
    (special tokens such as EOS count in the NLL but add no characters). NaN stays NaN.
    """
    if unit == "token" or math.isnan(seq.ce):
        return seq.ce
    n_chars = len(tokenizer.decode(seq.gold_ids.tolist(), skip_special_tokens=True))
    return seq.ce * len(seq.gold_ids) / max(1, n_chars)


def _corpus_alignments(
    teacher: TeacherOutputs, pivot_data: TokenizedData, src_vocab: Sequence[str | None],
    piv_vocab: Sequence[str | None],
) -> list[tuple[list[int], list[int], Any]]:
    out = []
    for i, piv in enumerate(pivot_data.items):
        seq = teacher[i]
        if piv is None or seq is None:
            continue
        s_ids = seq.gold_ids.tolist()
        p_ids = piv.response_ids
        s_tok = [token_string(src_vocab, x) for x in s_ids]
        p_tok = [token_string(piv_vocab, x) for x in p_ids]
        out.append((s_ids, p_ids, align_sequences(s_tok, p_tok)))
    return out
