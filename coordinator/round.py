"""One coordinator round as a resumable state machine.

Steps (DESIGN.md "A round"): ``discover`` → ``fetch`` → ``admit`` → ``evaluate`` → ``rank``
(and publish scores) → ``plan`` → ``job`` → ``evaluate_result`` → ``publish``. Each step is a row
in the ``steps`` table with its typed result (:mod:`coordinator.steps`); :meth:`RoundRunner.run`
skips steps already ``done`` (their recorded result is reused) and per-expert work inside a step
is keyed by manifest hash, so a coordinator killed at any point resumes its round without redoing
finished work. Experts are untrusted: a
failed fetch of corrupt bytes, a pickle-only or NaN model, one over the size limit, a record that
lies about its fingerprint: each becomes a rejected verdict with its reason, and the round goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.db import RoundRow, StateDB, VerdictRow
from coordinator.jobspec import AdmitJob, CombineJob, EvaluateJob, JobResult
from coordinator.planner import Candidate, Plan, plan_round, rank_per_domain
from coordinator.steps import (
    STEPS,
    AdmitStep,
    DiscoverStep,
    Ending,
    EvaluateResultStep,
    EvaluateStep,
    FetchStep,
    JobStep,
    PlanStep,
    PublishStep,
    RankStep,
    RoundResults,
)
from umm.errors import UmmError

logger = logging.getLogger(__name__)

class Interrupted(Exception):
    """The coordinator is stopping: the current step stays unfinished and resumes on restart."""


def benchmark_key(config: CoordinatorConfig, split: str) -> str:
    """Identifies an evaluation setting: scores are reused only under the same key."""
    limit = config.eval_limit if split == "search" else config.test_limit
    spec = {"tasks": sorted(config.tasks), "split": split, "limit": limit, "seed": config.eval_seed,
            "max_new_tokens": config.max_new_tokens}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def domain_scores(config: CoordinatorConfig, scores: dict[str, float]) -> dict[str, float]:
    """Mean task score per domain of the coordinator's benchmark."""
    out = {}
    for domain, tasks in config.domains().items():
        vals = [scores[t] for t in tasks if t in scores]
        if vals:
            out[domain] = sum(vals) / len(vals)
    return out


def objective(config: CoordinatorConfig, scores: dict[str, float]) -> float:
    """The number a merged model must raise: mean of its domain scores."""
    d = domain_scores(config, scores)
    return sum(d.values()) / len(d) if d else 0.0


def task_weights(config: CoordinatorConfig) -> dict[str, float]:
    """Each task's weight in the job's objective, ``1 / (tasks of its domain)``, so that the weighted
    mean of task scores is :func:`objective`'s mean of domain scores (up to the constant number of
    domains, which a weighted mean divides away)."""
    return {t: 1.0 / len(tasks) for tasks in config.domains().values() for t in tasks}


EXPERTS_DB = "experts.db"  # job rows of the admission/evaluation workers (apart from the round's merge job)


class ExpertWorkerError(UmmError):
    """The worker handling one expert crashed, ran out of memory or time: that expert's rejection."""


def run_in_worker(config: CoordinatorConfig, spec: AdmitJob | EvaluateJob, timeout: float,
                  stop: threading.Event | None = None) -> JobResult:
    """Run ``spec`` (an admission or an evaluation, see :mod:`coordinator.worker`) in a worker process,
    with the expert memory limit (address space, on device cpu: CUDA reserves more than it uses) and
    ``timeout``; return its result. :class:`ExpertWorkerError` when it fails; :class:`Interrupted`
    when the coordinator stops, after killing the worker (a stranger's model never outlives the
    coordinator's orderly stop; after a SIGKILL of the coordinator, its restart waits for the same
    worker, found by its spec)."""
    from coordinator.jobs import run_job

    if config.device == "cpu":
        spec = spec.model_copy(update={"memory_limit": config.expert_memory_bytes()})
    db = StateDB(config.data_dir / EXPERTS_DB)
    try:
        job = db.current_job()
        if job is not None and job.spec == spec:
            job_id = job.id
        else:
            job_id = db.create_job(0, spec)
        row = run_job(db, job_id, log_dir=config.data_dir / "logs" / "experts", timeout=timeout, stop=stop)
        if row.status not in ("done", "failed"):
            if row.pid > 0:  # (killpg(0) would be our own group)
                with contextlib.suppress(ProcessLookupError):  # it leads its own process group
                    os.killpg(row.pid, signal.SIGKILL)
            db.update_job(job_id, status="failed", message="stopped with the coordinator", failure="stopped")
            raise Interrupted()
    finally:
        db.close()
    if row.status == "done" and row.result is not None:
        return row.result
    message = row.message
    if row.failure == "out_of_memory":
        message = f"ran out of its memory limit of {config.expert_memory_bytes()} bytes ({message})"
    raise ExpertWorkerError(f"{spec.kind} worker failed: {message}"[:1000])


def evaluate_spec(config: CoordinatorConfig, path: Path, split: str) -> EvaluateJob:
    """What :func:`evaluate_here` needs to score ``path`` on the coordinator's tasks."""
    return EvaluateJob(path=path, split=split, tasks=list(config.tasks), seed=config.eval_seed,
                       limit=config.eval_limit if split == "search" else config.test_limit,
                       batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens, device=config.device,
                       backend=config.eval_backend)


def evaluate_here(spec: EvaluateJob) -> dict[str, float]:
    """Scores of the model folder ``spec.path`` on ``spec.tasks``, in this process; a non-finite
    score is an error (a hostile model must not poison the ranking)."""
    from umm.eval import evaluate_folder as score_folder

    result = score_folder(spec.path, list(spec.tasks), split=spec.split, limit=spec.limit,  # type: ignore[arg-type]
                          seed=spec.seed, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                          device=spec.device, show_progress=False, backend=spec.backend)
    scores = {name: float(s.score) for name, s in result.scores.items()}
    bad = [n for n, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise UmmError(f"evaluation of {spec.path} gave non-finite scores on {', '.join(bad)}")
    return scores


def evaluate_folder(config: CoordinatorConfig, path: Path, split: str,
                    stop: threading.Event | None = None) -> dict[str, float]:
    """Scores of the model in ``path`` on the coordinator's tasks (``split``: search or test),
    computed in a worker process (:func:`run_in_worker`, ``evaluation_timeout``)."""
    result = run_in_worker(config, evaluate_spec(config, path, split), config.evaluation_timeout, stop)
    return dict(result.scores)


def classify_transfer_error(e: BaseException) -> tuple[str, str]:
    """(``rejected`` | ``failed``, reason) of a failed download, by the error's type only:
    ``rejected`` when the model itself is at fault (:attr:`TransferError.permanent`: too large, a
    wrong or invalid manifest, bytes that do not match it); ``failed`` (retried next round) for
    unreachable, slow or interrupted providers and any other error. The message is only shown."""
    from umm.net.errors import TransferError

    shown = " | ".join(line.strip() for line in str(e).splitlines()[:3])
    if isinstance(e, TransferError) and e.permanent:
        return "rejected", f"{e.what}: {shown}"
    return "failed", shown


@dataclass(frozen=True)
class FetchCandidate:
    """An announced expert without a verdict, as the fetch budget sees it."""

    manifest_hash: str
    owner: str  # contributor's public key
    address: str  # announced gRPC host:port
    self_score: float  # mean self-reported score (untrusted: only an ordering hint)
    first_seen: float
    attempts: int  # failed fetches so far
    last_attempt: float  # time of the last failed fetch (0: never)
    in_store: bool  # fetched before (e.g. a round interrupted before admission): costs nothing


def fetch_wait(config: CoordinatorConfig, attempts: int) -> float:
    """Seconds before an expert whose fetch failed ``attempts`` times is tried again.

    ``fetch_backoff * (2**(attempts-1) - 1)``, at most ``fetch_backoff_max``: the first failure is
    retried at the next round (a blip), later ones wait ``fetch_backoff``, 3x, 7x, ... that."""
    if attempts <= 0:
        return 0.0
    return min(config.fetch_backoff * (2.0 ** min(attempts - 1, 60) - 1.0), config.fetch_backoff_max)


def select_fetches(config: CoordinatorConfig, candidates: list[FetchCandidate], now: float) -> list[str]:
    """The experts a round fetches (and so admits and evaluates): a bounded set, so that a flood of
    announcements (one peer with many keys or records) cannot make a round long.

    Experts already in the store are always taken (no transfer). The others are taken in order of
    fewer failed fetches, higher mean self-reported score, newer first sighting, skipping those still
    in back-off (:func:`fetch_wait`), until ``max_new_experts_per_round`` are taken, with at most
    ``max_new_experts_per_owner`` per contributor key, ``max_new_experts_per_address`` per
    announced address and, if set, ``max_new_experts_per_host`` per host (any port). The rest
    wait for a later round."""
    chosen = [c.manifest_hash for c in candidates if c.in_store]
    per_owner: dict[str, int] = {}
    per_address: dict[str, int] = {}
    per_host: dict[str, int] = {}
    host_cap = config.max_new_experts_per_host
    order = sorted((c for c in candidates if not c.in_store),
                   key=lambda c: (c.attempts, -c.self_score, -c.first_seen, c.manifest_hash))
    taken = 0
    for c in order:
        if taken >= config.max_new_experts_per_round:
            break
        if c.attempts and now < c.last_attempt + fetch_wait(config, c.attempts):
            continue
        host = c.address.rsplit(":", 1)[0]
        if (per_owner.get(c.owner, 0) >= config.max_new_experts_per_owner
                or per_address.get(c.address, 0) >= config.max_new_experts_per_address
                or (host_cap is not None and per_host.get(host, 0) >= host_cap)):
            continue
        for counts, k in ((per_owner, c.owner), (per_address, c.address), (per_host, host)):
            counts[k] = counts.get(k, 0) + 1
        chosen.append(c.manifest_hash)
        taken += 1
    return chosen


def _mean_self_score(record: dict) -> float:
    vals = [v for v in (record.get("self_scores") or {}).values() if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else 0.0


@dataclass
class RoundContext:
    """What a round needs from the running coordinator."""

    config: CoordinatorConfig
    db: StateDB
    store: Any  # umm.net.store.ModelStore
    records: Any  # umm.net.records.NetworkRecords
    address: str  # our checkpoint service host:port
    refresher: Any = None  # umm.net.records.Refresher
    servicer: Any = None  # umm.net.server.CheckpointServicer
    stop: threading.Event | None = None
    #: test hook: called after each finished step with (round, step)
    on_step: Callable[[int, str], None] | None = None


class RoundRunner:
    """Runs (or resumes) one round; see module docstring."""

    def __init__(self, ctx: RoundContext):
        self.ctx = ctx
        self.config = ctx.config
        self.db = ctx.db

    # driver -------------------------------------------------------------------------------
    def run(self, number: int | None = None) -> RoundRow:
        """Resume the unfinished round (or ``number``), else start a new one; returns its row."""
        db = self.db
        if number is None:
            number = db.unfinished_round()
        if number is None:
            number = db.start_round()
            logger.info("round %d started", number)
        else:
            logger.info("round %d resumed", number)
        results = RoundResults()
        try:
            for name in STEPS:
                if self.ctx.stop is not None and self.ctx.stop.is_set():
                    return db.round(number)  # type: ignore[return-value]
                step = db.step(number, name)
                if step is not None and step.status == "done":
                    setattr(results, name, step.result)
                    continue
                db.begin_step(number, name)
                result = getattr(self, f"step_{name}")(number, results)
                db.finish_step(number, name, result)
                setattr(results, name, result)
                if self.ctx.on_step is not None:
                    self.ctx.on_step(number, name)
                if isinstance(result, Ending) and result.end_round:
                    db.update_round(number, state=result.state, reason=result.reason, phase="idle",
                                    finished_at=time.time())
                    break
        except Interrupted:
            logger.info("round %d interrupted; it resumes on the next start", number)
        except Exception as e:
            logger.exception("round %d failed in step %s", number, db.round(number).phase)
            db.update_round(number, state="failed", reason=f"{type(e).__name__}: {e}"[:2000], phase="idle",
                            finished_at=time.time())
        return db.round(number)  # type: ignore[return-value]

    # steps --------------------------------------------------------------------------------
    def step_discover(self, number: int, results: RoundResults) -> DiscoverStep:
        seen = []
        for owner, entry in self.ctx.records.experts().items():
            rec = entry.record
            self.db.upsert_expert(rec.manifest_hash, owner.decode("ascii", "replace"), rec.name, list(rec.domains),
                                  rec.address, dict(rec.dict()))
            seen.append(rec.manifest_hash)
        seen = sorted(set(seen))
        logger.info("round %d: %d expert(s) announced", number, len(seen))
        return DiscoverStep(experts=seen)

    def _todo(self, results: RoundResults) -> list[str]:
        """This round's fetch set: announced experts without a verdict, bounded by :func:`select_fetches`."""
        candidates = []
        for h in results.discover.experts:
            if self.db.verdict(h) is not None:
                continue
            e = self.db.expert(h)
            f = self.db.fetch(h)
            failed = f is not None and f.status == "failed"
            candidates.append(FetchCandidate(
                h, e.owner if e else "", e.address if e else "", _mean_self_score(e.record if e else {}),
                e.first_seen if e else 0.0, f.attempts if failed else 0, f.updated_at if failed else 0.0,
                self.ctx.store.has(h)))
        chosen = select_fetches(self.config, candidates, time.time())
        if len(chosen) < len(candidates):
            logger.info("fetching %d of %d expert(s) without a verdict; the rest wait (budget or back-off)",
                        len(chosen), len(candidates))
        return chosen

    def step_fetch(self, number: int, results: RoundResults) -> FetchStep:
        """Download the new experts into the store's quarantine, ``fetch_concurrency`` at a time.

        Each download is bounded (minimum rate, per-file deadline, address policy: see
        :func:`umm.net.transfer.download`), so a slow or hostile provider costs its own expert a
        failed fetch and never holds the round. Models stay quarantined (not served) until
        admission promotes them.
        """
        from concurrent.futures import ThreadPoolExecutor, as_completed

        fetched, failed, rejected = [], [], []
        todo = {}
        for h in self._todo(results):
            if self.ctx.store.has(h) or self.ctx.store.quarantined(h):
                fetched.append(h)
            else:
                todo[h] = self._providers(h)  # DHT lookups stay on this thread
        with ThreadPoolExecutor(max_workers=self.config.fetch_concurrency, thread_name_prefix="umm-round-fetch") as pool:
            jobs = {pool.submit(self._download, h, providers): h for h, providers in todo.items()}
            for job in as_completed(jobs):
                h, error = jobs[job], job.exception()
                if error is None:
                    self.db.record_fetch(h, "done")
                    fetched.append(h)
                    continue
                if self.ctx.stop is not None and self.ctx.stop.is_set():
                    continue  # interrupted below, once every download has stopped
                status, reason = classify_transfer_error(error)
                self.db.record_fetch(h, status, reason)
                if status == "rejected":
                    self.db.record_verdict(h, False, reason)
                    rejected.append(h)
                else:
                    failed.append(h)
                logger.warning("fetch of %s %s: %s", h[:12], status, reason)
        if self.ctx.stop is not None and self.ctx.stop.is_set():
            raise Interrupted()
        order = {h: i for i, h in enumerate(results.discover.experts)}
        return FetchStep(**{name: sorted(hs, key=order.__getitem__) for name, hs in
                            (("fetched", fetched), ("failed", failed), ("rejected", rejected))})

    def _providers(self, manifest_hash: str) -> list[str]:
        """The announced address of an expert, then the peers that say they serve it."""
        expert = self.db.expert(manifest_hash)
        providers = [expert.address] if expert else []
        try:
            providers += [e.record.address for e in self.ctx.records.providers(manifest_hash).values()]
        except Exception as e:
            logger.info("provider lookup for %s failed: %s", manifest_hash[:12], e)
        return providers

    def _download(self, manifest_hash: str, providers: list[str]) -> None:
        from umm.net.transfer import download

        cfg = self.config
        download(manifest_hash, providers, self.ctx.store, max_bytes=cfg.max_model_bytes, retries=cfg.fetch_retries,
                 timeout=cfg.fetch_timeout, min_rate=cfg.fetch_min_rate, progress=False, cancel=self.ctx.stop,
                 policy=cfg.address_policy(), quarantine=True)

    def step_admit(self, number: int, results: RoundResults) -> AdmitStep:
        admitted, rejected = [], []
        for h in results.fetch.fetched:
            if self.db.verdict(h) is None:
                try:
                    self._admit_one(h)
                except Interrupted:
                    raise
                except Exception as e:
                    logger.exception("round %d: admission of %s failed", number, h[:12])
                    self._reject(h, f"admission failed: {type(e).__name__}: {e}".splitlines()[0][:1000])
            (admitted if self.db.verdict(h).admitted else rejected).append(h)
        return AdmitStep(admitted=admitted, rejected=rejected)

    def _admit_one(self, h: str) -> None:
        """Admit or reject expert ``h`` in a worker process; its record must match its files."""
        spec = AdmitJob(path=self.ctx.store.candidate_path(h), max_total_bytes=self.config.max_model_bytes,
                        budget=self.config.model_budget)
        try:
            out = run_in_worker(self.config, spec, self.config.admission_timeout, self.ctx.stop)
        except ExpertWorkerError as e:
            self._reject(h, f"admission failed: {e}")
            return
        if not out.admitted:
            self._reject(h, out.reason)
            return
        expert = self.db.expert(h)
        claimed = expert.record if expert else {}
        found = {"architecture": out.architecture, "tokenizer": out.tokenizer, "num_parameters": out.num_parameters}
        lies = [f"{key} {str(claimed[key])[:16]} (files: {str(value)[:16]})" for key, value in found.items()
                if claimed.get(key) not in (None, value)]
        if lies:
            self._reject(h, "record does not match the files: " + "; ".join(lies), **found)
            return
        self.ctx.store.promote(h)  # out of quarantine: served and evaluated from the store from now on
        self.db.record_verdict(h, True, "admitted", **found)

    def _reject(self, manifest_hash: str, reason: str, **fingerprint: Any) -> None:
        """Record the verdict, then drop the bytes: the store (which we serve) keeps admitted models only."""
        self.db.record_verdict(manifest_hash, False, reason, **fingerprint)
        self.ctx.store.remove(manifest_hash)

    def step_evaluate(self, number: int, results: RoundResults) -> EvaluateStep:
        bench = benchmark_key(self.config, "search")
        verdicts = self.db.verdicts()
        evaluated, failed = [], []
        for h in results.discover.experts:
            v = verdicts.get(h)
            if v is None or not v.admitted:
                continue
            if self.db.evaluation(h, bench) is None:
                t0 = time.perf_counter()
                try:
                    scores = evaluate_folder(self.config, self.ctx.store.path(h), "search", self.ctx.stop)
                except Interrupted:
                    raise
                except Exception as e:
                    self._reject(h, f"evaluation failed: {type(e).__name__}: {e}"[:1000],
                                 architecture=v.architecture, tokenizer=v.tokenizer,
                                 num_parameters=v.num_parameters)
                    failed.append(h)
                    continue
                self.db.record_evaluation(h, bench, "search", scores, time.perf_counter() - t0)
                logger.info("round %d: evaluated %s: %s", number, h[:12], scores)
            evaluated.append(h)
        return EvaluateStep(evaluated=evaluated, failed=failed)

    def step_rank(self, number: int, results: RoundResults) -> RankStep:
        from umm.net.records import ExpertVerdict, ScoresRecord

        bench = benchmark_key(self.config, "search")
        evals = self.db.evaluations(bench)
        verdicts = self.db.verdicts()
        admitted = {h: domain_scores(self.config, evals[h].scores) for h in results.evaluate.evaluated
                    if h in evals and h in verdicts and verdicts[h].admitted}
        rows, ranks = [], {}
        for d, items in rank_per_domain(admitted, {h: self._declared(h) for h in admitted}).items():
            for i, (h, s) in enumerate(items, start=1):
                rows.append((d, i, h, s))
                ranks.setdefault(h, {})[d] = i
        self.db.record_ranks(number, rows)
        experts = {}
        for h in self._published_verdicts(results.discover.experts, verdicts, ranks):
            v = verdicts.get(h)
            if v is None:
                f = self.db.fetch(h)
                experts[h] = ExpertVerdict(admitted=False, reason=f"not fetched yet: {f.error}"[:1024],
                                           scores={}, ranks={})
                continue
            scores = evals[h].scores if h in evals and v.admitted else {}
            experts[h] = ExpertVerdict(admitted=v.admitted, reason=v.reason[:1024],
                                       scores={k: float(x) for k, x in scores.items()}, ranks=ranks.get(h, {}))
        record = ScoresRecord(round=number, updated_at=time.time(), experts=experts)
        published = self._publish("scores", lambda ttl: self.ctx.records.publish_scores(record, ttl=ttl))
        return RankStep(ranks=rows, published=published, record=record.dict())

    def _published_verdicts(self, announced: list[str], verdicts: dict[str, VerdictRow],
                            ranks: dict[str, dict[str, int]]) -> list[str]:
        """Announced experts with a verdict or a fetch attempt, ranked ones first (best rank first),
        then admitted, then the others; at most ``max_published_verdicts`` (the scores record's size)."""
        known = [h for h in announced if h in verdicts or self.db.fetch(h) is not None]
        known.sort(key=lambda h: (min(ranks[h].values()) if ranks.get(h) else math.inf,
                                  not (h in verdicts and verdicts[h].admitted), h))
        return known[: self.config.max_published_verdicts]

    def _publish(self, name: str, fn: Callable[[float], bool], withdraw: Callable[[float], bool] | None = None) -> bool:
        """Store a record now and keep it refreshed; ``withdraw`` runs when the coordinator stops."""
        if self.ctx.refresher is not None:
            return self.ctx.refresher.add(name, fn, withdraw=withdraw)
        return bool(fn(2 * self.config.refresh_period))

    def _candidates(self, results: RoundResults) -> list[Candidate]:
        bench = benchmark_key(self.config, "search")
        evals = self.db.evaluations(bench)
        verdicts = self.db.verdicts()
        out = []
        for h in results.evaluate.evaluated:
            v = verdicts.get(h)
            if v and v.admitted and h in evals:
                out.append(Candidate(h, v.architecture, v.tokenizer, domain_scores(self.config, evals[h].scores),
                                     self._declared(h)))
        return out

    def _declared(self, manifest_hash: str) -> frozenset[str]:
        """The domains the expert's record declares (they break score ties only)."""
        expert = self.db.expert(manifest_hash)
        return frozenset(expert.domains if expert else ())

    def step_plan(self, number: int, results: RoundResults) -> PlanStep:
        if not self.config.merge:
            return PlanStep(kind="none", reason="merging is off (merge: false)", end_round=True, state="verified")
        plan = plan_round(self._candidates(results), previous=self._previous_model(number), family=self._base_family())
        if plan.kind == "none":
            return PlanStep(**plan.model_dump(), end_round=True, state="verified")
        if plan.kind == "combine" and self.config.fusion.data is None:
            return PlanStep(**{**plan.model_dump(), "kind": "none", "end_round": True, "state": "verified",
                               "reason": "experts span several architectures: fusion needs fusion.data in the config"})
        same = self._same_merge_as(number, sorted(plan.models))
        if same is not None:
            return PlanStep(**{**plan.model_dump(), "end_round": True, "state": "no_improvement",
                               "reason": f"no new expert since round {same}: the same experts cannot improve "
                                         "on its merge"})
        self.db.update_round(number, method=plan.kind, sources=plan.models)
        return PlanStep(**plan.model_dump())

    def _base_family(self) -> tuple[str, str] | None:
        """(architecture, tokenizer) fingerprints of ``base_model`` (None without one)."""
        if self.config.base_model is None:
            return None
        from umm.checkpoints.fingerprint import fingerprint
        from umm.checkpoints.reader import Checkpoint

        with Checkpoint.open(self.config.base_model) as ckpt:
            fp = fingerprint(ckpt)
        return (fp.architecture, fp.tokenizer or "")

    def _previous_model(self, number: int) -> str:
        """The manifest hash of the merged model published before round ``number`` ("" if none, or if
        the store lost it)."""
        previous = self.db.last_published_round(before=number)
        return previous.merged_hash if previous is not None and self.ctx.store.has(previous.merged_hash) else ""

    def _same_merge_as(self, number: int, experts: list[str]) -> int | None:
        """The latest earlier round whose finished job merged exactly ``experts`` (same settings)."""
        for r in self.db.rounds():
            if r.number < number and r.state in ("published", "no_improvement") and r.merged_hash \
                    and sorted(r.sources) == experts:
                return r.number
        return None

    def step_job(self, number: int, results: RoundResults) -> JobStep:
        from coordinator.jobs import run_job

        plan = results.plan
        job = self.db.round_job(number)
        job_id = job.id if job is not None else self.db.create_job(number, self._job_spec(number, plan))
        job = run_job(self.db, job_id, log_dir=self.config.data_dir / "logs", timeout=self.config.job_timeout,
                      stop=self.ctx.stop)
        if job.status == "failed":
            return JobStep(job=job_id, end_round=True, state="failed",
                           reason=f"{plan.kind} job {job_id} failed: {job.message}")
        if job.status != "done":
            raise Interrupted()
        return JobStep(job=job_id, output=job.result)

    def _job_spec(self, number: int, plan: Plan) -> CombineJob:
        """The job of ``plan``: its models from the store, the coordinator's tasks, device and settings."""
        cfg = self.config
        path = self.ctx.store.path
        return CombineJob(models=[path(h) for h in plan.models], pivot=path(plan.pivot), base_model=cfg.base_model,
                          previous=path(plan.previous) if plan.previous else None, tasks=list(cfg.tasks),
                          weights=task_weights(cfg), search_size=cfg.eval_limit, test_size=cfg.test_limit,
                          batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, device=cfg.device,
                          seed=cfg.eval_seed + number, run_dir=cfg.data_dir / "jobs" / f"round-{number}",
                          settings=cfg.combine_settings())

    def step_evaluate_result(self, number: int, results: RoundResults) -> EvaluateResultStep:
        """The job's test comparison, by manifest hash: the merged model, the experts, the previous model."""
        from umm.checkpoints.manifest import build_manifest

        output = results.job.output
        manifest_hash = build_manifest(output.model_dir).hash
        wanted = {h for h in [*results.plan.models, results.plan.previous] if h}
        merged, others = None, {}
        for row in output.comparison.rows:  # the job names each model by its folder; a store folder by its hash
            if row.path is not None and Path(row.path) == output.model_dir:
                merged = row
            elif row.path is not None and Path(row.path).name in wanted:
                others[Path(row.path).name] = row
        if merged is None:
            raise UmmError(f"the job's comparison has no row for its merged model {output.model_dir}")
        families = {h: self._family(h) for h in others}
        families[manifest_hash] = families.get(results.plan.pivot, "")  # merged in the pivot's family
        self.db.update_round(number, scores=merged.scores, objective=merged.objective, merged_hash=manifest_hash,
                             recipe_hash=output.recipe_hash, method=output.method)
        return EvaluateResultStep(manifest_hash=manifest_hash, scores=merged.scores, objective=merged.objective,
                                  source_scores={h: r.scores for h, r in others.items()},
                                  source_objectives={h: r.objective for h, r in others.items()},
                                  families=families, decision=output.decision)

    def _family(self, manifest_hash: str) -> str:
        """``model_type:architecture fingerprint[:8]`` of an admitted expert ("" if unknown)."""
        v = self.db.verdict(manifest_hash)
        model_type = ""
        try:
            model_type = json.loads((self.ctx.store.path(manifest_hash) / "config.json").read_text()).get("model_type", "")
        except (OSError, ValueError, AttributeError, UmmError):  # unreadable, or no longer in the store
            pass
        arch = v.architecture[:8] if v is not None else ""
        return f"{model_type}:{arch}" if arch else str(model_type)

    def step_publish(self, number: int, results: RoundResults) -> PublishStep:
        """Publish the merged model only when the job's decision says it beats the best source and the
        previous model (paired-bootstrap lower bounds above ``margin``); else end ``no_improvement``."""
        from umm.net.records import MergedRecord

        ev, output = results.evaluate_result, results.job.output
        previous = self.db.last_published_round(before=number)
        self.db.update_round(number, previous_objective=previous.objective if previous else 0.0)
        decision = ev.decision
        if decision is None or not decision.published:
            return PublishStep(end_round=True, state="no_improvement",
                               reason=decision.text if decision is not None else "the job made no decision")
        h = ev.manifest_hash
        if not self.ctx.store.has(h):
            self.ctx.store.add_folder(output.model_dir)
        manifest = self.ctx.store.manifest(h)
        best = decision.diff_vs_best_source
        prev = decision.diff_vs_previous
        record = MergedRecord(
            round=number, name=f"{self.config.network}-round-{number}", manifest_hash=h,
            total_bytes=manifest.total_bytes, address=self.ctx.address,
            sources=[*results.plan.models, *([results.plan.previous] if results.plan.previous else [])],
            method=output.method, recipe_hash=output.recipe_hash, scores=dict(ev.scores),
            source_scores={k: dict(s) for k, s in ev.source_scores.items()}, published_at=time.time(),
            decision=decision.text[:1024], diff_vs_best_source=[best.diff, best.ci_low, best.ci_high],
            diff_vs_previous=[prev.diff, prev.ci_low, prev.ci_high] if prev is not None else [],
        )
        published = self._publish("merged", lambda ttl: self.ctx.records.publish_merged(record, ttl=ttl))
        self._publish("provider", lambda ttl: self.ctx.records.announce_provider(h, self.ctx.address, ttl=ttl),
                      withdraw=lambda ttl: self.ctx.records.withdraw_provider(h, ttl=ttl))
        self.db.update_round(number, published=1)
        return PublishStep(end_round=True, state="published", reason=decision.text, dht_stored=published,
                           record=record.dict())
