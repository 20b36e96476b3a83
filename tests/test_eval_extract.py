"""Answer extraction: GSM8K final numbers and MATH boxed answers (table-driven)."""

from __future__ import annotations

import pytest

from umm.eval.extract import (
    extract_code,
    extract_final_number,
    gold_final_number,
    last_boxed,
    math_answers_equal,
    normalize_math_answer,
    numbers_equal,
    parse_number,
)

FINAL_NUMBER_CASES = [
    ("#### 72", "72"),
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("The answer is $1,234.50.", "1234.5"),
    ("So the total is 3 + 15 = 18 dollars", "18"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("It ends at −3 (unicode minus).\nThe answer is −3.", "-3"),
    ("Answer: 0.25", "0.25"),
    ("The answer is .5", "0.5"),
    ("#### 1,000", "1000"),
    ("#### -12", "-12"),
    ("#### $45", "45"),
    ("She pays $-5 back?", "-5"),
    ("5 - 3 = 2", "2"),
    ("step 1: 10\nstep 2: 20\n#### 30\n\nQuestion: next 99", "30"),
    ("The answer is 42. Then some chatter 7 8 9", "42"),
    ("The final answer is 3/4", "0.75"),
    ("We get 50%.", "50"),
    ("Therefore \\boxed{128}.", "128"),
    ("18 is the answer, 2 apples each", "2"),
    ("The answer is 1,234,567", "1234567"),
    ("It costs 2.50 each, so 7 cost 17.5.", "17.5"),
    ("no digits here", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", FINAL_NUMBER_CASES)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


@pytest.mark.parametrize(
    "a,b,equal",
    [
        ("72", "72.0", True),
        ("1,234.50", "1234.5", True),
        ("-3", "3", False),
        ("0.1", "0.10000000001", True),
        ("7", "8", False),
        (None, "1", False),
        ("abc", "1", False),
        ("3/4", "0.75", True),
    ],
)
def test_numbers_equal(a, b, equal: bool) -> None:
    assert numbers_equal(a, b) is equal


def test_gold_final_number_and_errors() -> None:
    assert gold_final_number("3 + 4 = 7\n#### 7") == "7"
    assert gold_final_number("#### 1,500") == "1500"
    with pytest.raises(ValueError, match="####"):
        gold_final_number("no marker 7")
    with pytest.raises(ValueError, match="no number"):
        gold_final_number("#### none")
    assert parse_number("-$5") == -5.0
    assert parse_number("nothing") is None


BOXED_CASES = [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{x^{2}+\\sqrt{y_{1}}}", "x^{2}+\\sqrt{y_{1}}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{unbalanced", None),
    ("no box", None),
]


@pytest.mark.parametrize("text,expected", BOXED_CASES)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


MATH_EQUAL_CASES = [
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("5\\text{ cm}", "5", True),
    ("6 \\text{ inches}", "6", True),
    ("12 units", "12", True),
    ("x = 3", "3", True),
    ("y=2x+1", "2x+1", True),
    ("10\\%", "10", True),
    ("$1,000$", "1000", True),
    ("3.50", "3.5", True),
    ("-\\frac{1}{3}", "-1/3", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("\\text{(A)}", "(A)", True),
    ("{5}", "5", True),
    ("\\frac{1}{2}", "\\frac{2}{3}", False),
    ("(1,2)", "(2,1)", False),
    ("\\sqrt{2}", "2", False),
    ("9\\pi", "9\\pi", True),
    (None, "1", False),
]


@pytest.mark.parametrize("pred,gold,equal", MATH_EQUAL_CASES)
def test_math_answers_equal(pred, gold, equal: bool) -> None:
    assert math_answers_equal(pred, gold) is equal


@pytest.mark.parametrize(
    "raw,norm",
    [("\\dfrac{3}{8}", "3/8"), ("\\left[ 0, 1 \\right)", "[0,1)"), ("540^\\circ", "540"), ("x = \\frac{1}{4}", "1/4"), ("2.0", "2")],
)
def test_normalize_math_answer(raw: str, norm: str) -> None:
    assert normalize_math_answer(raw) == norm


def test_extract_code_fenced_and_plain() -> None:
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n") == "x = 1\n"
