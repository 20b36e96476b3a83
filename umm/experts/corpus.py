"""Pretraining documents for the tiny suite's base: the primitives of every domain, few answers.

Merging works when the base already holds some skill in every domain and the experts are short,
gentle fine-tunes of it (task vectors that stay in the base's basin). A real LLM gets such a base
from long pretraining on broad text; the tiny suite gets it from these documents, trained with the
loss on every token:

- ``equations``: lines ``a + b = c``, ``a - b = c`` and two-step chains ``a + b - c = d`` (numbers
  up to :data:`MAX_OPERAND`): the arithmetic that the math answers are made of;
- ``math-questions``: word problems of the math suite *without* their answers;
- ``code-descriptions``: task descriptions of the code suite *without* their code;
- ``code-defs``: Python functions of the code suite *without* their descriptions;
- ``repeat``: one short document of the kinds above, a newline, and the same text again
  (copying, which both prompt formats lean on).

Questions, descriptions and functions come from the ``train`` split only, so ``search`` and
``test`` items are never seen. Every kind is a pure function of ``(n, seed)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from umm.errors import UmmError
from umm.eval.suites import split_records, suite_for_domain

MAX_OPERAND = 40
# Bumped whenever a document generator changes: part of every recipe and prebuilt fingerprint.
CORPUS_VERSION = 1


def _equation(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        return f"{a} + {b} = {a + b}"
    if form == 1:
        a = rng.randint(1, MAX_OPERAND)
        b = rng.randint(0, a)
        return f"{a} - {b} = {a - b}"
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    c = rng.randint(0, a + b)
    return f"{a} + {b} - {c} = {a + b - c}"


def _lines(unit: Callable[[random.Random], str], low: int, high: int) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        return "\n".join(unit(rng) for _ in range(rng.randint(low, high)))

    return make


def _from_train(domain: str, field: Callable[[dict], str], n_pool: int, seed: int) -> Callable[[random.Random], str]:
    suite = suite_for_domain(domain)
    pool = [field(r) for r in split_records(suite, "train", n_pool, seed)]
    return lambda rng: rng.choice(pool)


def _makers(pool: int, seed: int, short: bool) -> dict[str, Callable[[random.Random], str]]:
    """One document maker per generic kind; ``short`` documents are the units that ``repeat`` doubles."""
    question = _from_train("math", lambda r: r["question"], pool, seed)
    description = _from_train("code", lambda r: r["text"], pool, seed + 1)
    code = _from_train("code", lambda r: r["code"], pool, seed + 2)
    n = (1, 2) if short else (2, 4)
    return {
        "equations": _lines(_equation, 2 if short else 4, 3 if short else 8),
        "math-questions": _lines(question, *n),
        "code-descriptions": _lines(description, *n),
        "code-defs": lambda rng: "\n\n".join(code(rng) for _ in range(rng.randint(*n))),
    }


KINDS = ("equations", "math-questions", "code-descriptions", "code-defs", "repeat")


def documents(counts: Mapping[str, int], seed: int = 0, pool: int = 3000) -> list[str]:
    """``counts[kind]`` documents of each kind, shuffled together; a pure function of its arguments.

    ``pool`` is how many ``train`` records the question, description and function kinds draw from.
    """
    unknown = set(counts) - set(KINDS)
    if unknown:
        raise UmmError(f"unknown pretraining document kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
    long, short = _makers(pool, seed, short=False), _makers(pool, seed, short=True)
    rng = random.Random(f"umm-corpus:{seed}")
    docs: list[str] = []
    for kind in KINDS:
        for _ in range(counts.get(kind, 0)):
            if kind == "repeat":
                unit = short[rng.choice(sorted(short))](rng)
                docs.append(f"{unit}\n{unit}")
            else:
                docs.append(long[kind](rng))
    rng.shuffle(docs)
    return docs
