"""``math``: MATH-style competition problems; the answer is the last ``\\boxed{...}``.

Data: a JSONL file with ``problem`` and either ``answer`` or a ``solution`` containing
``\\boxed{}`` (the public MATH format); without ``--data``, a small sample written for this
project (``umm/eval/data/math_sample.jsonl``).
"""

from __future__ import annotations

from pathlib import Path

from umm.eval.extract import last_boxed, math_answers_equal
from umm.eval.tasks.base import AnswerTask, EvalError, Sample, stable_id

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "math_sample.jsonl"

FEW_SHOT = (
    ("What is the value of $\\frac{3}{4} + \\frac{1}{8}$?",
     "Write both over 8: $\\frac{6}{8} + \\frac{1}{8} = \\frac{7}{8}$. The answer is $\\boxed{\\frac{7}{8}}$."),
    ("Solve for $x$: $2x + 7 = 19$.",
     "Subtract 7: $2x = 12$, so $x = 6$. The answer is $\\boxed{6}$."),
)

INSTRUCTION = "Solve the problem. Put the final answer in \\boxed{}."


def format_problem(problem: str) -> str:
    return f"Problem: {problem}\nSolution:"


def few_shot_prompt(problem: str) -> str:
    parts = [INSTRUCTION] + [f"{format_problem(p)} {s}" for p, s in FEW_SHOT] + [format_problem(problem)]
    return "\n\n".join(parts)


class MATH(AnswerTask):
    name = "math"
    domain = "math"
    max_new_tokens = 512
    stop = ("\n\nProblem:", "\nProblem:")
    chat = True
    description = "MATH-format problems, 2-shot, last \\boxed{} answer (bundled sample; real set via --data)"

    def load(self) -> list[Sample]:
        path, records = self.data_or_bundled(BUNDLED, ("problem",))
        out = []
        for lineno, rec in enumerate(records, 1):
            gold = rec.get("answer")
            if gold is None and "solution" in rec:
                gold = last_boxed(str(rec["solution"]))
            if gold is None:
                raise EvalError(f"{path}: record {lineno}: needs 'answer' or a 'solution' with \\boxed{{}}")
            p = str(rec["problem"]).strip()
            out.append(Sample(stable_id(self.name, p), few_shot_prompt(p), str(gold), p, rec))
        return out

    def extract(self, sample: Sample, output: str) -> str | None:
        return last_boxed(output)

    def is_correct(self, sample: Sample, extracted: str | None) -> bool:
        return math_answers_equal(extracted, sample.reference)


TASKS = {"math": MATH}  # read by umm.eval.task, the registry
