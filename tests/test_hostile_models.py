"""Hostile model folders (issue 13, findings 2 and 3): each is refused with its reason, in-process
and inside a coordinator round, and an honest expert in the same round is still admitted and scored.

Every folder is a real tiny model (``tests/conftest.py``) with one thing made hostile: sizes that
crash transformers (zero heads), JSON nested thousands of levels deep (config, tokenizer, safetensors
header), a binary ``vocab.txt``, ``added_tokens`` that is not a list, and memory bombs: a config with
100,000 layers, one with more layers than its weights hold, and a GPT-Neo whose
``max_position_embeddings`` makes every attention layer allocate a P×P mask when loaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.checkpoints import (
    AdmissionLimits,
    CheckpointError,
    CheckpointTooLargeError,
    CorruptCheckpointError,
    InvalidConfigError,
    ModelBudget,
    admit,
)

DEEP = 5000  # far past Python's recursion limit (1000)
Builder = Callable[[Path, Path], Path]  # (read-only base folder, destination) -> hostile folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _deep(n: int = DEEP) -> str:
    return "[" * n + "]" * n


def _json_edit(file: str, **changes: object) -> Builder:
    """A builder: a copy of the base folder with ``changes`` set in its JSON ``file``."""
    def build(base: Path, dst: Path) -> Path:
        _edit_json(_copy(base, dst) / file, **changes)
        return dst
    return build


def _deep_payload(file: str) -> Builder:
    """A builder: a copy of the base folder whose JSON ``file`` also holds a key nested DEEP levels."""
    def build(base: Path, dst: Path) -> Path:
        path = _copy(base, dst) / file
        path.write_text(path.read_text().rstrip().rstrip("}") + f', "payload": {_deep()}}}')
        return dst
    return build


def deep_header(base: Path, dst: Path) -> Path:
    path = _copy(base, dst) / "model.safetensors"
    header = ('{"__metadata__": {"format": "pt"}, "payload": ' + _deep() + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return dst


def binary_vocab(base: Path, dst: Path) -> Path:
    folder = _copy(base, dst)
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").write_bytes(bytes(range(256)) * 8)
    return dst


def gpt_neo_positions(dst: Path, positions: int) -> Path:
    """A 2-layer GPT-Neo (hidden 8) whose config and position embedding say ``positions``: its
    files stay small (positions × 8 floats) while loading it allocates positions² bytes per layer."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from umm.experts.random_models import make_tokenizer

    config = GPTNeoConfig(
        vocab_size=384, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, window_size=16,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    GPTNeoForCausalLM(config).save_pretrained(dst)  # built small; only the files are made big
    make_tokenizer(384).save_pretrained(dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["transformer.wpe.weight"] = torch.randn(positions, 8) * 0.02
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    _edit_json(dst / "config.json", max_position_embeddings=positions)
    return dst


#: name -> (builder, expected error type, expected words of the reason)
ATTACKS = {
    "zero_heads": (_json_edit("config.json", num_attention_heads=0), InvalidConfigError, "num_attention_heads = 0"),
    "zero_kv_heads": (_json_edit("config.json", num_key_value_heads=0), InvalidConfigError,
                      "num_key_value_heads = 0"),
    "deep_config": (_deep_payload("config.json"), CorruptCheckpointError, "nests deeper than 64 levels"),
    "deep_tokenizer": (_deep_payload("tokenizer.json"), CorruptCheckpointError, "nests deeper than 64 levels"),
    "deep_header": (deep_header, CorruptCheckpointError, "nests deeper than 64 levels"),
    "binary_vocab": (binary_vocab, CorruptCheckpointError, "vocab.txt: is not UTF-8"),
    "added_tokens_int": (_json_edit("tokenizer.json", added_tokens=7), CorruptCheckpointError,
                         "added_tokens is not a list"),
    "many_layers": (_json_edit("config.json", num_hidden_layers=100_000), CheckpointTooLargeError,
                    "num_hidden_layers = 100000, over the admission budget"),
    # within the layer budget, but the files hold 2 layers: refused by the parameter count, unbuilt
    "more_layers_than_stored": (_json_edit("config.json", num_hidden_layers=1000), InvalidConfigError,
                                "the weights hold"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_folder_is_refused_with_its_reason(attack: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    build, error, words = ATTACKS[attack]
    folder = build(tiny_models["base"], tmp_path / attack)
    with pytest.raises(error, match=words):
        admit(folder)


def test_gpt_neo_position_bomb_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """~640 KB of files; loading would allocate 2 × 20000² bytes of masks (800 MB)."""
    folder = gpt_neo_positions(tmp_path / "neo", 20_000)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    with pytest.raises(CheckpointTooLargeError, match="800000000 bytes of buffers.*max_buffer_bytes"):
        admit(folder)
    small = gpt_neo_positions(tmp_path / "neo-small", 256)  # the same model with a sane context is fine
    assert admit(small).num_parameters > 0
    with pytest.raises(CheckpointTooLargeError, match="max_positions"):
        admit(small, AdmissionLimits(budget=ModelBudget(max_positions=128)))


def test_budget_bounds_every_size_key_and_gpt_neo_attention_types(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    budget = ModelBudget(max_hidden_size=32, max_vocab_size=100, max_intermediate_size=10)
    for field, words in (("max_hidden_size", "hidden_size = 64"), ("max_vocab_size", "vocab_size = 384"),
                         ("max_intermediate_size", "intermediate_size")):
        with pytest.raises(CheckpointTooLargeError, match=words):
            admit(folder, AdmissionLimits(budget=ModelBudget(**{field: getattr(budget, field)})))
    _edit_json(folder / "config.json", num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(InvalidConfigError, match="does not divide"):
        admit(folder)
    _edit_json(folder / "config.json", num_key_value_heads=None, hidden_size="64")
    with pytest.raises(InvalidConfigError, match="hidden_size = '64'"):
        admit(folder)
    from umm.checkpoints.budget import check_config_budget

    with pytest.raises(CheckpointTooLargeError, match="attention_types"):  # expanded per layer by transformers
        check_config_budget({"attention_types": [[["global"], 10**9]]}, "x")
    check_config_budget({"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_heads": [3, 6]}}, "x")
    with pytest.raises(CheckpointTooLargeError, match=r"\(vision_config\).*num_heads = 5000"):
        check_config_budget({"vision_config": {"num_heads": [3, 5000]}}, "x")


def test_transformers_failures_on_a_strangers_config_are_checkpoint_errors(tiny_models: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """Whatever transformers raises while building from a stranger's config is that folder's error."""
    folder = _copy(tiny_models["base"], tmp_path / "m")
    _edit_json(folder / "config.json", rope_scaling={"rope_type": "no-such-rope", "factor": []})
    with pytest.raises(CheckpointError, match="transformers cannot build this model"):
        admit(folder)


# --- a coordinator round (no network: records are given directly, bytes are already in the store) ----

class _Entry:
    def __init__(self, record):
        self.record = record


class OfflineRecords:
    """The records a round reads and writes, without a DHT."""

    def __init__(self, experts: dict[str, tuple[Path, str]]):
        self.expert_entries = experts
        self.scores: list = []

    def experts(self) -> dict:
        from umm.checkpoints import Checkpoint, fingerprint
        from umm.checkpoints.manifest import build_manifest
        from umm.net.records import ExpertRecord

        out = {}
        for name, (folder, _) in self.expert_entries.items():
            manifest = build_manifest(folder)
            try:  # what an honest contributor announces; a hostile folder claims anything
                with Checkpoint.open(folder) as ckpt:
                    fp = fingerprint(ckpt)
                claim = {"architecture": fp.architecture, "tokenizer": fp.tokenizer or "",
                         "num_parameters": fp.num_parameters}
            except CheckpointError:
                claim = {"architecture": "claimed", "tokenizer": "claimed", "num_parameters": 1000}
            out[name.encode()] = _Entry(ExpertRecord(
                name=name, domains=["math"], **claim,
                manifest_hash=manifest.hash, total_bytes=manifest.total_bytes, address="127.0.0.1:9",
                self_scores={}, base_model=None, software_version="test",
            ))
        return out

    def publish_scores(self, record, ttl: float) -> bool:
        self.scores.append(record)
        return True


def _round(tmp_path: Path, folders: dict[str, Path], **settings: object):
    from coordinator.config import parse_config
    from coordinator.db import StateDB
    from coordinator.round import RoundContext, RoundRunner
    from umm.net.store import ModelStore

    cfg = parse_config({"data_dir": str(tmp_path / "coord"), "tasks": ["synth-math"], "eval_limit": 2,
                        "max_new_tokens": 4, "eval_batch_size": 2, "merge": False, "max_model_bytes": 5_000_000,
                        **settings})
    store = ModelStore(cfg.data_dir)
    hashes = {name: store.add_folder(folder) for name, folder in folders.items()}
    records = OfflineRecords({name: (folder, hashes[name]) for name, folder in folders.items()})
    db = StateDB(cfg.data_dir / "state.db")
    runner = RoundRunner(RoundContext(cfg, db, store, records, "127.0.0.1:5000"))
    return runner, db, store, hashes, records


def test_hostile_experts_are_rejected_and_the_round_goes_on(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Admission and evaluation run in worker processes (address space limited to 6 GiB here):
    each hostile expert is rejected with its reason, the honest one is admitted, scored and ranked,
    the round ends ``verified``, and the next round does too.

    With the buffer budget lifted, a GPT-Neo whose masks need 90000² bytes (8.1 GB) per layer, from
    2.9 MB of files, passes admission; loading it for evaluation exhausts its worker's memory limit.
    """
    names = ("zero_heads", "deep_tokenizer")  # one of each kind of crash; the other attacks: see above
    folders = {"honest": tiny_models["math"]}
    folders.update({n: ATTACKS[n][0](tiny_models["base"], tmp_path / n) for n in names})
    folders["neo"] = gpt_neo_positions(tmp_path / "neo", 90_000)
    runner, db, store, hashes, records = _round(tmp_path, folders, expert_memory_limit=6 * 2**30,
                                                model_budget={"max_buffer_bytes": 32 * 2**30})
    row = runner.run()
    assert row.state == "verified", row.reason
    honest = db.verdict(hashes["honest"])
    assert honest.admitted and honest.reason == "admitted", honest.reason
    for name in names:
        v = db.verdict(hashes[name])
        assert not v.admitted and ATTACKS[name][2] in v.reason, (name, v.reason)
    neo = db.verdict(hashes["neo"])
    assert not neo.admitted and "evaluation failed" in neo.reason, neo.reason
    assert "ran out of its memory limit of 6442450944 bytes" in neo.reason, neo.reason
    assert store.list() == [hashes["honest"]]  # rejected bytes are dropped from the served store
    published = records.scores[-1].experts
    assert published[hashes["honest"]].ranks == {"math": 1}
    assert set(published[hashes["honest"]].scores) == {"synth-math"}
    assert not published[hashes["zero_heads"]].admitted

    again = runner.run()  # verdicts are kept: nothing fails the next round either
    assert again.number == row.number + 1 and again.state == "verified", again.reason


def test_a_worker_past_its_timeout_or_memory_is_the_experts_rejection(tiny_models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """The worker is stopped at the deadline (its process group killed) and that is a typed error
    with the reason; the caller (step_admit / step_evaluate) records it as the expert's rejection.
    When the coordinator stops, the worker is killed too: a stranger's model never outlives it."""
    import threading

    import psutil

    from coordinator.config import parse_config
    from coordinator.db import StateDB
    from coordinator.jobspec import AdmitJob
    from coordinator.round import EXPERTS_DB, ExpertWorkerError, Interrupted, run_in_worker
    from umm.checkpoints.budget import ModelBudget

    cfg = parse_config({"data_dir": str(tmp_path), "tasks": ["synth-math"]})
    spec = AdmitJob(path=tiny_models["base"], max_total_bytes=10**9, budget=ModelBudget())
    with pytest.raises(ExpertWorkerError, match="admit worker failed: stopped after the job timeout of 0 s"):
        run_in_worker(cfg, spec, timeout=0.2)
    low = parse_config({"data_dir": str(tmp_path / "low"), "tasks": ["synth-math"],
                        "expert_memory_limit": 256 * 2**20})  # torch alone needs more address space
    with pytest.raises(ExpertWorkerError, match="ran out of its memory limit of 268435456 bytes"):
        run_in_worker(low, spec, timeout=300)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    with pytest.raises(Interrupted):
        run_in_worker(cfg, spec, timeout=300, stop=stop)
    job = StateDB(cfg.data_dir / EXPERTS_DB).job(2)
    assert job.kind == "admit" and job.status == "failed" and job.message == "stopped with the coordinator"
    with contextlib.suppress(psutil.NoSuchProcess):  # killed (SIGKILL), not left running
        assert psutil.Process(job.pid).wait(timeout=60) == -signal.SIGKILL
