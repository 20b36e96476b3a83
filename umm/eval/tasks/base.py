"""The base types of a task: data + prompt + generation settings + answer extraction + scorer.

The built-in tasks (the modules beside this one) derive from these; the registry that names them
is :mod:`umm.eval.task`, which imports them (this module imports none of them).

Every task has two disjoint, deterministic splits, ``search`` (for tuning merges) and ``test``
(for reports), decided by :mod:`umm.eval.splits` on each item's canonical text. ``limit`` takes
a seeded subset of a split; for one seed, a smaller subset is a prefix of a larger one.
"""

from __future__ import annotations

import hashlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from umm.errors import UmmError
from umm.eval.sandbox import DEFAULT_WORKERS, ExecResult, SandboxLimits, run_programs
from umm.eval.splits import eval_split_of
from umm.jsonl import parse_object

logger = logging.getLogger(__name__)

EvalSplit = Literal["search", "test"]


class EvalError(UmmError):
    """Bad evaluation input: unknown task, bad split, malformed data file."""


@dataclass(frozen=True)
class Sample:
    """One evaluation item: ``prompt`` is the exact text given to the model (before any chat
    template); ``reference`` is the gold answer (answer tasks) or the test code (code tasks)."""

    id: str
    prompt: str
    reference: str
    key: str  # canonical text the split is computed on
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def stable_id(prefix: str, key: str) -> str:
    return f"{prefix}/{hashlib.sha256(key.encode('utf-8')).hexdigest()[:10]}"


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records of a JSONL file; a malformed line or a missing field raises :class:`EvalError`
    naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"data file {p} does not exist (pass a JSONL file with --data)")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = parse_object(line, f"{p}:{lineno}", EvalError)
            missing = [k for k in required if k not in rec]
            if missing:
                raise EvalError(f"{p}:{lineno}: missing field(s) {', '.join(missing)} (needs {', '.join(required)})")
            out.append(rec)
    if not out:
        raise EvalError(f"data file {p} has no records")
    return out


class Task(ABC):
    """A benchmark. Subclasses provide the items, the extraction and the scoring."""

    name: str
    domain: str
    kind: Literal["answer", "code"]
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    chat: bool = False  # use the tokenizer's chat template (when it has one)
    description: str = ""

    def __init__(self, data: Path | None = None) -> None:
        self.data = Path(data) if data is not None else None
        self._items: list[Sample] | None = None

    # ---- data and splits

    @abstractmethod
    def load(self) -> list[Sample]:
        """All items of the task (both splits), in a fixed order."""

    def data_or_bundled(self, bundled: Path, required: Sequence[str]) -> tuple[Path, list[dict[str, Any]]]:
        """The file read and its records: ``data`` if given, else ``bundled`` (the sample shipped with
        umm, which is not the real benchmark: said in the log). Records lack none of ``required``."""
        if self.data is None:
            logger.info("%s: using the bundled %s; pass --data for the real benchmark", self.name, bundled.name)
        path = self.data or bundled
        return path, read_jsonl(path, required)

    def all_samples(self) -> list[Sample]:
        if self._items is None:
            items = self.load()
            seen: set[str] = set()
            unique = []
            for s in items:
                if s.id in seen:
                    continue  # an item duplicated in a file counts once
                seen.add(s.id)
                unique.append(s)
            self._items = unique
        return self._items

    def split_pool(self, split: EvalSplit) -> list[Sample]:
        """Every item of a split, in file order."""
        return [s for s in self.all_samples() if eval_split_of(s.key) == split]

    def samples(self, split: EvalSplit = "search", limit: int | None = None, seed: int = 0) -> list[Sample]:
        """Items of ``split``; with ``limit``, a seeded subset (a prefix-stable shuffle)."""
        if split not in ("search", "test"):
            raise EvalError(f"unknown split {split!r}; use 'search' (tuning) or 'test' (reporting)")
        pool = self.split_pool(split)
        if limit is None or limit >= len(pool):
            return pool
        if limit < 0:
            raise EvalError(f"limit must be >= 0, got {limit}")
        order = list(range(len(pool)))
        random.Random(f"{self.name}:{split}:{seed}").shuffle(order)
        return [pool[i] for i in sorted(order[:limit])]

    def split_sizes(self) -> dict[str, int]:
        return {sp: len(self.split_pool(sp)) for sp in ("search", "test")}

    # ---- scoring

    @abstractmethod
    def extract(self, sample: Sample, output: str) -> str | None:
        """What is scored from a model output: the final answer, or the program to run."""

    @abstractmethod
    def score(
        self,
        samples: Sequence[Sample],
        outputs: Sequence[str],
        *,
        sandbox_workers: int = DEFAULT_WORKERS,
        limits: SandboxLimits | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> list[tuple[str | None, bool]]:
        """(extracted, correct) per sample, in order; ``on_done(i)`` after each one is scored."""


class AnswerTask(Task):
    """A task whose output is reduced to a final answer and compared with the gold one."""

    kind = "answer"

    @abstractmethod
    def is_correct(self, sample: Sample, extracted: str | None) -> bool: ...

    def score(self, samples, outputs, *, sandbox_workers=2, limits=None, on_done=None):
        out = []
        for i, (s, o) in enumerate(zip(samples, outputs, strict=True)):
            e = self.extract(s, o)
            out.append((e, self.is_correct(s, e)))
            if on_done:
                on_done(i)
        return out


class CodeTask(Task):
    """A task whose output is a program checked by running its tests in the sandbox."""

    kind = "code"
    timeout_seconds: float = 10.0

    @abstractmethod
    def program(self, sample: Sample, extracted: str) -> str:
        """The complete program to run: the code under test followed by its tests."""

    def tests(self, sample: Sample) -> str | None:
        """The text :meth:`program` ends with: its tests, which the code before them must leave
        intact (checked before the run, :func:`umm.eval.sandbox.ends_with_tests`); None: no check."""
        return None

    def score(self, samples, outputs, *, sandbox_workers=2, limits=None, on_done=None):
        extracted = [self.extract(s, o) or "" for s, o in zip(samples, outputs, strict=True)]
        programs = [self.program(s, e) for s, e in zip(samples, extracted)]
        # a program that does not even compile fails without a sandbox run (compiling executes
        # nothing); untrained models produce mostly such programs, so this keeps searches fast
        runnable = [i for i, p in enumerate(programs) if _compiles(p)]
        passed = [False] * len(programs)
        if on_done:
            for i in sorted(set(range(len(programs))) - set(runnable)):
                on_done(i)
        lim = limits or SandboxLimits(timeout_seconds=self.timeout_seconds)
        results: list[ExecResult] = run_programs(
            [programs[i] for i in runnable], lim, workers=sandbox_workers,
            on_done=(lambda j, _r: on_done(runnable[j])) if on_done else None,
            tests=[self.tests(samples[i]) for i in runnable],
        )
        for i, r in zip(runnable, results):
            passed[i] = r.passed
        return list(zip(extracted, passed))


def _compiles(program: str) -> bool:
    try:
        compile(program, "program.py", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
