"""Start a hivemind DHT for a umm network, with our record validators and identity.

hivemind runs the DHT node in a forked background process. Start it before creating gRPC
servers or channels in the same process (gRPC does not like being forked under it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from umm.net.errors import NetError
from umm.net.keys import load_or_create_key
from umm.net.records import check_network, make_validators

logger = logging.getLogger(__name__)

LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)


def start_dht(
    network: str,
    identity_path: str | os.PathLike[str],
    *,
    host_maddrs: Sequence[str] = LOOPBACK_MADDRS,
    announce_maddrs: Sequence[str] | None = None,
    initial_peers: Sequence[str] = (),
    coordinator_public_key: bytes | None = None,
    client_mode: bool = False,
    startup_timeout: float = 30.0,
    **dht_kwargs,
):
    """Start and return a ``hivemind.DHT`` for ``network`` (call ``.shutdown()`` when done).

    ``identity_path`` holds the peer's RSA key (created if missing): it fixes the peer id and
    signs the records (see :mod:`umm.net.keys`). ``host_maddrs`` are the libp2p listen addresses
    (loopback by default; ``/ip4/0.0.0.0/tcp/<port>`` to accept other machines), and
    ``initial_peers`` the multiaddrs of running peers to join (none for the first peer).
    """
    import hivemind

    check_network(network)
    identity_path = Path(identity_path)
    key = load_or_create_key(identity_path)
    validators = make_validators(network, key, coordinator_public_key)
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers) or None,
            start=True,
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=str(identity_path),
            record_validators=validators,
            client_mode=client_mode,
            startup_timeout=startup_timeout,
            **dht_kwargs,
        )
    except Exception as e:
        hint = " (check that the initial peers are running and reachable)" if initial_peers else ""
        raise NetError(f"could not start the DHT for network {network!r}: {e}{hint}") from e
    logger.info("DHT for %s started: %s", network, ", ".join(visible_maddrs(dht)))
    return dht


def visible_maddrs(dht) -> list[str]:
    """Multiaddrs (with ``/p2p/<peer id>``) that other peers can pass as ``initial_peers``."""
    return [str(m) for m in dht.get_visible_maddrs()]
