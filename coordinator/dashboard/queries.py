"""The dashboard's views of the coordinator's state: pure reads through :class:`StateDB` methods,
the typed step results and the jobs' run folders (no SQL here).

Stages, plans and decisions are read from the step results generically where their shape may
grow (a plan with ``stages``, a ``decision`` with figures and confidence intervals): whatever
the round recorded is shown, and nothing is invented when it recorded nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from coordinator.dashboard.models import (
    Comparison,
    Curve,
    Curves,
    Decision,
    DomainBoard,
    Figure,
    JobView,
    Leaderboard,
    LeaderRow,
    MergedModel,
    ModelRef,
    ModelScores,
    NodeView,
    PlanView,
    Point,
    RoundDetail,
    Rounds,
    RoundSummary,
    Series,
    Stage,
    StepView,
)
from coordinator.db import ExpertRow, JobRow, RoundRow, StateDB, StepRow
from coordinator.jobspec import CombineJob
from coordinator.steps import EvaluateResultStep

logger = logging.getLogger(__name__)

SHORT = 12  # hex digits of a short manifest hash


def model_ref(h: str, experts: dict[str, ExpertRow]) -> ModelRef:
    e = experts.get(h)
    return ModelRef(manifest_hash=h, short_hash=h[:SHORT], name=e.name if e else "")


def owner_id(owner: str | bytes) -> str:
    """A short stable id of a contributor's public key: the first 12 hex digits of its SHA-256."""
    raw = owner.encode() if isinstance(owner, str) else bytes(owner)
    return hashlib.sha256(raw).hexdigest()[:SHORT] if raw else ""


def _experts(db: StateDB) -> dict[str, ExpertRow]:
    return {e.manifest_hash: e for e in db.experts()}


# ---------------------------------------------------------------------------------- leaderboard


def leaderboard(db: StateDB) -> Leaderboard:
    """The latest ranks per domain (best first), then every announced expert without a rank: rejected
    ones with their verdict's reason, the others pending (with their failed fetch's error, if any)."""
    experts = _experts(db)
    verdicts = db.verdicts()
    ranks = db.latest_ranks()
    boards: dict[str, list[LeaderRow]] = {}
    for r in ranks:
        v, e = verdicts.get(r.manifest_hash), experts.get(r.manifest_hash)
        boards.setdefault(r.domain, []).append(LeaderRow(
            model=model_ref(r.manifest_hash, experts), domain=r.domain, rank=r.rank, score=r.score,
            verdict="admitted" if v is None or v.admitted else "rejected", reason=v.reason if v else "",
            owner=owner_id(e.owner) if e else ""))
    ranked = {r.manifest_hash for r in ranks}
    unranked = []
    for h, e in experts.items():
        if h in ranked:
            continue
        v = verdicts.get(h)
        if v is not None:
            verdict, reason = ("admitted" if v.admitted else "rejected"), v.reason
        else:
            f = db.fetch(h)
            verdict = "pending"
            reason = f"fetch {f.status} ({f.attempts}x): {f.error}" if f is not None and f.status != "done" else \
                "not evaluated yet"
        unranked.append(LeaderRow(model=model_ref(h, experts), domain=", ".join(e.domains), rank=None, score=None,
                                  verdict=verdict, reason=reason, owner=owner_id(e.owner)))
    published = db.last_published_round()
    merged = None if published is None else MergedModel(
        model=model_ref(published.merged_hash, experts), round=published.number, method=published.method,
        objective=published.objective)
    return Leaderboard(ranked_in_round=ranks[0].round if ranks else None,
                       domains=[DomainBoard(domain=d, rows=rows) for d, rows in sorted(boards.items())],
                       unranked=unranked, merged=merged)


# ---------------------------------------------------------------------------------- rounds


def round_summary(row: RoundRow, experts: dict[str, ExpertRow]) -> RoundSummary:
    return RoundSummary(
        number=row.number, state=row.state, stage=row.phase, started_at=row.started_at, finished_at=row.finished_at,
        method=row.method, merged=model_ref(row.merged_hash, experts) if row.merged_hash else None,
        objective=row.objective if row.merged_hash else None, published=row.published, reason=row.reason)


def rounds(db: StateDB, limit: int = 0) -> Rounds:
    """The rounds, newest first (``limit``: at most that many; 0: all)."""
    experts = _experts(db)
    return Rounds(rounds=[round_summary(r, experts) for r in db.rounds(limit=limit)])


def _done(steps: Iterable[StepRow]) -> dict[str, Any]:
    """The results of a round's finished steps, by step name."""
    return {s.name: s.result for s in steps if s.status == "done" and s.result is not None}


def round_detail(db: StateDB, number: int) -> RoundDetail | None:
    """Round ``number``'s steps, plan, decision, merged-vs-sources table and jobs (None: no such round)."""
    row = db.round(number)
    if row is None:
        return None
    experts = _experts(db)
    steps = db.steps(number)
    results = _done(steps)
    return RoundDetail(
        round=round_summary(row, experts),
        steps=[StepView(name=s.name, status=s.status, started_at=s.started_at, finished_at=s.finished_at,
                        attempts=s.attempts) for s in steps],
        plan=plan_view(results.get("plan"), experts, getattr(results.get("job"), "output", None)),
        decision=decision(row, results),
        comparison=comparison(results.get("evaluate_result"), experts),
        jobs=[job_view(j) for j in round_jobs(db, number, steps)],
    )


def _hashes(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str) and v] if isinstance(value, list) else []


def plan_view(plan: Any, experts: dict[str, ExpertRow], output: Any = None) -> PlanView | None:
    """The plan step's result as its stages in order (``fuse``: the experts of other families, fused
    pairwise into the pivot's; ``evolve``: the pivot's family), each with its models. ``output``: the
    round's job result (:class:`umm.combine.run.CombineResult`), which names the models of each
    stage (store folders are named by manifest hash); without it every stage lists the plan's experts."""
    if plan is None:
        return None
    data = plan.model_dump(mode="json")
    kind = str(data.get("kind", ""))
    experts_of_plan = [*_hashes(data.get("sources")), *_hashes([data.get("pivot")])]
    by_stage: dict[str, list[str]] = {}
    if output is not None:
        by_stage = {"fuse": [Path(p).name for p in output.plan.fuse],
                    "evolve": [Path(p).name for p in output.plan.family]}
    stages = [Stage(name=name, models=[model_ref(h, experts) for h in by_stage.get(name, experts_of_plan)])
              for name in getattr(plan, "stages", ())]
    pivot = data.get("pivot")
    return PlanView(kind=kind, stages=stages, pivot=model_ref(pivot, experts) if isinstance(pivot, str) and pivot
                    else None, reason=str(data.get("reason", "")))


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _figures(data: dict[str, Any]) -> list[Figure]:
    """Numbers of a recorded decision: ``name: value`` and ``name: {diff|value, ci_low, ci_high}``."""
    out = []
    for k, v in data.items():
        if _number(v) is not None:
            out.append(Figure(name=k, value=_number(v)))
        elif isinstance(v, dict):
            value = _number(v.get("diff", v.get("value")))
            if value is not None:
                out.append(Figure(name=k, value=value, ci_low=_number(v.get("ci_low")),
                                  ci_high=_number(v.get("ci_high"))))
    return out


def decision(row: RoundRow, results: dict[str, Any]) -> Decision | None:
    """How a finished round ended (None while it runs): its state and reason, the merged model's test
    objective beside its best source's and the previously published one, and every figure of a
    ``decision`` that a step recorded."""
    if row.state == "running":
        return None
    text, figures = row.reason, []
    ev = results.get("evaluate_result")
    if isinstance(ev, EvaluateResultStep):
        figures.append(Figure(name="merged objective (test)", value=ev.objective))
        if ev.source_objectives:
            best = max(ev.source_objectives.values())
            figures.append(Figure(name="best source objective (test)", value=best))
            figures.append(Figure(name="merged − best source", value=ev.objective - best))
    if row.previous_objective:
        figures.append(Figure(name="previously published objective", value=row.previous_objective))
    for result in results.values():
        recorded = getattr(result, "decision", None)
        if recorded is None:
            continue
        data = recorded.model_dump(mode="json") if hasattr(recorded, "model_dump") else recorded
        if isinstance(data, dict):
            text = str(data.get("text") or data.get("reason") or text)
            figures.extend(_figures(data))
    return Decision(published=row.published, state=row.state, text=text, figures=figures)


def comparison(ev: Any, experts: dict[str, ExpertRow]) -> Comparison | None:
    """The merged model's test scores beside its sources' (the ``evaluate_result`` step)."""
    if not isinstance(ev, EvaluateResultStep):
        return None
    models = [ModelScores(role="merged", model=model_ref(ev.manifest_hash, experts), scores=ev.scores,
                          objective=ev.objective)]
    models += [ModelScores(role="source", model=model_ref(h, experts), scores=s,
                           objective=ev.source_objectives.get(h, math.nan)) for h, s in ev.source_scores.items()]
    tasks = sorted({t for m in models for t in m.scores})
    return Comparison(tasks=tasks, models=models)


# ---------------------------------------------------------------------------------- jobs and curves


def job_view(job: JobRow) -> JobView:
    return JobView(id=job.id, kind=job.kind, status=job.status, progress=job.progress, message=job.message,
                   failure=job.failure)


def round_jobs(db: StateDB, number: int, steps: list[StepRow] | None = None) -> list[JobRow]:
    """Every job of round ``number``, oldest first: those its steps name (a ``job`` or ``jobs``
    field), its latest, and the ones created just before those for the same round (job ids grow)."""
    ids: set[int] = set()
    for s in steps if steps is not None else db.steps(number):
        ids.update(i for i in [getattr(s.result, "job", None), *(getattr(s.result, "jobs", None) or [])]
                   if isinstance(i, int) and not isinstance(i, bool))
    latest = db.round_job(number)
    if latest is not None:
        ids.add(latest.id)
    jobs = {i: j for i in ids if (j := db.job(i)) is not None and j.round == number}
    if jobs:
        i = min(jobs) - 1
        while i > 0 and (j := db.job(i)) is not None and j.round == number:
            jobs[i] = j
            i -= 1
    return [jobs[i] for i in sorted(jobs)]


def _points(xs: Iterable[float], ys: Iterable[float | None]) -> list[Point]:
    return [Point(x=float(x), y=float(y)) for x, y in zip(xs, ys) if _number(y) is not None]


def evolve_curve(job: JobRow) -> Curve | None:
    """The CMA-ES search's fitness per generation (best so far, best of generation, mean) from the
    job's evolve stage's search state (:func:`umm.evolve.report.fitness_curves`); no series before
    its first generation."""
    from umm.combine.run import EVOLVE_DIR
    from umm.evolve.report import fitness_curves
    from umm.evolve.state import STATE_FILE, ResumeError, load_state

    spec = job.spec
    if not isinstance(spec, CombineJob):
        return None
    folder = spec.run_dir / EVOLVE_DIR
    series = []
    if (folder / STATE_FILE).is_file():
        try:
            state = load_state(folder)
            gens = [g.index for g in state.generations]
            names = {"best": "best so far", "generation_best": "best of generation", "mean": "mean of generation"}
            series = [Series(name=names[k], points=_points(gens, v)) for k, v in fitness_curves(state).items()]
        except ResumeError as e:  # damaged: shown as no data
            logger.info("no fitness curve for job %d: %s", job.id, e)
    return Curve(job=job_view(job), title=f"CMA-ES fitness (job {job.id})", x_label="generation",
                 y_label="fitness (search split)", series=series)


def fusion_history(work: Path, output: Path) -> list[dict[str, Any]]:
    """One fusion's training steps so far (``step``, ``loss``, its terms): from its latest checkpoint
    in ``work`` while it trains; once it is done, from ``output``'s recipe (``history`` if recorded,
    else the final step's loss only)."""
    from umm.fusion.train import STATE_NAME, latest_checkpoint

    try:
        ckpt = latest_checkpoint(work)
        if ckpt is not None:
            history = json.loads((ckpt / STATE_NAME).read_text(encoding="utf-8")).get("trainer", {}).get("history")
            return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
        recipe_path = output / "fusion_recipe.json"
        if recipe_path.is_file():
            recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
            history = recipe.get("history")
            if isinstance(history, list):
                return [h for h in history if isinstance(h, dict)]
            return [recipe["final_loss"]] if isinstance(recipe.get("final_loss"), dict) else []
    except (OSError, ValueError, AttributeError) as e:  # a checkpoint being replaced: no curve this time
        logger.info("no fusion history in %s: %s", work, e)
    return []


def _latest_fusion(run_dir: Path) -> tuple[str, Path, Path] | None:
    """(source name, work dir, output) of the job's most recently written pairwise fusion, if any:
    ``fused/<name>/`` once done, ``fused/.<name>.work/`` while it trains."""
    from umm.combine.run import FUSED_DIR

    fused = run_dir / FUSED_DIR
    try:
        entries = [p for p in fused.iterdir() if p.is_dir()]
    except OSError:
        return None
    names = {p.name[1:-len(".work")] if p.name.startswith(".") and p.name.endswith(".work") else p.name: p
             for p in entries}
    if not names:
        return None
    name = max(names, key=lambda n: names[n].stat().st_mtime)
    return name, fused / f".{name}.work", fused / name


def fusion_curve(job: JobRow) -> Curve | None:
    """The latest pairwise fusion's training loss per step (and its terms); None when the job fuses
    nothing (yet)."""
    if not isinstance(job.spec, CombineJob):
        return None
    latest = _latest_fusion(job.spec.run_dir)
    if latest is None:
        return None
    name, work, output = latest
    history = fusion_history(work, output)
    steps = [h.get("step") for h in history]
    keys = [k for k in ("loss", "ce_gold", "ce_fused") if any(k in h for h in history)]
    series = [Series(name=k, points=[p for x, h in zip(steps, history) if _number(x) is not None
                                     for p in _points([x], [h.get(k)])]) for k in keys]
    return Curve(job=job_view(job), title=f"fusion of {name[:12]}: training loss (job {job.id})", x_label="step",
                 y_label="loss", series=series)


def curves(db: StateDB, number: int) -> Curves | None:
    """The curves of round ``number``'s last job: its search and its latest fusion (None: no such
    round; a curve is None when the round has no job, or the job fuses nothing)."""
    if db.round(number) is None:
        return None
    jobs = round_jobs(db, number)

    def last(kind: str, make: Callable[[JobRow], Curve | None]) -> Curve | None:
        for job in reversed(jobs):
            if job.kind == kind:
                return make(job)
        return None

    return Curves(round=number, evolve=last("combine", evolve_curve), fusion=last("combine", fusion_curve))


# ---------------------------------------------------------------------------------- nodes


def expert_nodes(db: StateDB) -> list[NodeView]:
    """Every announced expert's node: name, announced address, contributor id, model, domains."""
    experts = _experts(db)
    return [NodeView(role="expert", name=e.name, address=e.address, owner=owner_id(e.owner),
                     model=model_ref(h, experts), domains=list(e.domains), last_seen=e.last_seen)
            for h, e in experts.items()]


def provider_nodes(db: StateDB, providers: list[tuple[bytes, str]], coordinator_key: bytes) -> list[NodeView]:
    """The merged model's providers ``(owner public key, address)`` as nodes, named after the experts
    their key announced (or ``coordinator``)."""
    names: dict[str, list[str]] = {}
    for e in db.experts():
        names.setdefault(owner_id(e.owner), []).append(e.name)
    out = []
    for owner, address in providers:
        oid = owner_id(owner)
        name = "coordinator" if bytes(owner) == bytes(coordinator_key) else ", ".join(names.get(oid, [])) or "peer"
        out.append(NodeView(role="provider", name=name, address=address, owner=oid, model=None, domains=[],
                            last_seen=None))
    return sorted(out, key=lambda n: (n.name != "coordinator", n.name, n.address))


def merged_hash(db: StateDB) -> str:
    published = db.last_published_round()
    return published.merged_hash if published is not None else ""

