"""What a network holds, read from the DHT: experts, the coordinator's leaderboard, the latest merged model.

:func:`read_status` collects it through a :class:`~umm.net.records.NetworkRecords`; :func:`to_json`
and :func:`render` present it (``umm-node status`` and ``umm-node status --json``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from umm.ui import human_bytes, table


@dataclass(frozen=True)
class NetworkStatus:
    network: str
    experts: list[Any]  # Entry[ExpertRecord], sorted by name
    scores: Any | None  # Entry[ScoresRecord] of the coordinator, if any
    merged: Any | None  # Entry[MergedRecord] of the coordinator, if any
    merged_providers: list[str]  # gRPC addresses announcing the merged model
    trusted: bool  # a coordinator key was given (scores and merged are only read then)


def read_status(records: Any) -> NetworkStatus:
    """Read every record of ``records.network`` once."""
    experts = sorted(records.experts().values(), key=lambda e: (e.record.name, e.record.manifest_hash))
    trusted = records.coordinator_public_key is not None
    scores = records.scores() if trusted else None
    merged = records.merged() if trusted else None
    providers: list[str] = []
    if merged is not None:
        providers = sorted({merged.record.address} | {e.record.address for e in records.providers(merged.record.manifest_hash).values()})
    return NetworkStatus(records.network, experts, scores, merged, providers, trusted)


def leaderboard(status: NetworkStatus) -> Iterator[tuple[str, int, str, str, dict[str, float]]]:
    """(domain, rank, expert name, manifest hash, verified scores) in domain then rank order.

    Only experts whose record is still in the DHT are listed: a node that left drops off the
    leaderboard once its record expires, even before the coordinator re-ranks.
    """
    if status.scores is None:
        return
    names = {e.record.manifest_hash: e.record.name for e in status.experts}
    rows = []
    for h, verdict in status.scores.record.experts.items():
        if not verdict.admitted or h not in names:
            continue
        for domain, rank in verdict.ranks.items():
            rows.append((domain, rank, names[h], h, dict(verdict.scores)))
    yield from sorted(rows, key=lambda r: (r[0], r[1], r[3]))


def to_json(status: NetworkStatus) -> dict[str, Any]:
    """A JSON-able summary (stable keys, for scripts)."""
    scores = status.scores.record if status.scores is not None else None
    merged = status.merged.record if status.merged is not None else None
    return {
        "network": status.network,
        "experts": [{**e.record.dict(), "expires_at": e.expiration_time} for e in status.experts],
        "leaderboard": [
            {"domain": d, "rank": r, "name": n, "manifest_hash": h, "scores": s} for d, r, n, h, s in leaderboard(status)
        ],
        "scores_round": scores.round if scores is not None else None,
        "rejected": {h: v.reason for h, v in scores.experts.items() if not v.admitted} if scores is not None else {},
        "merged": {**merged.dict(), "providers": status.merged_providers} if merged is not None else None,
        "coordinator_key_given": status.trusted,
    }


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())) or "-"


def render(status: NetworkStatus, console: Any) -> None:
    """Print the status as tables on ``console`` (a rich Console)."""
    console.print(table(
        f"experts on {status.network!r} ({len(status.experts)})",
        ["name", "domains", "parameters", "size", "manifest", "address", "self-reported"],
        [(r.name, ",".join(r.domains), f"{r.num_parameters:,}", human_bytes(r.total_bytes), r.manifest_hash[:12],
          r.address, _scores_text(r.self_scores)) for r in (e.record for e in status.experts)],
    ))
    if not status.trusted:
        console.print("no --coordinator-key given: the leaderboard and merged models are not shown "
                      "(records of an unknown coordinator are not trusted)")
        return
    rows = list(leaderboard(status))
    if status.scores is None:
        console.print("leaderboard: the coordinator has not published scores yet")
    else:
        console.print(table(f"leaderboard (round {status.scores.record.round})",
                            ["domain", "rank", "expert", "manifest", "verified scores"],
                            [(d, r, n, h[:12], _scores_text(s)) for d, r, n, h, s in rows]))
        rejected = {h: v.reason for h, v in status.scores.record.experts.items() if not v.admitted}
        for h, reason in sorted(rejected.items()):
            console.print(f"rejected {h[:12]}: {reason}", highlight=False)
    if status.merged is None:
        console.print("merged model: none published yet")
    else:
        m = status.merged.record
        console.print(
            f"merged model: round {m.round} {m.name} ({m.method}, {len(m.sources)} sources) manifest {m.manifest_hash} "
            f"{human_bytes(m.total_bytes)}; scores {_scores_text(m.scores)}; providers {', '.join(status.merged_providers)}",
            highlight=False,
        )
