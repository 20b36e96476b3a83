"""Round planning: which admitted experts to merge, and how (pure functions, no I/O).

Experts are grouped by (architecture fingerprint, tokenizer fingerprint): only members of one
group can be merged layer-wise. The plan takes the best expert of every domain and the pivot (as
:func:`umm.fusion.pivot.choose_pivot` does by default: the best model of the hardest domain). The
round's job is :func:`umm.combine.run.run_combine` on them: when they all fall in one group the
plan is ``evolve`` (a CMA-ES merge alone); when they span several groups it is ``combine``: each
expert of another group is fused pairwise into the pivot's family, then the whole family is merged
by CMA-ES. The previously published merged model, when there is one, is a candidate too
(``previous``) and the bar the new model must clear.

Ties: :func:`score_order` is the coordinator's one rule for "better expert": the higher score
(the coordinator's own); on equal scores, in a domain, the expert whose record declares that
domain; then the smaller manifest hash. The published ranks, the best expert per domain and the
partner of a lone best expert all sort with it, so the rank-1 expert of a domain is the one the
plan merges (and the pivot is the hardest domain's rank-1 expert). Declared domains only break
exact ties (tiny models that all score 0 still get the math expert for math); they never outrank a
better score.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Candidate:
    """An admitted, evaluated expert: its compatibility key, its score per domain (the
    coordinator's) and the domains its record declares (used only to break ties)."""

    manifest_hash: str
    architecture: str
    tokenizer: str
    domain_scores: Mapping[str, float]
    declared: frozenset[str] = frozenset()

    @property
    def group(self) -> tuple[str, str]:
        return (self.architecture, self.tokenizer)


#: the stages of each plan kind (the job runs them in this order)
STAGES: dict[str, tuple[str, ...]] = {"evolve": ("evolve",), "combine": ("fuse", "evolve"), "none": ()}


class Plan(BaseModel):
    """``kind``: ``evolve`` (one family: a CMA-ES merge of ``sources`` and ``pivot``), ``combine``
    (several families: the sources of other families fused into the ``pivot``'s, then a CMA-ES merge
    of the family) or ``none`` (then ``reason`` says why). ``previous``: the manifest hash of the
    previously published merged model, a candidate of the merge and the bar to beat ("" if none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["evolve", "combine", "none"]
    sources: list[str] = Field(default_factory=list)
    pivot: str = ""
    previous: str = ""
    best_per_domain: dict[str, str] = Field(default_factory=dict)
    reason: str = ""

    @property
    def models(self) -> list[str]:
        """The experts the plan merges: its sources, then its pivot if it has one (not ``previous``)."""
        return [*self.sources, *([self.pivot] if self.pivot else [])]

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES[self.kind]


def score_order(score: float, manifest_hash: str, declared: bool = False) -> tuple[float, bool, str]:
    """Sort key that puts the better expert first: higher ``score``; on a tie, one that
    ``declared`` the domain; then the smaller ``manifest_hash`` (content-derived, so the order is
    the same on every run and restart)."""
    return (-float(score), not declared, manifest_hash)


def group_candidates(candidates: list[Candidate]) -> dict[tuple[str, str], list[Candidate]]:
    """Candidates by compatibility key, in a stable order."""
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: c.manifest_hash):
        groups.setdefault(c.group, []).append(c)
    return groups


def rank_per_domain(scores: Mapping[str, Mapping[str, float]],
                    declared: Mapping[str, Collection[str]] | None = None) -> dict[str, list[tuple[str, float]]]:
    """``scores`` (manifest hash -> domain -> score) as, per domain, ``(hash, score)`` best first by
    :func:`score_order`, with ``declared`` (hash -> domains its record claims) for ties. The
    coordinator's published ranks are these positions (1 = first)."""
    declared = declared or {}
    by_domain: dict[str, list[tuple[str, float]]] = {}
    for h, per_domain in scores.items():
        for d, s in per_domain.items():
            by_domain.setdefault(d, []).append((h, float(s)))
    return {d: sorted(items, key=lambda hs: score_order(hs[1], hs[0], d in declared.get(hs[0], ())))
            for d, items in sorted(by_domain.items())}


def best_per_domain(candidates: list[Candidate]) -> dict[str, str]:
    """The best candidate of each domain: the rank-1 expert of :func:`rank_per_domain`."""
    ranked = rank_per_domain({c.manifest_hash: c.domain_scores for c in candidates},
                             {c.manifest_hash: c.declared for c in candidates})
    return {d: items[0][0] for d, items in ranked.items()}


def plan_round(candidates: list[Candidate], previous: str = "", family: tuple[str, str] | None = None) -> Plan:
    """The job for this round's admitted experts (see module docstring); ``previous``: the hash of
    the published merged model, if any; ``family``: the (architecture, tokenizer) of the network's
    base model, if it has one: the pivot is then chosen among the chosen experts of that family
    (the hardest of the domains they lead), so the merge happens where the task vectors are."""
    if len(candidates) < 2:
        return Plan(kind="none", reason=f"{len(candidates)} admitted expert(s): nothing to merge")
    best = best_per_domain(candidates)
    chosen = list(dict.fromkeys(best.values()))
    by_hash = {c.manifest_hash: c for c in candidates}
    groups = {by_hash[h].group for h in chosen}
    if len(groups) == 1:
        group = next(iter(groups))
        if len(chosen) == 1:
            # one expert is best everywhere: merge it with the next best of its group
            others = sorted(
                (c for c in candidates if c.group == group and c.manifest_hash != chosen[0]),
                key=lambda c: score_order(sum(c.domain_scores.values()), c.manifest_hash),
            )
            if not others:
                return Plan(kind="none", best_per_domain=best,
                            reason="one expert is best on every domain and has no compatible partner")
            chosen.append(others[0].manifest_hash)
    from umm.fusion.pivot import hardest_domain

    # the pivot: the best model of the hardest domain, i.e. that domain's rank-1 expert (same tie rule),
    # among the domains led by an expert of the base's family when there is one
    led = {d: h for d, h in best.items() if family is None or by_hash[h].group == family} or best
    scores = {h: {d: s for d, s in by_hash[h].domain_scores.items() if d in led} for h in chosen}
    pivot = led[hardest_domain(scores)] if len(led) > 1 else next(iter(led.values()))
    sources = [h for h in chosen if h != pivot]
    return Plan(kind="evolve" if len(groups) == 1 else "combine", sources=sources, pivot=pivot, previous=previous,
                best_per_domain=best)
