"""Progress reaches the caller through :class:`umm.progress.ProgressSink`; the library draws no bar.

A recording sink (the ``recorder`` fixture) stands in for the terminal: each library function
reports the bars the CLI used to draw (description, unit, total) and advances them to the end;
``None`` is silent.
"""

from __future__ import annotations

import pytest

from umm.checkpoints.admission import admit
from umm.checkpoints.manifest import build_manifest, verify_folder
from umm.merge import MergeRecipe
from umm.merge.disk import merge
from umm.progress import SILENT, open_bar, track
from umm.ui import Bars, progress_sink


def test_none_is_silent_and_track_advances_per_item_then_closes(recorder):
    assert open_bar(None, 3, "x", "it") is SILENT
    assert list(track([1, 2], None, "x", "it")) == [1, 2]
    seen = []
    for item in track(["a", "b", "c"], recorder, "letters", "letter"):
        seen.append((item, recorder.bars[0].done))
    (bar,) = recorder.bars
    assert seen == [("a", 0), ("b", 1), ("c", 2)]
    assert (bar.total, bar.desc, bar.unit, bar.done, bar.closed) == (3, "letters", "letter", 3, True)


def test_ui_terminal_sink_is_only_built_on_request(monkeypatch, recorder):
    monkeypatch.setenv("UMM_NO_PROGRESS", "1")  # a real tqdm bar, switched off
    assert progress_sink(None, False) is None
    assert progress_sink(recorder, True) is recorder
    sink = progress_sink(None, True)
    assert isinstance(sink, Bars)
    bar = sink.start(10, "bytes", "B")
    bar.advance(4, best="0.5")
    bar.advance(6)
    bar.close()


def test_manifest_hashing_reports_its_bytes(tiny_models, recorder):
    manifest = build_manifest(tiny_models["math"], on_progress=recorder)
    verify_folder(tiny_models["math"], manifest, on_progress=recorder)
    hashing, verifying = recorder.bars
    assert hashing.desc == "hashing math" and verifying.desc == "verifying math"
    for bar in recorder.bars:
        assert bar.unit == "B" and bar.total == bar.done == manifest.total_bytes and bar.closed


def test_admission_reports_the_tensors_it_scans(tiny_models, recorder):
    admit(tiny_models["math"], on_progress=recorder)
    (bar,) = recorder.bars
    assert bar.desc == "scanning math" and bar.unit == "tensor"
    assert bar.total == bar.done > 0 and bar.closed


@pytest.mark.parametrize("sink", [None, "recorder"])
def test_merge_reports_the_output_bytes(tiny_models, tmp_path, sink, recorder):
    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(tiny_models["math"]), "parameters": {"weight": 0.5}},
        {"model": str(tiny_models["code"]), "parameters": {"weight": 0.5}},
    ]})
    rec = recorder if sink else None
    summary = merge(recipe, tmp_path / "out", on_progress=rec)
    if rec is not None:
        (bar,) = rec.bars
        assert bar.desc == "merge (linear)" and bar.unit == "B"
        assert bar.total == bar.done == summary.output_bytes and bar.closed


def test_evaluate_reports_generation_and_the_scoring_of_code(tiny_models, one_thread, recorder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umm.eval import evaluate, get_task

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    tasks = ["synth-math", "synth-code"]
    evaluate(model, tok, tasks, limit=3, batch_size=2, max_new_tokens=4, num_threads=1, on_progress=recorder)
    expected = []
    for name in tasks:
        expected.append(f"{name} (search)")
        if get_task(name).kind == "code":  # only code is slow to score (the sandbox)
            expected.append(f"{name} (scoring)")
    assert "synth-code (scoring)" in expected
    assert [b.desc for b in recorder.bars] == expected
    assert all(b.unit == "sample" and b.total == b.done == 3 and b.closed for b in recorder.bars)
