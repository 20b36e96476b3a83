"""Session fixture ``small_suite``: the ``small`` tiny expert suite, built once per test session.

Import it in a test module (``from experts_fixtures import small_suite  # noqa: F401``) to get an
:class:`umm.experts.build.ExpertSuite` with models ``base``, ``math``, ``code`` (Llama, byte-level
BPE, fine-tuned from ``base``) and ``list`` (GPT-NeoX, metaspace BPE). Read-only: copy a model
folder before modifying it. Building takes well under a minute on one core.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_suite(tmp_path_factory: pytest.TempPathFactory):
    from umm.experts.build import build_suite

    return build_suite("small", tmp_path_factory.mktemp("experts"))
