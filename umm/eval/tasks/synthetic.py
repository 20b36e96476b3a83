"""The tasks of the synthetic suites (``synth-*``) of :mod:`umm.eval.suites`, the tiny experts' domains.

Zero-shot, no chat template: the model sees ``suite.prompt(record)`` and its completion is
scored with the suite's ``kind`` (``gsm8k``: final number; ``mbpp``: the completion run with the
record's asserts). Items come from ``split_records(suite, split, pool_size, seed=0)``: the
trainers only ever use ``train`` records, so nothing that trains or tunes sees ``test``.
"""

from __future__ import annotations

from pathlib import Path

from umm.eval.extract import extract_code, extract_final_number, gold_final_number, numbers_equal
from umm.eval.splits import eval_split_of, generated_split_of
from umm.eval.suites import SUITES, Suite, split_records
from umm.eval.tasks.base import AnswerTask, CodeTask, EvalSplit, Sample, Task, read_jsonl, stable_id

POOL_SIZE = 256  # items per split; ``limit`` draws a seeded subset of these


class _SyntheticMixin:
    """Items from a :class:`~umm.eval.suites.Suite`, or from ``--data``."""

    suite: Suite
    pool_size: int
    data: Path | None
    name: str

    def _sample(self, rec: dict) -> Sample:
        key = self.suite.key(rec)
        return Sample(stable_id(self.name, key), self.suite.prompt(rec), self._reference(rec), key, rec)

    def _reference(self, rec: dict) -> str: ...  # defined by each concrete class

    def load(self) -> list[Sample]:
        if self.data is not None:
            fields = ("question", "answer") if self.suite.kind == "gsm8k" else ("text", "test_list")
            return [self._sample(r) for r in read_jsonl(self.data, fields)]
        return [self._sample(r) for sp in ("search", "test") for r in split_records(self.suite, sp, self.pool_size, seed=0)]

    def split_pool(self, split: EvalSplit) -> list[Sample]:
        # a data file is an evaluation-only set (half search, half test); generated items keep
        # the split they were drawn for (generated_split_of, the one the trainers respect)
        split_of = eval_split_of if self.data is not None else generated_split_of
        return [s for s in self.all_samples() if split_of(s.key) == split]  # type: ignore[attr-defined]


class SyntheticAnswerTask(_SyntheticMixin, AnswerTask):
    chat = False

    def __init__(self, suite: Suite, data: Path | None = None, pool_size: int = POOL_SIZE) -> None:
        super().__init__(data)
        self.suite, self.pool_size = suite, pool_size
        self.name, self.domain = suite.name, suite.domain
        self.max_new_tokens, self.stop = suite.max_new_tokens, tuple(suite.stop)
        self.description = f"synthetic {suite.domain} suite ({suite.kind} format), zero-shot"

    def _reference(self, rec: dict) -> str:
        return gold_final_number(str(rec["answer"]))

    def extract(self, sample: Sample, output: str) -> str | None:
        return extract_final_number(output)

    def is_correct(self, sample: Sample, extracted: str | None) -> bool:
        return numbers_equal(extracted, sample.reference)


class SyntheticCodeTask(_SyntheticMixin, CodeTask):
    chat = False
    timeout_seconds = 5.0

    def __init__(self, suite: Suite, data: Path | None = None, pool_size: int = POOL_SIZE) -> None:
        super().__init__(data)
        self.suite, self.pool_size = suite, pool_size
        self.name, self.domain = suite.name, suite.domain
        self.max_new_tokens, self.stop = suite.max_new_tokens, tuple(suite.stop)
        self.description = f"synthetic {suite.domain} suite ({suite.kind} format), zero-shot, executed"

    def _reference(self, rec: dict) -> str:
        return "\n".join(rec["test_list"])

    def extract(self, sample: Sample, output: str) -> str | None:
        return extract_code(output) if "```" in output else output

    def program(self, sample: Sample, extracted: str) -> str:
        return f"{extracted}\n\n{self.tests(sample)}"

    def tests(self, sample: Sample) -> str:
        return f"{sample.reference}\n"


def synthetic_task(suite: Suite, data: Path | None = None, pool_size: int = POOL_SIZE) -> Task:
    """The task of a suite: answer-scored (``gsm8k`` kind) or executed (``mbpp`` kind)."""
    cls = SyntheticAnswerTask if suite.kind == "gsm8k" else SyntheticCodeTask
    return cls(suite, data, pool_size)


# one task per suite, under the suite's name (``synth-math``, ...); read by umm.eval.task, the registry
TASKS = {name: (lambda data, s=suite: synthetic_task(s, data)) for name, suite in SUITES.items()}
