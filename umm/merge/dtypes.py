"""Dtype names in recipes and on disk: ``"bf16"`` -> ``torch.bfloat16`` and back.

Owns the spellings a recipe may use for ``dtype`` / ``out_dtype`` and the name written into
``config.json``; nothing else in the merge code parses dtype strings.
"""

from __future__ import annotations

import torch

from umm.errors import UmmError

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(name: str | None, what: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` (also ``bf16``, ``torch.bfloat16``) -> ``torch.bfloat16``; ``None`` -> ``None``."""
    if name is None:
        return None
    key = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_NAMES[key]
    except KeyError:
        valid = ", ".join(sorted({"float32", "float16", "bfloat16", "float64"}))
        raise UmmError(f"unknown {what} {name!r}; valid: {valid}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of ``config.json``'s ``torch_dtype``)."""
    return str(dtype).removeprefix("torch.")
