"""Shutdown steps with deadlines: a step that hangs is abandoned and the rest of the stop goes on."""

from __future__ import annotations

import logging
import threading

import pytest

from umm.net.shutdown import leave_dht, run_within, stop_server, withdraw_records


class _Hangs:
    """Stands in for a refresher, server or DHT whose call never returns (a peer that never answers)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def _hang(self, name: str) -> bool:
        self.calls.append(name)
        self.release.wait()  # released by the test's clean-up only
        return True

    def withdraw_all(self) -> bool:
        return self._hang("withdraw_all")

    def stop(self, grace: float | None = None) -> bool:
        return self._hang("stop")

    def shutdown(self) -> bool:
        return self._hang("shutdown")


@pytest.fixture()
def hangs():
    h = _Hangs()
    yield h
    h.release.set()


def test_run_within_returns_the_result_or_gives_up_on_a_hanging_call(hangs, caplog):
    assert run_within(lambda: 42, 30, "answering") == (True, 42)
    with caplog.at_level(logging.WARNING, logger="umm.net.shutdown"):
        assert run_within(hangs.withdraw_all, 0.2, "withdrawing") == (False, None)
    assert hangs.calls == ["withdraw_all"] and "withdrawing did not finish" in caplog.text
    with pytest.raises(ZeroDivisionError):  # the call's own error reaches the caller
        run_within(lambda: 1 / 0, 30, "dividing")


def test_hanging_stop_steps_are_abandoned_and_the_next_ones_run(hangs, monkeypatch, tmp_path):
    killed: list[object] = []
    from umm.net import dht

    monkeypatch.setattr(dht, "stop_dht", lambda d, pid_file=None: d.shutdown())
    monkeypatch.setattr(dht, "end_orphaned_dht", lambda pid_file: killed.append(pid_file) or 0)
    withdraw_records(hangs, timeout=0.2)
    stop_server(hangs, grace=None, timeout=0.2)
    leave_dht(hangs, tmp_path / "dht.pids", timeout=0.2)
    assert hangs.calls == ["withdraw_all", "stop", "shutdown"]
    assert killed == [tmp_path / "dht.pids"]  # the DHT that did not shut down is killed by its pid file
