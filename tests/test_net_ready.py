"""The ready-file: a typed, atomic hand-off from a started node or coordinator to its launcher."""

from __future__ import annotations

import os

import pytest

from umm.net.ready import Ready, ReadyFileError, clear_ready, read_ready, write_ready

READY = Ready(role="coordinator", network="net", peer_id="QmPeer", pid=os.getpid(),
              initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"], checkpoint_address="127.0.0.1:2",
              status_address="127.0.0.1:3")


def test_a_ready_file_reads_back_as_written_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ready" / "coordinator.json"
    assert read_ready(path) is None  # not yet ready
    write_ready(path, READY)
    assert read_ready(path) == READY
    assert [p.name for p in path.parent.iterdir()] == ["coordinator.json"]
    write_ready(path, READY.model_copy(update={"pid": 7}))  # replaced whole
    assert read_ready(path).pid == 7
    clear_ready(path)
    clear_ready(path)  # idempotent
    clear_ready(None)
    assert read_ready(path) is None


@pytest.mark.parametrize("text", ["", "{}", "not json", '{"role": "observer"}',
                                  READY.model_dump_json()[:-1] + ', "extra": 1}'])
def test_a_file_that_is_not_a_ready_file_is_refused(tmp_path, text):
    path = tmp_path / "ready.json"
    path.write_text(text)
    with pytest.raises(ReadyFileError, match="not a umm ready-file"):
        read_ready(path)
