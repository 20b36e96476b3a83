"""umm's one training loop (umm.training): the schedule, AdamW's groups, accumulation, reports."""

from __future__ import annotations

import itertools

import pytest
import torch

from umm.training import Loss, StepReport, adamw, train_steps, warmup_cosine


def test_warmup_then_cosine_to_the_floor() -> None:
    lr = [warmup_cosine(s, 100, 10, 1e-3, 1e-4) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(1e-3) and lr[99] == pytest.approx(1e-4, rel=0.05)
    assert all(a >= b for a, b in itertools.pairwise(lr[10:]))
    assert [round(warmup_cosine(s, 10, 2), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]  # a factor by default
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)
    assert warmup_cosine(0, 10, 0) == 1.0  # no warm-up


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 1)
        self.norm = torch.nn.LayerNorm(1)


def test_adamw_decays_matrices_only() -> None:
    net = _Net()
    decay, no_decay = adamw(net, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(1, 3)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight and bias


def _regression(micro_batches: int) -> tuple[torch.nn.Module, list[StepReport]]:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    rows = list(range(8))
    size = 8 // micro_batches
    plan = [[rows[i : i + size] for i in range(0, 8, size)]] * 3

    def loss_of(idx: list[int]) -> Loss:
        err = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
        return Loss(err, {"mse": err})

    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    reports = list(train_steps(net, opt, plan, loss_of, lr_at=lambda s: 0.1 / (s + 1), total=3, run="r"))
    return net, reports


def test_accumulated_micro_batches_step_like_one_batch() -> None:
    whole, one = _regression(1)
    split, four = _regression(4)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b)
    assert [r.step for r in four] == [1, 2, 3] and [r.lr for r in four] == [0.1, 0.05, 0.1 / 3]
    assert [r.loss for r in four] == pytest.approx([r.loss for r in one])
    assert all(r.terms["mse"] == pytest.approx(r.loss) and r.run == "r" and r.total == 3 for r in four)


def test_a_loss_that_is_not_finite_stops_the_run() -> None:
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = train_steps(net, opt, [[0]], lambda _: Loss(net.weight.sum() * float("nan")), lr_at=lambda s: 0.1,
                        total=1, run="bad")
    with pytest.raises(FloatingPointError, match="bad: loss became nan at step 0"):
        next(steps)
