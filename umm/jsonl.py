"""JSON Lines: one JSON object per line, every error naming the file and line."""

from __future__ import annotations

import json
from typing import Any

from umm.errors import UmmError


def parse_object(line: str, where: str, error: type[UmmError]) -> dict[str, Any]:
    """The JSON object on ``line``; ``error`` prefixed with ``where`` (``file:line``) when the line is
    not valid JSON or holds something else than an object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj
