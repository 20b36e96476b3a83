"""The ``CoordinatorStatus`` gRPC service: a read-only view of the state DB.

Served by the running coordinator on ``status_port``; ``umm-coordinator status --address``
calls it through the one client, :func:`umm.net.status.fetch_status`, and prints the leaderboard
(with rejected experts and their reasons), the rounds and the current job's progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from coordinator.db import StateDB
from coordinator.steps import EvaluateResultStep, PlanStep
from umm.net.proto import umm_coordinator_pb2 as pb
from umm.net.proto import umm_coordinator_pb2_grpc as pb_grpc
from umm.net.status import MERGED_DOMAIN, PENDING_DOMAIN, REJECTED_DOMAIN, CoordinatorView

logger = logging.getLogger(__name__)


def _phase_text(db: StateDB) -> tuple[int, str]:
    rounds = db.rounds(limit=1)
    if not rounds:
        return 0, "idle"
    r = rounds[0]
    phase = r.phase if r.state == "running" else "idle"
    job = db.current_job()
    if job is not None and r.state == "running" and phase == "job":
        phase = f"job {job.id} ({job.kind}): {job.progress * 100:.0f}% {job.message}".strip()
    return r.number, phase


def leaderboard_entries(db: StateDB, domain: str = "", limit: int = 0) -> list[dict[str, Any]]:
    """Ranked experts per domain (coordinator's scores on ``search``), then rejected experts (domain
    ``rejected``, the reason in ``name``), the latest published merged model (``merged``, its test
    objective) and experts whose fetch failed and is retried (``pending``)."""
    experts = {e.manifest_hash: e for e in db.experts()}
    out: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for r in db.latest_ranks():
        if domain and r.domain != domain:
            continue
        counts[r.domain] = counts.get(r.domain, 0) + 1
        if limit and counts[r.domain] > limit:
            continue
        e = experts.get(r.manifest_hash)
        out.append({"domain": r.domain, "rank": r.rank, "manifest_hash": r.manifest_hash,
                    "name": e.name if e else "", "score": r.score, "owner": e.owner if e else "", "merged": False})
    verdicts = db.verdicts()
    if not domain or domain == REJECTED_DOMAIN:
        for h, v in sorted(verdicts.items()):
            if v.admitted:
                continue
            e = experts.get(h)
            out.append({"domain": REJECTED_DOMAIN, "rank": 0, "manifest_hash": h,
                        "name": f"{e.name if e else '?'}: {v.reason}", "score": 0.0, "owner": e.owner if e else "",
                        "merged": False})
    published = db.last_published_round()
    if published is not None and (not domain or domain == MERGED_DOMAIN):
        out.append({"domain": MERGED_DOMAIN, "rank": 0, "manifest_hash": published.merged_hash,
                    "name": f"round {published.number} ({published.method}), objective on test",
                    "score": published.objective, "owner": "", "merged": True})
    if not domain or domain == PENDING_DOMAIN:
        for h, e in sorted(experts.items()):
            f = db.fetch(h)
            if h in verdicts or f is None or f.status != "failed":
                continue
            out.append({"domain": PENDING_DOMAIN, "rank": 0, "manifest_hash": h,
                        "name": f"{e.name}: fetch failed {f.attempts}x, retried next round: {f.error}",
                        "score": 0.0, "owner": e.owner, "merged": False})
    return out


def round_comparison(db: StateDB, number: int) -> pb.RoundComparison | None:
    """The merged model's test scores beside its sources' (the round's finished ``evaluate_result``
    step), or None before the round got there."""
    step = db.step(number, "evaluate_result")
    if step is None or step.status != "done" or not isinstance(step.result, EvaluateResultStep):
        return None
    r = step.result
    return pb.RoundComparison(
        merged=pb.ModelScores(manifest_hash=r.manifest_hash, scores=r.scores, objective=r.objective,
                              family=r.families.get(r.manifest_hash, "")),
        sources=[pb.ModelScores(manifest_hash=h, scores=scores, objective=r.source_objectives[h],
                                family=r.families.get(h, "")) for h, scores in r.source_scores.items()],
    )


def round_decision(db: StateDB, number: int) -> pb.Decision | None:
    """The publish decision of the round's job (None before the round has its comparison)."""
    step = db.step(number, "evaluate_result")
    if step is None or step.status != "done" or not isinstance(step.result, EvaluateResultStep):
        return None
    d = step.result.decision
    if d is None:
        return None

    def diff(x: Any) -> pb.Difference | None:
        return None if x is None else pb.Difference(diff=x.diff, ci_low=x.ci_low, ci_high=x.ci_high)

    # the job names models by their folder, and a store folder is named by the manifest hash
    return pb.Decision(published=d.published, text=d.text, margin=d.margin,
                       best_source_manifest_hash=Path(d.best_source).name,
                       vs_best_source=diff(d.diff_vs_best_source), vs_previous=diff(d.diff_vs_previous))


def round_plan(db: StateDB, number: int) -> dict[str, Any]:
    """The round's plan fields of :class:`pb.Round` (empty before the plan step finished)."""
    step = db.step(number, "plan")
    if step is None or step.status != "done" or not isinstance(step.result, PlanStep):
        return {}
    p = step.result
    return {"plan": p.kind, "stages": list(p.stages), "pivot_manifest_hash": p.pivot,
            "previous_manifest_hash": p.previous}


class StatusServicer(pb_grpc.CoordinatorStatusServicer):
    """Answers from the state DB; ``info()`` gives the live network/key/address fields."""

    def __init__(self, db_path: str, info: Callable[[], dict[str, Any]]):
        self.db_path = db_path
        self.info = info
        self._db: StateDB | None = None

    @property
    def db(self) -> StateDB:
        if self._db is None:
            self._db = StateDB(self.db_path)
        return self._db  # StateDB keeps one connection per thread

    def GetStatus(self, request, context):
        db = self.db
        number, phase = _phase_text(db)
        verdicts = db.verdicts()
        published = db.last_published_round()
        info = self.info()
        return pb.StatusResponse(
            network=info["network"], coordinator_public_key=info["public_key"],
            software_version=info["version"], current_round=number, phase=phase,
            experts_known=len(db.experts()), experts_admitted=sum(1 for v in verdicts.values() if v.admitted),
            merged_manifest_hash=published.merged_hash if published else "",
            checkpoint_address=info["address"], updated_at=time.time(),
        )

    def GetLeaderboard(self, request, context):
        entries = leaderboard_entries(self.db, request.domain, int(request.limit))
        return pb.Leaderboard(entries=[pb.LeaderboardEntry(**e) for e in entries])

    def ListRounds(self, request, context):
        out = []
        for r in self.db.rounds(limit=int(request.limit)):
            out.append(pb.Round(
                number=r.number, state=r.state, phase=r.phase, started_at=r.started_at,
                finished_at=r.finished_at, method=r.method, source_manifest_hashes=r.sources,
                merged_manifest_hash=r.merged_hash, recipe_hash=r.recipe_hash, scores=r.scores,
                objective=r.objective, previous_objective=r.previous_objective, published=r.published,
                reason=r.reason, comparison=round_comparison(self.db, r.number),
                decision=round_decision(self.db, r.number), **round_plan(self.db, r.number),
            ))
        return pb.RoundList(rounds=out)


class StatusServer:
    """A gRPC server with :class:`StatusServicer` on ``host:port`` (0: a free port)."""

    def __init__(self, servicer: StatusServicer, host: str = "127.0.0.1", port: int = 0):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="umm-status"))
        pb_grpc.add_CoordinatorStatusServicer_to_server(servicer, self.server)
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            from umm.net.errors import NetError

            raise NetError(f"cannot listen on {host}:{port} for the status service (port in use?)")
        self.address = f"{host}:{bound}"
        self.server.start()

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace)


def print_status(view: CoordinatorView) -> None:
    """Render :func:`umm.net.status.fetch_status`'s result with rich tables."""
    from umm.cli.net import leaderboard_table
    from umm.ui import console, table

    s = view.status
    console.print(
        f"network [bold]{s.network}[/]  round {s.current_round}  phase: {s.phase}  "
        f"experts: {s.experts_known} known, {s.experts_admitted} admitted  "
        f"merged: {(s.merged_manifest_hash or '-')[:12]}  files at {s.checkpoint_address}"
    )
    console.print(leaderboard_table(view.leaderboard))
    rrows = [[str(r.number), r.state, r.phase, " → ".join(r.stages) or "-", r.method or "-",
              (r.merged_manifest_hash or "-")[:12], f"{r.objective:.3f}", r.reason] for r in view.rounds]
    console.print(table("Rounds", ["round", "state", "phase", "stages", "method", "merged", "objective",
                                   "decision / reason"], rrows))
