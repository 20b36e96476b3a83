"""MinCE / AvgCE on hand-computed values, sparse helpers, and the sparse loss vs the dense formula."""

from __future__ import annotations

import math

import pytest
import torch

from umm.errors import UmmError
from umm.fusion.fuse import FusionFunction, fuse
from umm.fusion.loss import dense_distill_loss, sparse_distill_loss
from umm.fusion.pivot import choose_pivot, hardest_domain
from umm.fusion.sparse import SparseDist, merge_duplicates, renormalise


def _dist(rows: list[dict[int, float]], width: int = 3) -> SparseDist:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    p = torch.zeros(len(rows), width)
    m = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        for c, (i, v) in enumerate(row.items()):
            ids[r, c], p[r, c], m[r, c] = i, v, True
    return SparseDist.from_probs(ids, p, m)


A = _dist([{1: 0.7, 2: 0.3}, {3: 1.0}])
B = _dist([{2: 0.5, 4: 0.5}, {3: 0.2, 5: 0.8}])


def test_min_ce_picks_lowest_ce_first_on_ties() -> None:
    out = fuse([A, B], [2.0, 1.0], "minCE").to_dense(6)
    assert torch.allclose(out, B.to_dense(6))
    out = FusionFunction("mince")([A, B], [1.0, 1.0]).to_dense(6)  # tie: the first (the pivot)
    assert torch.allclose(out, A.to_dense(6))
    out = fuse([A, B], [float("nan"), 5.0], "minCE").to_dense(6)  # NaN: no output, never chosen
    assert torch.allclose(out, B.to_dense(6))


def test_avg_ce_weights_are_softmax_of_rewards() -> None:
    ce = [1.0, 2.0]
    r = [math.exp(-1.0), math.exp(-2.0)]
    w0 = math.exp(r[0]) / (math.exp(r[0]) + math.exp(r[1]))  # FuseLLM: softmax(exp(-CE))
    w = FusionFunction("avgCE").weights(ce)
    assert w.tolist() == pytest.approx([w0, 1 - w0])
    out = fuse([A, B], ce, "avgCE").to_dense(6)
    expected = torch.tensor([
        [0, 0.7 * w0, 0.3 * w0 + 0.5 * (1 - w0), 0, 0.5 * (1 - w0), 0],
        [0, 0, 0, w0 + 0.2 * (1 - w0), 0, 0.8 * (1 - w0)],
    ])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_fusion_rejects_bad_input() -> None:
    with pytest.raises(UmmError, match="unknown fusion"):
        FusionFunction("median")
    with pytest.raises(UmmError, match="different lengths"):
        fuse([A, _dist([{1: 1.0}])], [1.0, 2.0])


def test_merge_duplicates_and_renormalise() -> None:
    ids = torch.tensor([[5, 2, 5, 0]])
    p = torch.tensor([[0.2, 0.3, 0.1, 0.4]])
    m = torch.tensor([[True, True, True, False]])
    d = merge_duplicates(ids, p, m)
    assert d.width == 4 and int(d.mask.sum()) == 2
    assert torch.allclose(d.to_dense(6)[0], torch.tensor([0, 0, 0.3, 0, 0, 0.3]))
    r = renormalise(d)
    assert torch.allclose(r.to_dense(6)[0], torch.tensor([0, 0, 0.5, 0, 0, 0.5]))
    t = renormalise(_dist([{1: 0.8, 2: 0.2}]), temperature=2.0).to_dense(3)[0]
    assert t[1] / t[2] == pytest.approx(2.0)  # (0.8/0.2) ** (1/2)


def test_sparse_loss_equals_dense_formula_and_gradient() -> None:
    torch.manual_seed(0)
    b, length, v, k = 2, 5, 11, 4
    logits = torch.randn(b, length, v, dtype=torch.float64)
    gold = torch.randint(0, v, (b, length))
    resp = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(b * length)]).view(b, length, k)
    mask = torch.rand(b, length, k) < 0.8
    mask[..., 0] = True
    raw = torch.rand(b, length, k, dtype=torch.float64) * mask
    probs = raw / raw.sum(-1, keepdim=True)
    lp = torch.where(mask, probs.log(), torch.full_like(probs, -math.inf))
    dense = torch.zeros(b, length, v, dtype=torch.float64).scatter_add_(-1, ids, probs)

    x1 = logits.clone().requires_grad_(True)
    sparse = sparse_distill_loss(x1.double(), ids, lp, mask, gold, resp, lam=0.3)
    x2 = logits.clone().requires_grad_(True)
    logq = torch.log_softmax(x2, -1)  # the naive formula, written out independently
    per_tok = -0.3 * logq.gather(-1, gold.unsqueeze(-1)).squeeze(-1) - 0.7 * (dense * logq).sum(-1)
    naive = (per_tok * resp).sum() / resp.sum()
    assert torch.allclose(sparse, naive, atol=1e-12)
    assert torch.allclose(dense_distill_loss(logits, dense, gold, resp, lam=0.3), naive, atol=1e-12)
    sparse.backward()
    naive.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)
    assert x1.grad[0, 0].abs().sum() == 0  # positions outside the response get no gradient


def test_pivot_choice() -> None:
    scores = {"math-a": {"math": 0.4, "code": 0.7}, "code-b": {"math": 0.2, "code": 0.9},
              "math-c": {"math": 0.4, "code": 0.1}}
    assert hardest_domain(scores) == "math"
    assert choose_pivot(scores) == "math-a"  # tie on math with math-c: the name sorting first
    assert choose_pivot(scores, domain="code") == "code-b"
    assert choose_pivot(scores, override="math-c") == "math-c"
    with pytest.raises(UmmError, match="not one of the candidates"):
        choose_pivot(scores, override="nope")


def test_sparse_loss_with_bf16_logits_keeps_dtype_and_value() -> None:
    torch.manual_seed(1)
    b, length, v, k = 2, 4, 50, 3
    x = torch.randn(b, length, v).bfloat16()
    ids = torch.randint(0, v, (b, length, k))
    p = torch.softmax(torch.randn(b, length, k), -1)
    mask = torch.ones(b, length, k, dtype=torch.bool)
    gold = torch.randint(0, v, (b, length))
    resp = torch.ones(b, length, dtype=torch.bool)
    xb = x.clone().requires_grad_(True)
    loss = sparse_distill_loss(xb, ids, p.log(), mask, gold, resp)
    loss.backward()
    xf = x.float().requires_grad_(True)
    ref = dense_distill_loss(xf, torch.zeros(b, length, v).scatter_add_(-1, ids, p), gold, resp)
    ref.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(xb.grad.float(), xf.grad, atol=1e-3)


class _Tok:
    """Decodes ids to fixed strings; id 0 is a special token (EOS) that decodes to nothing."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


def test_ce_per_character_is_fair_across_tokenizer_granularity() -> None:
    from umm.fusion.targets import sequence_ce
    from umm.fusion.teacher import TeacherSequence

    def seq(gold: list[int], ce: float) -> TeacherSequence:
        n = len(gold)
        return TeacherSequence(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), torch.tensor(gold), ce)

    # the same 8-character response: 2 coarse tokens + EOS vs 8 one-character tokens + EOS
    coarse, fine = _Tok({0: "</s>", 1: "abcd", 2: "efgh"}), _Tok({0: "</s>", **{i + 1: c for i, c in enumerate("abcdefgh")}})
    a, b = seq([1, 2, 0], 2.0), seq(list(range(1, 9)) + [0], 1.0)  # total NLL 6.0 vs 9.0
    assert sequence_ce(a, coarse, "token") == 2.0 and sequence_ce(b, fine, "token") == 1.0  # per token: b wins
    assert sequence_ce(a, coarse, "char") == pytest.approx(6.0 / 8)
    assert sequence_ce(b, fine, "char") == pytest.approx(9.0 / 8)  # per character: a wins, as its total NLL says
    assert math.isnan(sequence_ce(seq([1], float("nan")), coarse, "char"))
