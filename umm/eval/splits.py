"""Deterministic, disjoint data splits: the one place that decides where an item belongs.

A split is a pure function of an item's key (its canonical text), so it does not depend on file
order, sampling or seeds, and an item can never move between splits. Tuning (merge search,
fusion data) sees only ``search`` (and ``train``); reports use ``test``.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "search", "test"]
EVAL_SPLITS: tuple[Split, ...] = ("search", "test")


def _bucket(key: str) -> int:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def eval_split_of(key: str) -> Split:
    """Split of an item of an evaluation-only data set (public benchmarks): half search, half test."""
    return "search" if _bucket(key) < 50 else "test"


def generated_split_of(key: str) -> Split:
    """Split of a generated item (synthetic suites): 60% train, 20% search, 20% test.

    Items in ``train`` may be used to train or fuse models; ``search`` and ``test`` never are.
    """
    b = _bucket(key)
    return "test" if b < 20 else "search" if b < 40 else "train"
