"""Teacher pass: top-k content, cache hits, layouts in the key, resume after a crash, refused tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import umm.fusion.teacher as teacher_mod
from umm.errors import UmmError
from umm.fusion.data import InstructionData, tokenize_data
from umm.fusion.teacher import TeacherOutputs, cache_key, teacher_pass

RECORDS = [
    {"instruction": f"Compute {i} + {i + 1}.", "response": f"The answer is {i} + {i + 1} = {2 * i + 1}. #### {2 * i + 1}"}
    for i in range(6)
]


@pytest.fixture(scope="module")
def neox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umm.experts.random_models import make_random_neox

    return make_random_neox(tmp_path_factory.mktemp("neox") / "neox", seed=3)


@pytest.fixture(scope="module")
def data() -> InstructionData:
    return InstructionData.from_records(RECORDS)


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.safetensors"))}


def test_topk_content_matches_a_direct_forward(neox: Path, data: InstructionData, tmp_path: Path) -> None:
    from umm.checkpoints.loading import load_causal_lm, load_tokenizer

    out = teacher_pass(neox, data, tmp_path, k=4, batch_size=3, shard_sequences=4, max_length=64,
                       show_progress=False)
    assert len(out) == 6 and out.k == 4 and len(out.index["shards"]) == 2
    tok = load_tokenizer(neox)
    item = tokenize_data(tok, data, 64).items[4]
    seq = out[4]
    assert seq is not None and item is not None
    assert seq.gold_ids.tolist() == item.response_ids
    model = load_causal_lm(neox)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([item.input_ids])).logits[0]
    lp = torch.log_softmax(logits[item.n_prompt - 1 : -1], -1)
    top = lp.topk(4, -1)
    assert torch.equal(seq.topk_ids, top.indices)
    assert torch.allclose(seq.topk_logprobs, top.values, atol=2e-2)  # stored as float16
    ce = -lp.gather(1, torch.tensor(item.response_ids).view(-1, 1)).mean()
    assert seq.ce == pytest.approx(float(ce), rel=1e-4)
    dense_fp16 = 2 * len(tok)
    assert out.bytes_per_token < dense_fp16 / 5
    assert out.n_tokens == sum(len(it.response_ids) for it in tokenize_data(tok, data, 64).items if it)


def test_resume_after_crash_gives_identical_shards(
    neox: Path, data: InstructionData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(k=3, batch_size=1, shard_sequences=2, max_length=64, show_progress=False)
    ref = teacher_pass(neox, data, tmp_path / "ref", **kw)

    real = teacher_mod._forward_batch
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # second batch of the second shard: mid-shard
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(teacher_mod, "_forward_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        teacher_pass(neox, data, tmp_path / "cut", **kw)
    cut_dir = next((tmp_path / "cut").iterdir())
    with pytest.raises(UmmError, match="unfinished"):
        TeacherOutputs(cut_dir)
    assert len(_shard_bytes(cut_dir)) == 1

    calls["n"] = 0
    monkeypatch.setattr(teacher_mod, "_forward_batch", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    resumed = teacher_pass(neox, data, tmp_path / "cut", **kw)
    assert calls["n"] == 4  # only the two unfinished shards were computed again
    assert _shard_bytes(resumed.dir) == _shard_bytes(ref.dir)
    a, b = dict(ref.index), dict(resumed.index)
    for ix in (a, b):
        ix.pop("compute_seconds")
    assert a == b


def test_reports_the_sequences_it_runs(neox: Path, data: InstructionData, tmp_path: Path, recorder) -> None:
    teacher_pass(neox, data, tmp_path, k=2, batch_size=4, max_length=64, on_progress=recorder)
    (bar,) = recorder.bars
    assert bar.desc == f"teacher {neox.name}" and bar.unit == "seq"
    assert bar.total == bar.done == len(data) and bar.closed


def test_cache_hit_and_new_key_per_k(neox: Path, data: InstructionData, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    first = teacher_pass(neox, data, tmp_path, k=2, max_length=64, show_progress=False)

    def no_load(*a, **k):
        raise AssertionError("a cached teacher pass must not load the model")

    monkeypatch.setattr("umm.checkpoints.loading.load_causal_lm", no_load)
    again = teacher_pass(neox, data, tmp_path, k=2, max_length=64, show_progress=False)
    assert again.dir == first.dir
    with pytest.raises(AssertionError, match="cached"):
        teacher_pass(neox, data, tmp_path, k=3, max_length=64, show_progress=False)


def test_layout_is_part_of_the_cache_key(neox: Path, data: InstructionData, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from umm.checkpoints.loading import load_tokenizer

    keys = {layout: cache_key("m", "d", 4, 64, layout) for layout in ("chat", "plain", "raw")}
    assert len(set(keys.values())) == 3 and cache_key("m", "d", 4, 64, "raw") == keys["raw"]
    kw = dict(k=2, max_length=64, show_progress=False)
    plain = teacher_pass(neox, data, tmp_path, layout="plain", **kw)
    raw = teacher_pass(neox, data, tmp_path, layout="raw", **kw)
    assert plain.dir != raw.dir and (plain.layout, raw.layout) == ("plain", "raw")
    assert plain.key.startswith(plain.dir.name.rsplit("-", 1)[1]) and raw.key != plain.key
    tok = load_tokenizer(neox)
    item = tokenize_data(tok, data, 64, layout="raw").items[2]
    assert item is not None and raw[2] is not None
    assert raw[2].gold_ids.tolist() == item.response_ids  # the pass really ran in the raw layout
    assert item.input_ids[: item.n_prompt] == tok(RECORDS[2]["instruction"])["input_ids"]

    def no_load(*a, **k):
        raise AssertionError("a cached teacher pass must not load the model")

    monkeypatch.setattr("umm.checkpoints.loading.load_causal_lm", no_load)
    assert teacher_pass(neox, data, tmp_path, layout="auto", **kw).dir == plain.dir  # auto = plain here
    with pytest.raises(UmmError, match="layout 'chat' needs a chat template"):
        teacher_pass(neox, data, tmp_path / "chat", layout="chat", **kw)
    assert not (tmp_path / "chat").exists()


def test_remote_code_tokenizer_is_refused(neox: Path, data: InstructionData, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(neox, evil)
    cfg_path = evil / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.EvilTokenizer", None]}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UmmError, match="custom code"):
        teacher_pass(evil, data, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # refused before any output is written
