"""Former home of the streaming executor; re-exports the names other parts still import here.

The executor is split by concern: :mod:`umm.merge.dtypes` (dtype names),
:mod:`umm.merge.inputs` (opening and checking the models), :mod:`umm.merge.plan` (jobs),
:mod:`umm.merge.schedule` (the memory-budgeted thread pool), :mod:`umm.merge.run` (running the
jobs into a sink; the in-memory merge) and :mod:`umm.merge.disk` (the merge to a folder).
Import from those; this module goes once ``umm.evolve``, ``bench/bench_evolve.py`` and the
evolve tests do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from umm.merge import disk
from umm.merge.inputs import open_inputs
from umm.merge.run import merge_state_dict
from umm.ui import progress


def merge(recipe: Any, out_dir: str | Path, *, show_progress: bool = True, **kwargs: Any) -> disk.MergeSummary:
    """:func:`umm.merge.disk.merge` as this module's callers call it: ``show_progress`` draws the
    bar that merge used to draw itself. Callers should move to ``disk.merge(..., on_progress=)``."""
    bar = progress(desc="merge", unit="B", unit_scale=True, disable=None if show_progress else True)

    def advance(n: int, total: int) -> None:
        bar.total = total
        bar.update(n)

    try:
        return disk.merge(recipe, out_dir, on_progress=advance, **kwargs)
    finally:
        bar.close()


__all__ = ["merge", "merge_state_dict", "open_inputs"]
