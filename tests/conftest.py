"""Shared fixtures: tiny real Llama checkpoints saved with ``save_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UMM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

_TORCH_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Each test starts with torch's default CPU threads: CLI commands run in-process set the thread
    count for their process (umm.cli.common.set_threads), and the exact-equality checks of later
    tests (whole-tensor reductions) depend on it."""
    import torch

    default = _TORCH_DEFAULT_THREADS
    if torch.get_num_threads() != default:
        torch.set_num_threads(default)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models are as fast on one, and on a shared machine more threads only wait."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and two experts (base + noise): 2 layers, hidden 64, fp32. Read-only: copy to modify."""
    from umm.experts.random_models import make_random_llama

    root = tmp_path_factory.mktemp("tiny_models")
    base = make_random_llama(root / "base", seed=0)
    return {
        "base": base,
        "math": make_random_llama(root / "math", seed=1, base=base),
        "code": make_random_llama(root / "code", seed=2, base=base),
    }


class RecordedBar:
    """A bar that :class:`ProgressRecorder` handed out: what it was started with and advanced by."""

    def __init__(self, total, desc, unit):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0.0
        self.info: dict[str, str] = {}
        self.closed = False

    def advance(self, n=1, **info):
        assert not self.closed, "advanced after close"
        self.done += n
        self.info.update(info)

    def close(self):
        assert not self.closed, "closed twice"
        self.closed = True


class ProgressRecorder:
    """A :class:`umm.progress.ProgressSink` that keeps every bar started on it, in order."""

    def __init__(self):
        self.bars: list[RecordedBar] = []

    def start(self, total, desc, unit):
        self.bars.append(RecordedBar(total, desc, unit))
        return self.bars[-1]


@pytest.fixture
def recorder() -> ProgressRecorder:
    return ProgressRecorder()
