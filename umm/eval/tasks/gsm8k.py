"""``gsm8k``: grade-school math word problems, few-shot chain of thought, numeric final answer.

Data: a JSONL file in the public GSM8K format (``question``, ``answer`` ending in ``#### N``);
without ``--data``, a small sample written for this project (``umm/eval/data/gsm8k_sample.jsonl``).
"""

from __future__ import annotations

from pathlib import Path

from umm.eval.extract import extract_final_number, gold_final_number, numbers_equal
from umm.eval.tasks.base import AnswerTask, EvalError, Sample, stable_id

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "gsm8k_sample.jsonl"

# Few-shot exemplars written for this project (not taken from the benchmark).
FEW_SHOT = (
    ("A baker makes 24 rolls in the morning and 18 in the afternoon. He sells 30 of them. How many rolls are left?",
     "He makes 24 + 18 = 42 rolls. After selling 30 he has 42 - 30 = 12 rolls left.\n#### 12"),
    ("Lena reads 15 pages a day for 6 days and then 20 pages on the seventh day. How many pages does she read in total?",
     "In six days she reads 15 * 6 = 90 pages. With the seventh day that is 90 + 20 = 110 pages.\n#### 110"),
    ("A ticket costs $8 and a drink costs $3. How much do 4 tickets and 2 drinks cost?",
     "The tickets cost 4 * 8 = 32 dollars and the drinks 2 * 3 = 6 dollars, so 32 + 6 = 38 dollars.\n#### 38"),
    ("A rope is 45 meters long. It is cut into pieces of 5 meters each. How many pieces are there?",
     "There are 45 / 5 = 9 pieces.\n#### 9"),
)


def format_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def few_shot_prompt(question: str, shots: int = len(FEW_SHOT)) -> str:
    parts = [f"{format_question(q)} {a}" for q, a in FEW_SHOT[:shots]]
    parts.append(format_question(question))
    return "\n\n".join(parts)


class GSM8K(AnswerTask):
    name = "gsm8k"
    domain = "math"
    max_new_tokens = 256
    stop = ("\n\nQuestion:", "\nQuestion:", "\n\n\n")
    chat = True
    description = "GSM8K-format word problems, 4-shot CoT, numeric answer (bundled sample; real set via --data)"

    def load(self) -> list[Sample]:
        path, records = self.data_or_bundled(BUNDLED, ("question", "answer"))
        out = []
        for lineno, rec in enumerate(records, 1):
            try:
                gold = gold_final_number(str(rec["answer"]))
            except ValueError as exc:
                raise EvalError(f"{path}: record {lineno}: {exc}") from None
            q = str(rec["question"]).strip()
            out.append(Sample(stable_id(self.name, q), few_shot_prompt(q), gold, q, rec))
        return out

    def extract(self, sample: Sample, output: str) -> str | None:
        return extract_final_number(output)

    def is_correct(self, sample: Sample, extracted: str | None) -> bool:
        return numbers_equal(extracted, sample.reference)


TASKS = {"gsm8k": GSM8K}  # read by umm.eval.task, the registry
