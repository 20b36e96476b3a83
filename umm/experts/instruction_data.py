"""Instruction-response data for distribution fusion, from the suites' ``train`` split only.

Each line is ``{"instruction": prompt, "response": target, "domain": ..., "task": ...}`` where
``instruction + response`` is exactly the text the tiny experts were trained on, so a teacher's
token distributions on it are meaningful. ``search`` / ``test`` records never appear.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from umm.atomic import write_text_atomic
from umm.eval.suites import split_records, suite_for_domain

logger = logging.getLogger(__name__)


def instruction_records(mixture: Mapping[str, int], seed: int = 0) -> list[dict[str, str]]:
    """``{"instruction","response","domain","task"}`` records: ``mixture[domain]`` train records each,
    interleaved round-robin across domains (deterministic for ``seed``)."""
    per_domain = []
    for domain, n in mixture.items():
        suite = suite_for_domain(domain)
        per_domain.append(
            [
                {"instruction": suite.prompt(r), "response": suite.target(r), "domain": domain, "task": suite.name}
                for r in split_records(suite, "train", n, seed)
            ]
        )
    out = []
    for i in range(max((len(x) for x in per_domain), default=0)):
        out.extend(x[i] for x in per_domain if i < len(x))
    return out


def write_instruction_data(path: str | Path, mixture: Mapping[str, int], seed: int = 0) -> Path:
    """Write :func:`instruction_records` as JSONL to ``path`` (via a temporary file and rename)."""
    path = Path(path)
    records = instruction_records(mixture, seed)
    write_text_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    logger.info("wrote %d instruction-response records to %s", len(records), path)
    return path
