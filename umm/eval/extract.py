"""Answer extraction and comparison: final numbers (GSM8K style), ``\\boxed{}`` answers (MATH
style) and their normalisation, and code blocks from model outputs. Pure string functions."""

from __future__ import annotations

import math
import re
from fractions import Fraction

# A number as written in prose: optional sign and currency, thousands separators, decimals.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(
    rf"(?<![\w.])(?P<sign>[-−–])?\s?\$?\s?(?P<sign2>[-−])?(?P<num>{_NUM})(?:\s?/\s?(?P<den>\d+)(?![\d.]))?"
)
_ANSWER_CUE_RE = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is)?\s*:?|answer\s*:)", re.IGNORECASE
)


def parse_number(text: str) -> float | None:
    """The value of a number written as text (``"1,234.50"``, ``"-$5"``, ``"3/4"``, ``"50%"``)."""
    m = _NUMBER_RE.search(text.strip())
    return None if m is None else _value(m)


def _value(m: re.Match[str]) -> float | None:
    try:
        value = float(m.group("num").replace(",", ""))
        if m.group("den"):
            den = float(m.group("den"))
            if den == 0:
                return None
            value /= den
    except ValueError:
        return None
    return -value if (m.group("sign") or m.group("sign2")) else value


def _format(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER_RE.finditer(text):
        v = _value(m)
        if v is not None:
            out.append(v)
    return out


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a worked solution, as a canonical string (``"-1234.5"``).

    In order: the first number after the last ``####``; the first number after the last
    "the answer is" / "answer:" cue; the last ``\\boxed{}`` content; the last number in the text.
    ``None`` when the text has no number.
    """
    if "####" in text:
        nums = _numbers(text.rsplit("####", 1)[1])
        if nums:
            return _format(nums[0])
    cues = list(_ANSWER_CUE_RE.finditer(text))
    if cues:
        nums = _numbers(text[cues[-1].end():].split("\n\n")[0])
        if nums:
            return _format(nums[0])
    boxed = last_boxed(text)
    if boxed is not None:
        nums = _numbers(boxed)
        if nums:
            return _format(nums[0])
    nums = _numbers(text)
    return _format(nums[-1]) if nums else None


def gold_final_number(answer: str) -> str:
    """The number after ``####`` of a GSM8K-format gold answer; raises ValueError without one."""
    if "####" not in answer:
        raise ValueError("gold answer has no '#### N' line")
    value = parse_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise ValueError("gold answer has no number after '####'")
    return _format(value)


def numbers_equal(a: str | float | None, b: str | float | None, rel: float = 1e-6) -> bool:
    """Numeric equality of two answers (strings are parsed with :func:`parse_number`)."""
    if a is None or b is None:
        return False
    x = parse_number(a) if isinstance(a, str) else float(a)
    y = parse_number(b) if isinstance(b, str) else float(b)
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-9)


# ------------------------------------------------------------------ MATH-style answers


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces; ``\\boxed 5`` too."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    if i < len(text) and text[i] == " ":
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced


def _braced(s: str, i: int) -> tuple[str, int] | None:
    """The group starting at s[i] ('{...}' or a single character) and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += s[j] == "{"
        depth -= s[j] == "}"
        if depth == 0:
            return s[i + 1 : j], j + 1
    return None


def _replace_frac(s: str) -> str:
    """``\\frac{a}{b}`` (and ``\\frac12``) -> ``(a)/(b)``, innermost-first via recursion."""
    out, i = [], 0
    while True:
        k = s.find("\\frac", i)
        if k < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:k])
        num = _braced(s, k + 5)
        den = _braced(s, num[1]) if num else None
        if not num or not den:
            out.append(s[k:])
            return "".join(out)
        a, b = _replace_frac(num[0]), _replace_frac(den[0])
        a = a if re.fullmatch(r"-?[\w.]+", a) else f"({a})"
        b = b if re.fullmatch(r"[\w.]+", b) else f"({b})"
        out.append(f"{a}/{b}")
        i = den[1]


_UNIT_WORDS = (
    r"units?|degrees?|cm|mm|km|m|meters?|metres?|inches|inch|in|feet|foot|ft|yards?|miles?|"
    r"dollars?|cents?|hours?|minutes?|seconds?|days?|weeks?|years?|sq\.?\s*\w+|square\s+\w+|cubic\s+\w+"
)


def normalize_math_answer(answer: str) -> str:
    """Canonical text of a MATH-style answer, so equal answers compare equal as strings.

    Removes ``$``, spacing commands, ``\\left``/``\\right``, ``\\displaystyle``, degree signs,
    ``\\text{}`` units and trailing unit words, ``%``, a leading ``x =``; ``\\dfrac``/``\\tfrac`` ->
    ``\\frac`` -> ``a/b``; thousands separators; whitespace; outer braces; a trailing period.
    """
    s = answer.strip()
    s = s.replace("\n", " ").strip().rstrip(".").strip()
    s = re.sub(r"\\(?:!|,|;|:|quad|qquad)|\\ ", "", s)
    s = s.replace("$", "")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "").replace("°", "")
    s = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", s)
    s = s.replace("\\%", "").replace("%", "")
    # \text{...}: units after a value are dropped; an answer that is only text keeps its words
    stripped = re.sub(r"\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}", "", s).strip()
    if stripped and re.search(r"[\d\w)]", stripped):
        s = stripped
    else:
        s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}", r"\1", s)
    s = s.strip()
    m = re.fullmatch(r"([a-zA-Z]\w*|\\[a-zA-Z]+)\s*=\s*(.+)", s)
    if m and "=" not in m.group(2):
        s = m.group(2)
    unitless = re.sub(rf"(?<=[\d\s}})])\s*(?:{_UNIT_WORDS})\s*$", "", s).strip()
    if unitless:
        s = unitless
    s = _replace_frac(s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    s = re.sub(r"\s+", "", s)
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _braced(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1]
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.\d*?0+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def _as_fraction(s: str) -> Fraction | None:
    m = re.fullmatch(r"\(?(-?\d*\.?\d+)\)?/\(?(-?\d*\.?\d+)\)?|(-?\d*\.?\d+)", s)
    if not m:
        return None
    try:
        if m.group(3) is not None:
            return Fraction(m.group(3))
        den = Fraction(m.group(2))
        return None if den == 0 else Fraction(m.group(1)) / den
    except (ValueError, ZeroDivisionError):
        return None


def math_answers_equal(pred: str | None, gold: str) -> bool:
    """Equality of two MATH-style answers: normalised text, or equal numeric values."""
    if pred is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return math.isclose(float(fa), float(fb), rel_tol=1e-6, abs_tol=1e-9)
    return False


# ------------------------------------------------------------------ code


_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The code in a model output: the first fenced block if there is one, else the text."""
    m = _FENCE_RE.search(text)
    return m.group(1) if m else text
