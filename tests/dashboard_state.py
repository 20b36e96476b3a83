"""A coordinator state built through :class:`coordinator.db.StateDB`'s own methods, for the dashboard
tests: two ranked experts (one named like a script tag), a rejected one, a pending one, a
published evolve round with its CMA-ES search state, and a second (combine) round whose pairwise
fusion is training (its checkpoint holds the loss history) and that ended without improvement."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

XSS = "<script>alert(1)</script>"
#: a reason quoting contributor text that would mark the page if it ever became markup
REJECT_REASON = 'pickle-only weights <img src=x onerror="document.body.dataset.pwned=1">'
PUBLISHED = "published: merged beats best source by +0.200 [+0.050, +0.350]"
NOT_BETTER = "no improvement over previous: merged vs previous by -0.100 [-0.200, +0.010]"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class BuiltState:
    db_path: Path
    math: str
    code: str
    rejected: str
    pending: str
    merged: str


def build_state(root: Path) -> BuiltState:
    """Write the state into ``root/state.db`` (and the jobs' run folders under ``root``)."""
    from coordinator.db import StateDB
    from coordinator.jobspec import CombineJob
    from coordinator.steps import (
        AdmitStep,
        DiscoverStep,
        EvaluateResultStep,
        EvaluateStep,
        FetchStep,
        JobStep,
        PlanStep,
        PublishStep,
        RankStep,
    )
    from umm.combine.config import CombineSettings
    from umm.combine.decision import Decision
    from umm.combine.plan import CombinePlan
    from umm.combine.run import EVOLVE_DIR, FUSED_DIR, CombineResult
    from umm.eval.stats import PairedDifference
    from umm.evolve.report import Comparison
    from umm.evolve.state import Candidate, Generation, SearchState, save_state
    from umm.fusion.train import STATE_NAME
    from umm.net.records import ScoresRecord

    math_h, code_h, bad_h, pend_h, merged_h = (h(x) for x in ("math", "code", "bad", "pending", "merged"))
    db = StateDB(root / "state.db")
    db.upsert_expert(math_h, "ssh-rsa AAAAmath", XSS, ["math"], "127.0.0.1:4001", {"name": XSS})
    db.upsert_expert(code_h, "ssh-rsa AAAAcode", "code-expert", ["code"], "127.0.0.1:4002", {})
    db.upsert_expert(bad_h, "ssh-rsa AAAAbad", "bad-expert", ["math"], "127.0.0.1:4003", {})
    db.upsert_expert(pend_h, "ssh-rsa AAAApend", "slow-expert", ["code"], "127.0.0.1:4004", {})
    db.record_fetch(pend_h, "failed", "provider unreachable")
    db.record_verdict(math_h, True, "admitted", architecture="llama", tokenizer="t1", num_parameters=10)
    db.record_verdict(code_h, True, "admitted", architecture="llama", tokenizer="t1", num_parameters=10)
    db.record_verdict(bad_h, False, REJECT_REASON)

    # round 1: an evolve round that published
    n = db.start_round()
    db.record_ranks(n, [("code", 1, code_h, 0.4), ("code", 2, math_h, 0.1), ("math", 1, math_h, 0.5)])
    run_dir = root / "jobs" / "round-1"
    store = root / "models"
    job = db.create_job(n, CombineJob(models=[store / math_h, store / code_h], pivot=store / math_h,
                                      tasks=["synth-math", "synth-code"], search_size=8, test_size=8, device="cpu",
                                      seed=1, run_dir=run_dir, settings=CombineSettings()))
    db.update_job(job, status="done", progress=1.0, message="evolve: generation 2/2")
    gens = [Generation(index=g, seconds=1.0, candidates=[
        Candidate(generation=g, index=i, z=[0.0], x=[0.5], scores={}, fitness=f, seconds=0.5)
        for i, f in enumerate(fs)]) for g, fs in enumerate([[0.30], [0.35, 0.42], [0.40, 0.47]])]
    save_state(run_dir / EVOLVE_DIR, SearchState(optimizer="cma", seed=1, dimension=1, population=2, sigma0=0.1, z0=[0.0],
                                    generations=gens))
    source_scores = {math_h: {"synth-math": 0.5, "synth-code": 0.1}, code_h: {"synth-math": 0.1, "synth-code": 0.4}}
    gain = PairedDifference(diff=0.2, ci_low=0.05, ci_high=0.35)
    decided = Decision(published=True, text=PUBLISHED, margin=0.0, best_source=str(store / math_h),
                       diff_vs_best_source=gain)
    output = CombineResult(
        run_dir=run_dir, model_dir=run_dir / "model", recipe_hash=h("r"), method="task_arithmetic", fused={},
        dropped=[], decision=decided,
        plan=CombinePlan(pivot=str(store / math_h), base=str(store / math_h), family=[str(store / math_h),
                         str(store / code_h)], fuse=[], stages=["evolve"]),
        comparison=Comparison(weights={"synth-math": 1.0, "synth-code": 1.0}, rows=[], best_source=str(store / math_h),
                              evolved_minus_best_source=gain, resamples=10, seed=0))
    steps = [
        ("discover", DiscoverStep(experts=sorted([math_h, code_h, bad_h, pend_h]))),
        ("fetch", FetchStep(fetched=[math_h, code_h, bad_h], failed=[pend_h], rejected=[])),
        ("admit", AdmitStep(admitted=[math_h, code_h], rejected=[bad_h])),
        ("evaluate", EvaluateStep(evaluated=[math_h, code_h], failed=[])),
        ("rank", RankStep(ranks=[], published=True, record=ScoresRecord(round=1, updated_at=1.0e9, experts={}).dict())),
        ("plan", PlanStep(kind="evolve", sources=[code_h], pivot=math_h, best_per_domain={"math": math_h, "code": code_h})),
        ("job", JobStep(job=job, output=output)),
        ("evaluate_result", EvaluateResultStep(manifest_hash=merged_h, scores={"synth-math": 0.55, "synth-code": 0.45},
                                               objective=0.5, source_scores=source_scores,
                                               source_objectives={math_h: 0.3, code_h: 0.25}, decision=decided)),
        ("publish", PublishStep(end_round=True, state="published", reason=PUBLISHED)),
    ]
    for name, result in steps:
        db.begin_step(n, name)
        db.finish_step(n, name, result)
    db.update_round(n, state="published", phase="idle", method="task_arithmetic", sources=[code_h, math_h],
                    merged_hash=merged_h, scores={"synth-math": 0.55, "synth-code": 0.45}, objective=0.5,
                    published=1, reason=PUBLISHED, finished_at=1.0e9)

    # round 2: a combine job whose fusion trained (its checkpoint holds the loss history), then no improvement
    n2 = db.start_round()
    run2 = root / "jobs" / "round-2"
    fjob = db.create_job(n2, CombineJob(models=[store / math_h, store / code_h], pivot=store / math_h,
                                       tasks=["synth-math"], search_size=8, test_size=8, device="cpu", seed=2,
                                       run_dir=run2, settings=CombineSettings()))
    db.update_job(fjob, status="running", progress=0.5, message="fuse: 1 source(s) into the pivot")
    ckpt = run2 / FUSED_DIR / f".{code_h}.work" / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    history = [{"step": s, "loss": loss, "ce_gold": loss + 0.1, "ce_fused": loss - 0.1, "lr": 1e-4}
               for s, loss in [(1, 2.0), (2, 1.6), (3, 1.3)]]
    (ckpt / STATE_NAME).write_text(json.dumps({"trainer": {"step": 3, "history": history}}))
    db.begin_step(n2, "plan")
    db.finish_step(n2, "plan", PlanStep(kind="combine", sources=[code_h], pivot=math_h, previous=merged_h))
    db.begin_step(n2, "job")
    db.update_round(n2, state="no_improvement", phase="idle", reason=NOT_BETTER, previous_objective=0.5,
                    finished_at=1.0e9)
    db.close()
    return BuiltState(root / "state.db", math_h, code_h, bad_h, pend_h, merged_h)
