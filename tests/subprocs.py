"""Helpers for tests that start umm's commands as real processes."""

from __future__ import annotations

import signal


def ctrl_c_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT, as a terminal's Ctrl-C would.

    A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across
    exec, so under ``cmd &`` or ``nohup`` Python never installs its KeyboardInterrupt handler and
    the child would not see the test's Ctrl-C at all. A terminal's foreground job has the default.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
