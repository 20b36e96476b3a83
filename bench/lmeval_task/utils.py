"""lm-eval hooks of bench/bench_eval_vs_lmeval.py's local tasks (copied next to the task YAML it writes).

Answers are extracted with umm's own function (``umm.eval.extract.extract_final_number``: the
first number after the last ``####``, with umm's fallbacks), so both tools' answers can be
compared item by item. Code completions are not run here: executing model output inside
lm-eval's process would be unsandboxed, so the bench scores lm-eval's code completions with
umm's sandboxed scorer (``umm eval --task synth-code --completions FILE``).
"""

from umm.eval.extract import extract_final_number, gold_final_number, numbers_equal


def process_math(doc: dict, results: list[str]) -> dict[str, float]:
    """Accuracy of one synth-math item: umm's extraction of the completion against the gold ``#### N``."""
    return {"acc": float(numbers_equal(extract_final_number(results[0]), gold_final_number(doc["answer"])))}


def process_code(doc: dict, results: list[str]) -> dict[str, float]:
    """Nothing is executed in lm-eval's process; ``generated`` only counts the completions."""
    return {"generated": 1.0}
