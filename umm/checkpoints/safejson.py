"""JSON from untrusted model folders, bounded in size and nesting depth before it is parsed.

Python's ``json`` (and transformers, and ``copy.deepcopy`` of a parsed config) recurse once per
nesting level, so ``[[[[...]]]]`` a few thousand levels deep raises :class:`RecursionError`
somewhere far from the file. :func:`loads_bounded` measures the depth first, in linear time and
without recursion: escaped backslashes and quotes are dropped, then strings, then everything but
brackets; the depth is the largest prefix sum of ``+1`` per opening and ``-1`` per closing bracket
(numpy, in chunks). Real configs, tokenizers and safetensors headers nest fewer than 10 levels. Every failure is a
:class:`~umm.checkpoints.errors.CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from umm.checkpoints.errors import CorruptCheckpointError

MAX_JSON_DEPTH = 64

_STRING = re.compile(r'"[^"]*"')  # once escapes are gone, a string runs to the next quote
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_CHUNK = 1 << 22


def _depth_range(brackets: bytes) -> tuple[int, int, int]:
    """(deepest, lowest, final) running depth over a string of only ``[]{}`` characters."""
    data = np.frombuffer(brackets, dtype=np.uint8)
    depth = peak = low = 0
    for start in range(0, len(data), _CHUNK):
        part = data[start:start + _CHUNK]
        run = np.cumsum(np.where((part == ord("[")) | (part == ord("{")), 1, -1)) + depth
        peak, low, depth = max(peak, int(run.max())), min(low, int(run.min())), int(run[-1])
    return peak, low, depth


def nesting_problem(text: str, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """``None`` if the brackets of JSON ``text`` (outside strings) nest at most ``max_depth`` deep,
    else what is wrong: too deep, or unbalanced (then the text is not JSON at all)."""
    plain = _STRING.sub("", text.replace("\\\\", "").replace('\\"', ""))
    peak, low, final = _depth_range(_NOT_BRACKET.sub("", plain).encode("ascii"))
    if peak > max_depth:
        return f"it nests deeper than {max_depth} levels"
    if low < 0 or final != 0:
        return "its brackets are unbalanced"
    return None


def loads_bounded(raw: bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON ``raw``; :class:`CorruptCheckpointError` ``"<where> is not valid JSON (...)"``
    for bad UTF-8, nesting beyond ``max_depth``, syntax errors and numbers Python refuses."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{where} is not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    problem = nesting_problem(text, max_depth)
    if problem is not None:
        raise CorruptCheckpointError(f"{where} is not valid JSON ({problem})")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer over Python's digit limit
        raise CorruptCheckpointError(f"{where} is not valid JSON ({str(e)[:200]})") from None


def read_json_bounded(path: Path, what: str, max_bytes: int, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and parse the JSON file ``path`` of at most ``max_bytes`` (``what`` names it in messages)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 1)  # never more, even if the file grows after a stat
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: {what} is missing") from None
    except IsADirectoryError:
        raise CorruptCheckpointError(f"{path}: {what} is a directory, not a file") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise CorruptCheckpointError(f"{path}: {what} is more than the {max_bytes} bytes allowed")
    return loads_bounded(raw, f"{path}: {what}", max_depth=max_depth)
