"""The ready-file: how a started node or coordinator tells the process that launched it where it is.

``umm-node join --ready-file PATH`` and ``umm-coordinator run --ready-file PATH`` write a
:class:`Ready` as JSON to ``PATH`` once they serve (and remove it when they leave); a launcher
such as ``umm net local`` reads it with :func:`read_ready` instead of parsing what they print for
people. The file appears whole or not at all (written to a temporary name, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from umm.atomic import write_text_atomic
from umm.net.errors import NetError


class ReadyFileError(NetError):
    """A ready-file exists but does not hold a :class:`Ready` (another program's file, a newer schema)."""


class Ready(BaseModel):
    """A process that serves: who it is and where others reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["node", "coordinator"]
    network: str
    peer_id: str
    pid: int
    #: multiaddrs of its DHT peer: what others pass as ``--initial-peers``
    initial_peers: list[str]
    #: ``host:port`` of its gRPC checkpoint service
    checkpoint_address: str
    #: ``host:port`` of the coordinator's status service ("" for a node)
    status_address: str = ""


def write_ready(path: str | os.PathLike[str], ready: Ready) -> Path:
    """Write ``ready`` to ``path`` as JSON, atomically (a reader sees no file or the whole file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, ready.model_dump_json(indent=1) + "\n")
    return path


def read_ready(path: str | os.PathLike[str]) -> Ready | None:
    """The :class:`Ready` in ``path``; None while the file does not exist; :class:`ReadyFileError` if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return Ready.model_validate_json(text)
    except ValidationError as e:
        raise ReadyFileError(f"{path} is not a umm ready-file: {e.errors()[0]['msg']}") from None


def clear_ready(path: str | os.PathLike[str] | None) -> None:
    """Remove the ready-file at ``path`` (if any): the process no longer serves."""
    if path is not None:
        Path(path).unlink(missing_ok=True)
