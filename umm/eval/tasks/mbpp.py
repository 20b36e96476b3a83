"""``mbpp``: MBPP-format Python problems (``text``, ``test_list``), checked by execution.

Data: a JSONL file in the public MBPP format (``task_id``, ``text``, ``test_list``, optional
``test_setup_code``, ``code``); without ``--data``, a small sample written for this project.
"""

from __future__ import annotations

from pathlib import Path

from umm.eval.extract import extract_code
from umm.eval.tasks.base import CodeTask, EvalError, Sample, stable_id

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "mbpp_sample.jsonl"


def mbpp_prompt(text: str, tests: list[str]) -> str:
    return (
        f"You are an expert Python programmer. {text.strip()}\n"
        f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n\n```python\n"
    )


class MBPP(CodeTask):
    name = "mbpp"
    domain = "code"
    max_new_tokens = 384
    stop = ("```", "\n\n\n\n")
    chat = False
    description = "MBPP-format problems, executed in the sandbox (bundled sample; real set via --data)"

    def load(self) -> list[Sample]:
        path, records = self.data_or_bundled(BUNDLED, ("text", "test_list"))
        out = []
        for lineno, rec in enumerate(records, 1):
            tests = rec["test_list"]
            if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests) or not tests:
                raise EvalError(f"{path}:{lineno}: 'test_list' must be a non-empty list of assert strings")
            text = str(rec["text"]).strip()
            sid = f"mbpp/{rec['task_id']}" if "task_id" in rec else stable_id(self.name, text)
            setup = str(rec.get("test_setup_code") or "")
            tests_code = (setup + "\n" if setup else "") + "\n".join(tests)
            out.append(Sample(sid, mbpp_prompt(text, tests), tests_code, text, rec))
        return out

    def extract(self, sample: Sample, output: str) -> str | None:
        return extract_code(output)

    def program(self, sample: Sample, extracted: str) -> str:
        return f"{extracted}\n\n{self.tests(sample)}"

    def tests(self, sample: Sample) -> str:
        return f"{sample.reference}\n"


TASKS = {"mbpp": MBPP}  # read by umm.eval.task, the registry
