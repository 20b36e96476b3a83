"""Token alignment: normalisation, DTW sequence alignment, vocabulary mapping, projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umm.fusion.align import (
    EDIT,
    EXACT,
    SPECIAL,
    STATS,
    align_sequences,
    aligned_source_rows,
    build_vocab_map,
    dtw,
    min_edit_distance_map,
    normalise_token,
    normalised_vocab,
    project_to_pivot,
    token_scheme,
)


def _wordlevel(vocab: list[str], scheme: str):
    """A hand-made tokenizer with exactly ``vocab`` (ids in order) and the given space scheme."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    if scheme == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_normalise_space_markers_and_bytes() -> None:
    assert normalise_token("Ġhello", "bytelevel") == " hello"
    assert normalise_token("▁hello", "metaspace") == " hello"
    assert normalise_token("Ċ", "bytelevel") == "\n"
    assert normalise_token("<0x0A>", "metaspace") == "\n"
    # "é" is two UTF-8 bytes: byte-level spells them "Ã©", SentencePiece writes the character.
    assert normalise_token("Ã©", "bytelevel") == normalise_token("é", "metaspace")


def test_schemes_and_special_roles() -> None:
    bl = _wordlevel(["<unk>", "</s>", "Ġhello", "hello"], "bytelevel")
    ms = _wordlevel(["<unk>", "</s>", "▁hello", "hello"], "metaspace")
    assert token_scheme(bl) == "bytelevel" and token_scheme(ms) == "metaspace"
    vb, vm = normalised_vocab(bl), normalised_vocab(ms)
    assert vb[2] == vm[2] == " hello"
    assert vb[1] == vm[1] == "\x00eos"


def test_alignment_different_boundaries_and_markers() -> None:
    # " unbelievable results" split two ways; markers already normalised to spaces.
    src = [" un", "believ", "able", " results"]
    tgt = [" unbeliev", "able", " res", "ults"]
    al = align_sequences(src, tgt)
    pairs = al.pairs.tolist()
    assert pairs[0] == [0, 0] and pairs[-1] == [3, 3]
    assert [1, 1] not in pairs or [2, 1] in pairs  # "able" meets "able"
    assert [2, 1] in pairs
    assert np.all(np.diff(al.pairs, axis=0) >= 0)  # monotone path
    assert al.tgt_to_src()[1] == [2]
    rows = aligned_source_rows(src, tgt, al)
    assert rows[1] == 2  # 1-1 exact: takes the source distribution
    assert rows[3] == 3  # " results" ends with "ults": FuseLLM's n-1 rule
    assert rows[0] == -1  # " unbeliev" aligned to two source tokens: gold fallback


def test_alignment_identical_sequences_is_diagonal() -> None:
    toks = [" The", " cat", " sat", "."]
    al = align_sequences(toks, toks)
    assert al.pairs.tolist() == [[i, i] for i in range(4)] and al.cost == 0
    assert aligned_source_rows(toks, toks, al).tolist() == [0, 1, 2, 3]


def test_dtw_matches_naive_recurrence() -> None:
    rng = np.random.default_rng(0)
    cost = rng.integers(0, 5, size=(7, 9)).astype(float)
    d = np.full((8, 10), np.inf)
    d[0, 0] = 0
    for i in range(1, 8):
        for j in range(1, 10):
            d[i, j] = cost[i - 1, j - 1] + min(d[i - 1, j - 1], d[i - 1, j], d[i, j - 1])
    pairs, total = dtw(cost)
    assert total == d[7, 9]
    assert sum(cost[i, j] for i, j in pairs) == total  # the path really costs the optimum


def test_min_edit_distance_map_ties_and_cutoffs() -> None:
    cands = ["cat", "cart", "dog", "category", "x"]
    ids = np.arange(len(cands)) + 10
    best, dist = min_edit_distance_map(["cats", "dgo", "categories", "zzzzzzzzzzzzz"], cands, ids)
    assert best[0] == 10 and dist[0] == 1  # "cat" and "cart" tie at 1: the first wins
    assert best[1] == 12 and dist[1] == 2
    assert best[2] == 13 and dist[2] == 3
    assert best[3] >= 10  # beyond every cut-off: still mapped, by the exhaustive pass
    for q, b, d in zip(["cats", "dgo", "categories", "zzzzzzzzzzzzz"], best, dist):
        from rapidfuzz.distance import Levenshtein

        assert d == min(Levenshtein.distance(q, c) for c in cands) == Levenshtein.distance(q, cands[b - 10])


def test_vocab_map_exact_edit_special_and_stats() -> None:
    src = _wordlevel(["<unk>", "</s>", "Ġhello", "Ġworld", "Ġworlds", "ing"], "bytelevel")
    piv = _wordlevel(["</s>", "<unk>", "▁world", "▁hello", "ings", "▁word"], "metaspace")
    vm = build_vocab_map(src, piv)
    assert vm.src_to_pivot.tolist()[:6] == [1, 0, 3, 2, 2, 4]
    assert vm.how.tolist()[:6] == [SPECIAL, SPECIAL, EXACT, EXACT, EDIT, EDIT]
    assert vm.apply(torch.tensor([[2, 3], [99, 1]])).tolist() == [[3, 2], [vm.fallback_id, 0]]
    # statistics: " worlds" was aligned with "▁word" in the corpus, so it maps there instead.
    al = align_sequences([" worlds"], [" word"])
    vs = build_vocab_map(src, piv, method="stats", alignments=[([4], [5], al)])
    assert vs.src_to_pivot[4] == 5 and vs.how[4] == STATS
    assert vs.src_to_pivot[5] == 4 and vs.how[5] == EDIT  # unseen in the corpus: edit distance


def test_vocab_map_roundtrip(tmp_path) -> None:
    src = _wordlevel(["<unk>", "</s>", "Ġhello"], "bytelevel")
    piv = _wordlevel(["</s>", "<unk>", "▁hello"], "metaspace")
    vm = build_vocab_map(src, piv)
    vm.save(tmp_path / "map.safetensors")
    from umm.fusion.align import VocabMap

    back = VocabMap.load(tmp_path / "map.safetensors")
    assert back.src_to_pivot.tolist() == vm.src_to_pivot.tolist() and back.stats == vm.stats


def test_project_to_pivot_maps_renormalises_and_falls_back() -> None:
    src = _wordlevel(["<unk>", "</s>", "Ġthe", "Ġca", "t", "Ġcat", "Ġdog"], "bytelevel")
    piv = _wordlevel(["<unk>", "</s>", "▁the", "▁cat", "▁dog"], "metaspace")
    vm = build_vocab_map(src, piv)
    sv, pv = normalised_vocab(src), normalised_vocab(piv)
    # source says " the", " ca", "t"; pivot says " the", " cat".
    src_gold = [2, 3, 4]
    piv_gold = [2, 3]
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.6, 0.2], [0.9, 0.05]]))
    ids = torch.tensor([[2, 6], [5, 6], [4, 1]])
    d, n_fb = project_to_pivot(ids, lp, src_gold, piv_gold, sv, pv, vm)
    dense = d.to_dense(len(piv))
    # position 0: " the"->" the" (0.5), " dog"->" dog" (0.25), renormalised over the two.
    assert torch.allclose(dense[0, [2, 4]], torch.tensor([2 / 3, 1 / 3]))
    # position 1: " cat" is aligned to " ca" + "t" (1-n): one-hot on the gold token.
    assert n_fb == 1 and dense[1, 3] == 1 and dense[1].sum() == 1
    assert torch.allclose(dense.sum(1), torch.ones(2))


@pytest.mark.parametrize("n", [1, 50])
def test_alignment_long_random_sequences_are_monotone(n: int) -> None:
    rng = np.random.default_rng(n)
    a = ["".join(rng.choice(list("abc "), size=rng.integers(1, 4))) for _ in range(n)]
    b = a[::2] + a[1::2]
    al = align_sequences(a, b)
    assert al.pairs[0].tolist() == [0, 0] and al.pairs[-1].tolist() == [n - 1, n - 1]
    assert set(al.pairs[:, 0].tolist()) == set(range(n)) and set(al.pairs[:, 1].tolist()) == set(range(n))
