"""Model references (umm/checkpoints/hub.py): folders, hub ids through an offline hub cache the test
builds itself in huggingface_hub's layout, and each failure cause's own error."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from umm.checkpoints import hub
from umm.cli import app

REV1 = "1" * 40
REV2 = "2" * 40


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Store ``folder``'s files as huggingface_hub does: ``models--org--name/blobs/<sha256>``,
    ``snapshots/<commit>/<file>`` symlinks to the blobs, ``refs/<name>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            blob = repo / "blobs" / digest
            if not blob.exists():
                shutil.copyfile(f, blob)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch, tiny_models) -> Path:
    """HF_HOME in tmp, HF_HUB_OFFLINE=1, holding org/base (main), org/math (two commits, tag v2)."""
    home = tmp_path / "hf"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_in_cache(cache, "org/base", tiny_models["base"], REV1)
    put_in_cache(cache, "org/math", tiny_models["code"], REV1, refs=())
    put_in_cache(cache, "org/math", tiny_models["math"], REV2, refs=("main", "v2"))
    return cache


def test_org_name_resolves_to_the_cached_snapshot_of_main(offline_cache):
    r = hub.resolve("org/base")
    assert r.folder == offline_cache / "models--org--base" / "snapshots" / REV1
    assert r.repo_id == "org/base" and r.revision == REV1 and r.adapter is None
    assert (r.folder / "model.safetensors").is_file()


def test_org_name_at_revision_resolves_a_commit_or_a_tag(offline_cache):
    snaps = offline_cache / "models--org--math" / "snapshots"
    assert hub.resolve(f"org/math@{REV1}").folder == snaps / REV1
    assert hub.resolve("org/math@v2").folder == snaps / REV2
    assert hub.resolve("org/math").folder == snaps / REV2


def test_a_repo_missing_from_the_cache_while_offline_says_how_to_download_it(offline_cache):
    with pytest.raises(hub.NotCachedOfflineError) as e:
        hub.resolve("org/missing")
    msg = str(e.value)
    assert "org/missing" in msg and "HF_HUB_OFFLINE" in msg and "hf download org/missing" in msg
    with pytest.raises(hub.NotCachedOfflineError, match="--revision nope"):
        hub.resolve("org/math@nope")


def test_a_local_path_that_does_not_exist_is_not_found_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("./nope", "/no/such/model", "a/b/c"):
        with pytest.raises(hub.ModelNotFoundError, match="model folder not found") as e:
            hub.resolve(ref)
        assert "org/name" in str(e.value)


def test_home_is_expanded_and_an_existing_folder_wins_over_a_hub_id(tiny_models, tmp_path, monkeypatch, offline_cache):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_models["base"], tmp_path / "m")
    assert hub.resolve("~/m").folder == tmp_path / "m"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["base"], tmp_path / "org" / "base")
    assert hub.resolve("org/base").folder == Path("org/base")  # a folder named like the id: the folder


def test_a_lora_adapter_given_as_a_model_says_to_write_base_plus_adapter(offline_cache, tmp_path, tiny_models):
    from test_hub_lora import make_adapter

    adapter = make_adapter(tmp_path / "lora", tiny_models["base"], rank=2, alpha=4)
    put_in_cache(offline_cache, "org/lora", adapter, REV1)
    with pytest.raises(hub.AdapterAsModelError, match=r"BASE\+ADAPTER") as e:
        hub.resolve("org/lora")
    assert "adapter" in str(e.value)
    r = hub.resolve("org/base+org/lora")
    assert r.folder.name == REV1 and r.adapter is not None and (r.adapter / "adapter_config.json").is_file()
    with pytest.raises(hub.AdapterNotSupportedError, match="umm merge"):
        hub.resolve_folder("org/base+org/lora")


def test_a_pickle_only_repo_is_refused_with_the_reason(offline_cache, tmp_path, tiny_models):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(tiny_models["base"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    put_in_cache(offline_cache, "org/pickled", pickled, REV1)
    with pytest.raises(hub.PickleOnlyError, match="unpickling runs arbitrary code") as e:
        hub.resolve("org/pickled")
    assert "pytorch_model.bin" in str(e.value)


@pytest.mark.parametrize(("raised", "expected", "words"), [
    ("GatedRepoError", hub.GatedRepoError, ("gated", "HF_TOKEN", "https://huggingface.co/org/x")),
    ("RepositoryNotFoundError", hub.HubRepoNotFoundError, ("no such repo", "HF_TOKEN")),
    ("RevisionNotFoundError", hub.HubRepoNotFoundError, ("no revision",)),
])
def test_a_missing_or_gated_repo_names_the_token_and_the_fix(monkeypatch, tmp_path, raised, expected, words):
    """Online errors of huggingface_hub (raised by a stand-in: there is no network here) become ours."""
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    exc_type = getattr(errors, raised)

    def fake(*a, **k):
        exc = exc_type.__new__(exc_type)  # their constructors want an HTTP response; none exists here
        Exception.__init__(exc, "stand-in")
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(expected) as e:
        hub.resolve("org/x@main" if raised == "RevisionNotFoundError" else "org/x")
    for w in words:
        assert w in str(e.value)


def test_downloads_fetch_safetensors_configs_and_tokenizers_only_and_report_progress(monkeypatch, tmp_path, recorder):
    """What snapshot_download is asked for: no pickle weights, the cache of HF_HOME, our progress."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    seen = {}
    snap = tmp_path / "snap" / REV1
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"")

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        bar = kw["tqdm_class"](total=3, desc="Fetching 3 files")
        bar.update(3)
        bar.close()
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.snapshot("org/x", "v1", on_progress=recorder) == snap
    assert seen["repo_id"] == "org/x" and seen["revision"] == "v1" and seen["local_files_only"] is False
    assert seen["cache_dir"] == tmp_path / "hf" / "hub"
    allow, ignore = seen["allow_patterns"], seen["ignore_patterns"]
    assert "*.safetensors" in allow and "*.json" in allow and "tokenizer.model" in allow and "*.tiktoken" in allow
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in allow)
    assert {"*.bin", "*.pt", "*.pth", "consolidated*", "*/*"} <= set(ignore)
    (bar,) = recorder.bars
    assert bar.total == 3 and bar.done == 3 and "org/x" in bar.desc and bar.closed


def _recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_umm_merge_of_a_recipe_naming_hub_ids_runs_offline_from_the_cache(offline_cache, tmp_path):
    from huggingface_hub import ModelCard

    recipe = _recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": "org/base",
        "models": [{"model": "org/base"}, {"model": "org/math@v2", "parameters": {"weight": 0.5}},
                   {"model": f"org/math@{REV1}", "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    })
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["merge", str(recipe), str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/base", "org/math"]
    assert card.data.to_dict()["base_model_relation"] == "merge"
    missing = _recipe(tmp_path / "m.yaml", {"merge_method": "linear", "models": [
        {"model": "org/base", "parameters": {"weight": 1.0}}, {"model": "org/gone", "parameters": {"weight": 1.0}}]})
    res = CliRunner().invoke(app, ["merge", str(missing), str(tmp_path / "never")])
    assert res.exit_code == 2 and "org/gone" in res.output and "HF_HUB_OFFLINE" in res.output
    assert not (tmp_path / "never").exists()


def test_umm_eval_and_config_files_take_hub_ids(offline_cache, tmp_path):
    """`umm eval MODEL` and the model keys of evolve/fuse configs resolve hub ids to cached folders."""
    from umm.cli.common import config_overrides

    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: [org/base, org/math@v2, ./local]\nbase_model: org/base\n")
    over = config_overrides(cfg, model_keys=("models", "base_model"))
    snaps = offline_cache / "models--org--base" / "snapshots"
    assert over["models"][0] == str(snaps / REV1) and over["base_model"] == str(snaps / REV1)
    assert over["models"][1].endswith(REV2) and over["models"][2] == "./local"  # paths: the config's rule
    res = CliRunner().invoke(app, ["eval", "org/missing", "--task", "synth-math", "--limit", "1"])
    assert res.exit_code == 2 and "org/missing" in res.output and "HF_HUB_OFFLINE" in res.output


def test_a_node_gets_plain_files_for_a_hub_id(offline_cache, tmp_path, monkeypatch):
    """`umm-node join --model org/name`: the snapshot's links become plain files its manifest accepts."""
    from umm.checkpoints.manifest import build_manifest

    monkeypatch.setenv("UMM_HOME", str(tmp_path / "umm"))
    folder = hub.resolve_folder("org/base", real_files=True)
    assert folder == tmp_path / "umm" / "hub" / "models--org--base" / REV1
    assert not any(p.is_symlink() for p in folder.iterdir())
    assert build_manifest(folder).files
    assert hub.resolve_folder("org/base", real_files=True) == folder  # made once


def test_the_progress_class_takes_what_huggingface_hub_does_to_its_bars(recorder):
    """snapshot_download drives tqdm_class bars by attributes and helpers, not only update()."""
    bar_class = hub.sink_tqdm(recorder, "org/x")
    bar = bar_class(desc="Downloading bytes", total=0, initial=0, unit="B", unit_scale=True, bar_format="{n}")
    bar.total = 10
    bar.refresh()
    bar.update(4)
    bar.set_postfix_str(str(bar.format_dict.get("rate")), refresh=False)
    bar.set_description_str("Download complete")
    assert not bar.disable and bar.n == 4
    with bar_class.get_lock():
        items = list(bar_class(iter([1, 2]), desc="Fetching 2 files"))
    bar.close()
    assert items == [1, 2]
    assert [(b.desc, b.unit, b.done, b.closed) for b in recorder.bars] == [
        ("download org/x: Downloading bytes", "B", 4, True), ("download org/x: Fetching 2 files", "file", 2, True)]
