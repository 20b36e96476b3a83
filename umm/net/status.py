"""The one client of a coordinator's ``CoordinatorStatus`` gRPC service (``protos/umm_coordinator.proto``).

``umm-coordinator status`` and ``umm net local`` read a running coordinator through
:func:`fetch_status`; the server lives with the coordinator (``coordinator/status.py``). Values
come back as the generated protobuf messages, typed by ``umm_coordinator_pb2.pyi``.
"""

from __future__ import annotations

from dataclasses import dataclass

from umm.net.errors import NetError
from umm.net.proto import umm_coordinator_pb2 as pb

#: leaderboard domains that are not a ranking (see coordinator/status.py)
REJECTED_DOMAIN = "rejected"
PENDING_DOMAIN = "pending"
MERGED_DOMAIN = "merged"


class StatusUnavailable(NetError):
    """The coordinator's status service did not answer (wrong address, not running, too busy)."""


@dataclass(frozen=True)
class CoordinatorView:
    """What a coordinator's status service says, at one moment."""

    status: pb.StatusResponse
    leaderboard: list[pb.LeaderboardEntry]
    rounds: list[pb.Round]  # most recent first

    def round(self, number: int) -> pb.Round | None:
        """Round ``number``, if it is among :attr:`rounds`."""
        return next((r for r in self.rounds if r.number == number), None)

    def expert_names(self) -> dict[str, str]:
        """Manifest hash -> name of every ranked expert."""
        skip = (REJECTED_DOMAIN, PENDING_DOMAIN, MERGED_DOMAIN)
        return {e.manifest_hash: e.name for e in self.leaderboard if e.domain not in skip and e.name}


def fetch_status(address: str, *, timeout: float = 10.0, limit: int = 20) -> CoordinatorView:
    """Status, leaderboard and the ``limit`` most recent rounds (0: all) of the coordinator at ``address``.

    :class:`StatusUnavailable` when the service does not answer within ``timeout`` seconds.
    """
    import grpc

    from umm.net.proto import umm_coordinator_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStatusStub(channel)
        try:
            status = stub.GetStatus(pb.StatusRequest(), timeout=timeout)
            board = stub.GetLeaderboard(pb.LeaderboardRequest(), timeout=timeout)
            rounds = stub.ListRounds(pb.ListRoundsRequest(limit=limit), timeout=timeout)
        except grpc.RpcError as e:
            raise StatusUnavailable(
                f"cannot reach the coordinator status service at {address}: {e.code().name}: {e.details()}; "
                "check the address (printed by `umm-coordinator run`) and that the coordinator is running"
            ) from None
    return CoordinatorView(status, list(board.entries), list(rounds.rounds))
