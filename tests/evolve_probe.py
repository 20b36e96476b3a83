"""A cheap probe task for the evolve tests, usable in-process and from a subprocess driver.

``mimic-<name>``: the prompts are fixed snippets; the reference of each is the greedy completion
(``max_new_tokens`` tokens) of a *target* model; an output is correct when it equals it. On the
tiny random experts this gives a fitness that really depends on the merge weights (the target
itself scores 1), so the search has something to find, in well under a second per candidate.

Driver use (the kill-and-resume test): ``python evolve_probe.py REFS.json -- <umm evolve args>``
registers the task from ``REFS.json`` and runs ``umm evolve``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WORDS = ["apples", "fox", "add", "return", "total", "sum", "brown", "lazy", "Tom", "more", "def", "answer"]


def probe_prompts(n: int = 48) -> list[str]:
    """``n`` distinct short prompts built from the tiny tokenizer's corpus words."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % len(WORDS)], WORDS[(i * 5 + 3) % len(WORDS)], WORDS[(i * 7 + 1) % len(WORDS)]
        out.append(f"{a} {b} {i} {c} =")
    return out


def make_references(model_dir: Path, out: Path, *, name: str, max_new_tokens: int = 3) -> Path:
    """Greedy completions of the probe prompts by ``model_dir``, saved as the task file."""
    from umm.checkpoints.loading import load_causal_lm, load_tokenizer
    from umm.eval.generate import generate

    model = load_causal_lm(model_dir, device="cpu", dtype="float32")
    tok = load_tokenizer(model_dir)
    prompts = probe_prompts()
    refs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=64)
    out.write_text(json.dumps({"name": name, "max_new_tokens": max_new_tokens,
                               "items": [{"prompt": p, "reference": r} for p, r in zip(prompts, refs)]}))
    return out


def register_probe(refs_file: Path) -> str:
    """Register the ``mimic-*`` task of ``refs_file``; returns its name."""
    from umm.eval.task import AnswerTask, Sample, register_task, stable_id

    spec: dict[str, Any] = json.loads(Path(refs_file).read_text())

    class MimicTask(AnswerTask):
        name = spec["name"]
        domain = "probe"
        max_new_tokens = int(spec["max_new_tokens"])

        def load(self) -> list[Sample]:
            return [Sample(stable_id(self.name, it["prompt"]), it["prompt"], it["reference"], it["prompt"])
                    for it in spec["items"]]

        def extract(self, sample: Sample, output: str) -> str | None:
            return output

        def is_correct(self, sample: Sample, extracted: str | None) -> bool:
            return extracted == sample.reference

    register_task(spec["name"], lambda data: MimicTask(data))
    return spec["name"]


if __name__ == "__main__":
    refs, sep, *argv = sys.argv[1:]
    assert sep == "--"
    register_probe(Path(refs))
    from umm.cli import main

    main(["evolve", *argv])
