"""The plan of a combination (pure: no I/O): which models are fused into the pivot, which merged.

A model's *family* is its (architecture fingerprint, tokenizer fingerprint) pair
(:mod:`umm.checkpoints.fingerprint`): models of one family can be merged tensor by tensor,
models of different families only fused through their output distributions.

- The pivot's family (the inputs with the pivot's fingerprints, and ``previous`` when it has
  them) goes into the evolve stage as they are.
- Every input of another family is fused pairwise into the pivot (FuseChat style: the pivot and
  that one source), giving a pivot-family model that joins the evolve stage.
- The merge's base is ``base_model`` when it is of the pivot's family, else the pivot itself
  (then the pivot is the base, not one of the merged models).
- Stages: ``["fuse", "evolve"]`` when something is fused, else ``["evolve"]``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from umm.errors import UmmError

Stage = Literal["fuse", "evolve"]


class PlanError(UmmError):
    """The models cannot be combined (e.g. a single model and nothing to fuse)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Frozen):
    """A model folder and its fingerprints (``architecture``, ``tokenizer``: sha256 hex)."""

    path: str
    name: str
    architecture: str
    tokenizer: str

    @property
    def family(self) -> tuple[str, str]:
        """(architecture, tokenizer): models of one family merge tensor by tensor."""
        return (self.architecture, self.tokenizer)


class CombinePlan(_Frozen):
    """``pivot``/``base``: paths; ``family``: the pivot-family inputs merged in the evolve stage
    (``previous`` included when it matches; the base excluded); ``fuse``: the sources of other
    families, each fused pairwise into the pivot; ``stages`` in order."""

    pivot: str
    base: str
    family: list[str]
    fuse: list[str]
    stages: list[Stage]


def plan_combine(
    models: list[ModelInfo],
    pivot: str,
    base_model: ModelInfo | None,
    previous: ModelInfo | None,
) -> CombinePlan:
    """The plan for ``models`` around ``pivot`` (the path of one of them); see the module docstring.

    Raises :class:`PlanError` when ``pivot`` is not among ``models``, or when nothing would be
    merged: no source to fuse and a single model of the pivot's family.
    """
    by_path = {m.path: m for m in models}
    if pivot not in by_path:
        raise PlanError(f"pivot {pivot} is not one of the models: {', '.join(by_path)}")
    family_key = by_path[pivot].family
    base = base_model.path if base_model is not None and base_model.family == family_key else pivot
    members = [m.path for m in models if m.family == family_key]
    if previous is not None and previous.family == family_key and previous.path not in members:
        members.append(previous.path)
    fuse = [m.path for m in models if m.family != family_key]
    family = [p for p in members if p != base]
    merged_count = len(family) + len(fuse)
    if not fuse and len(members) < 2:
        raise PlanError(f"nothing to merge: {by_path[pivot].name} is the only model of the pivot's family "
                        "and no model of another family is there to fuse into it")
    if merged_count < 1:  # pragma: no cover - implied by the check above
        raise PlanError("nothing to merge")
    return CombinePlan(pivot=pivot, base=base, family=family, fuse=fuse,
                       stages=["fuse", "evolve"] if fuse else ["evolve"])
