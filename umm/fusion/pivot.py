"""Choosing the pivot model of a fusion: by default the best model of the hardest domain.

The paper finds that a pivot strong in the harder domain (math) fuses better. The hardest domain
is the one with the lowest mean score over the candidates; the pivot is the candidate with the
highest score there (ties: the name that sorts first). Both can be overridden.
"""

from __future__ import annotations

from collections.abc import Mapping

from umm.errors import UmmError


def hardest_domain(scores: Mapping[str, Mapping[str, float]]) -> str:
    """The domain with the lowest mean score over the models scored on it."""
    per_domain: dict[str, list[float]] = {}
    for model_scores in scores.values():
        for domain, s in model_scores.items():
            per_domain.setdefault(domain, []).append(float(s))
    if not per_domain:
        raise UmmError("no scores to choose a pivot from; pass the pivot explicitly")
    return min(sorted(per_domain), key=lambda d: sum(per_domain[d]) / len(per_domain[d]))


def choose_pivot(
    scores: Mapping[str, Mapping[str, float]],
    *,
    domain: str | None = None,
    override: str | None = None,
) -> str:
    """The pivot among ``scores`` (model -> domain -> score, higher is better).

    ``override`` wins if it names a candidate; ``domain`` replaces the hardest domain.
    """
    if override is not None:
        if override not in scores:
            raise UmmError(f"pivot {override!r} is not one of the candidates: {', '.join(sorted(scores))}")
        return override
    domain = domain or hardest_domain(scores)
    scored = [(m, float(s[domain])) for m, s in scores.items() if domain in s]
    if not scored:
        raise UmmError(f"no candidate has a score on domain {domain!r}")
    return min(sorted(scored), key=lambda ms: -ms[1])[0]
