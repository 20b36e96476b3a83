"""Synthetic reasoning domains the tiny experts are trained on and evaluated with.

Each :class:`Suite` is a generator of records in the format of a public benchmark family, so
the evaluator scores it with that family's extraction path:

- ``synth-math`` (``gsm8k``): 1-2 step add/subtract word problems with numbers up to 30; the worked solution ends in
  ``#### N``.
- ``synth-code`` (``mbpp``): a one-line description -> a Python function checked by asserts.
- ``synth-list`` (``gsm8k``): the largest / smallest of 3-4 numbers up to 20, ``#### N``.

Records are pure functions of ``(n, seed)``; which split a record belongs to is decided only by
:func:`umm.eval.splits.generated_split_of` on :meth:`Suite.key`, so ``train`` / ``search`` /
``test`` never overlap whatever seed or size anyone asks for. Prompts are zero-shot, without a
chat template: ``prompt(record) + target(record)`` is exactly the training text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from umm.errors import UmmError
from umm.eval.splits import Split, generated_split_of

Kind = Literal["gsm8k", "mbpp"]

# Bumped whenever a generator or format changes: part of every expert recipe fingerprint.
SUITES_VERSION = 3

_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva", "Ben", "Ivy", "Dan", "Amy")
_ITEMS = ("apples", "books", "coins", "cards", "pens", "eggs", "stamps", "shells", "marbles", "cups")


@dataclass(frozen=True)
class Suite:
    """One synthetic task family: records, prompt/target formats and generation settings."""

    name: str
    domain: str
    kind: Kind
    generate: Callable[[int, int], list[dict]]
    prompt: Callable[[dict], str]
    target: Callable[[dict], str]
    max_new_tokens: int
    stop: tuple[str, ...]

    def key(self, record: dict) -> str:
        """Canonical text of a record (what the split hash is computed on)."""
        return record["question"] if self.kind == "gsm8k" else record["text"]

    def text(self, record: dict) -> str:
        """The full training text: ``prompt + target``."""
        return self.prompt(record) + self.target(record)


def _distinct(make: Callable[[random.Random], dict], key: Callable[[dict], str], n: int, seed: int, name: str) -> list[dict]:
    """Draw records from ``make`` with a seeded RNG until ``n`` distinct keys are collected."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        rec = make(rng)
        k = key(rec)
        if k in seen:
            misses += 1
            if misses > 50 * n + 1000:
                raise UmmError(f"suite {name}: cannot draw {n} distinct records (space too small); ask for fewer")
            continue
        seen.add(k)
        out.append(rec)
    return out


# ---------------------------------------------------------------- math (gsm8k format)


def _math_record(rng: random.Random) -> dict:
    name = rng.choice(_NAMES)
    other = rng.choice([n for n in _NAMES if n != name])
    item = rng.choice(_ITEMS)
    form = rng.randrange(4)
    if form == 0:
        a, b = rng.randint(2, 20), rng.randint(1, 20)
        q = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        steps, ans = [f"{a} + {b} = {a + b}"], a + b
    elif form == 1:
        a = rng.randint(3, 30)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item}. {name} gives away {b}. How many {item} are left?"
        steps, ans = [f"{a} - {b} = {a - b}"], a - b
    elif form == 2:
        a, b = rng.randint(2, 20), rng.randint(1, 20)
        q = f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have together?"
        steps, ans = [f"{a} + {b} = {a + b}"], a + b
    else:
        a, b = rng.randint(2, 12), rng.randint(1, 10)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {name} have now?"
        steps, ans = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {ans}"}


def _qa_prompt(record: dict) -> str:
    return f"Question: {record['question']}\nAnswer:"


def _qa_target(record: dict) -> str:
    return " " + record["answer"]


# ---------------------------------------------------------------- code (mbpp format)

_FUNCS = ("f", "g", "h", "calc", "compute", "solve", "value", "apply", "step", "score", "scale", "shift")
_ARGS = ("x", "n", "a", "v", "k", "t")


# (description, expression, function) per form; descriptions use the parameter names given.
_UNARY: tuple[tuple[str, str, Callable[[int, int, int], int]], ...] = (
    ("{x} plus {m}", "{x} + {m}", lambda x, k, m: x + m),
    ("{x} minus {m}", "{x} - {m}", lambda x, k, m: x - m),
    ("{x} times {k}", "{x} * {k}", lambda x, k, m: x * k),
    ("{x} times {k} plus {m}", "{x} * {k} + {m}", lambda x, k, m: x * k + m),
    ("{x} times {k} minus {m}", "{x} * {k} - {m}", lambda x, k, m: x * k - m),
)
_BINARY: tuple[tuple[str, str, Callable[[int, int], int]], ...] = (
    ("the sum of {a} and {b}", "{a} + {b}", lambda a, b: a + b),
    ("{a} minus {b}", "{a} - {b}", lambda a, b: a - b),
    ("the product of {a} and {b}", "{a} * {b}", lambda a, b: a * b),
    ("the larger of {a} and {b}", "max({a}, {b})", max),
    ("the smaller of {a} and {b}", "min({a}, {b})", min),
    ("{a} times {b} plus {a}", "{a} * {b} + {a}", lambda a, b: a * b + a),
    ("{b} minus {a}", "{b} - {a}", lambda a, b: b - a),
)


def _code_record(rng: random.Random) -> dict:
    fn = rng.choice(_FUNCS)
    if rng.random() < 0.6:
        x = rng.choice(_ARGS)
        k, m = rng.randint(2, 9), rng.randint(1, 20)
        desc, expr, fun = rng.choice(_UNARY)
        params, desc, expr = x, desc.format(x=x, k=k, m=m), expr.format(x=x, k=k, m=m)
        calls = [((i,), fun(i, k, m)) for i in rng.sample(range(-5, 30), 3)]
    else:
        a, b = ("a", "b") if rng.random() < 0.5 else ("x", "y")
        desc, expr, fun2 = rng.choice(_BINARY)
        params, desc, expr = f"{a}, {b}", desc.format(a=a, b=b), expr.format(a=a, b=b)
        pairs = [(rng.randint(-5, 20), rng.randint(-5, 20)) for _ in range(3)]
        calls = [((p, q), fun2(p, q)) for p, q in pairs]
    text = f"Write a function {fn}({params}) that returns {desc}."
    code = f"def {fn}({params}):\n    return {expr}"
    tests = [f"assert {fn}({', '.join(map(str, args))}) == {want}" for args, want in calls]
    return {"text": text, "code": code, "test_list": tests}


def _code_prompt(record: dict) -> str:
    return record["text"] + "\n"


def _code_target(record: dict) -> str:
    return record["code"]


# ---------------------------------------------------------------- list (gsm8k format)


def _list_record(rng: random.Random) -> dict:
    nums = [rng.randint(1, 20) for _ in range(rng.randint(3, 4))]
    shown = ", ".join(map(str, nums))
    if rng.random() < 0.5:
        q, ans = f"What is the largest of {shown}?", max(nums)
    else:
        q, ans = f"What is the smallest of {shown}?", min(nums)
    return {"question": q, "answer": f"#### {ans}"}


def _make_suite(name: str, domain: str, kind: Kind, make: Callable[[random.Random], dict], prompt, target, max_new_tokens: int, stop: tuple[str, ...]) -> Suite:
    key = (lambda r: r["question"]) if kind == "gsm8k" else (lambda r: r["text"])

    def generate(n: int, seed: int = 0) -> list[dict]:
        return _distinct(make, key, n, seed, name)

    generate.__doc__ = f"n distinct records of suite {name!r}, a pure function of (n, seed)."
    return Suite(name, domain, kind, generate, prompt, target, max_new_tokens, stop)


SUITES: Mapping[str, Suite] = MappingProxyType(
    {
        s.name: s
        for s in (
            _make_suite("synth-math", "math", "gsm8k", _math_record, _qa_prompt, _qa_target, 32, ("\n\n", "\nQuestion:")),
            _make_suite("synth-code", "code", "mbpp", _code_record, _code_prompt, _code_target, 32, ("\n\n", "\nWrite a function")),
            _make_suite("synth-list", "list", "gsm8k", _list_record, _qa_prompt, _qa_target, 8, ("\n\n", "\nQuestion:")),
        )
    }
)


def suite_for_domain(domain: str) -> Suite:
    """The suite of a domain (``math``, ``code``, ``list``)."""
    for s in SUITES.values():
        if s.domain == domain:
            return s
    raise UmmError(f"unknown synthetic domain {domain!r}; known: {', '.join(s.domain for s in SUITES.values())}")


def get_suite(name: str) -> Suite:
    """A suite by task name (``synth-math``, ...) or by domain (``math``, ...)."""
    if name in SUITES:
        return SUITES[name]
    try:
        return suite_for_domain(name)
    except UmmError:
        raise UmmError(f"unknown synthetic suite {name!r}; known: {', '.join(SUITES)}") from None


_CHUNK = 512


def split_records(suite: Suite, split: Split, n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct records of ``suite`` whose ``generated_split_of(suite.key(r)) == split``.

    Deterministic for ``(suite, split, n, seed)``, and a prefix-stable function of ``n``: asking
    for more records returns the same first ones, so a bigger test set contains the smaller one.
    """
    if split not in ("train", "search", "test"):
        raise ValueError(f"split must be train, search or test, got {split!r}")
    out: list[dict] = []
    seen: set[str] = set()
    chunk = 0
    while len(out) < n:
        batch = suite.generate(_CHUNK, seed * 1_000_003 + chunk)
        fresh = 0
        for rec in batch:
            k = suite.key(rec)
            if k in seen:
                continue
            seen.add(k)
            fresh += 1
            if generated_split_of(k) == split:
                out.append(rec)
                if len(out) == n:
                    break
        chunk += 1
        if fresh == 0:
            raise UmmError(f"suite {suite.name}: only {len(out)} {split} records exist; ask for at most that many")
    return out
