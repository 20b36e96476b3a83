"""``--push-to-hub``: the upload plan (files, card, commit message) checked without a network, and
the upload through a stand-in HfApi (the real hub cannot be reached from the tests)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from umm.checkpoints import hub
from umm.cli import app


@pytest.fixture(scope="module")
def merged(tiny_models, tmp_path_factory):
    from umm.merge.disk import merge
    from umm.merge.recipe import MergeRecipe

    out = tmp_path_factory.mktemp("push") / "merged"
    merge(MergeRecipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tiny_models["base"]), "parameters": {"weight": 1}},
        {"model": str(tiny_models["math"]), "parameters": {"weight": 1}}]}), out)
    return out


class FakeApi:
    """Records what would be sent to the hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))

        class Info:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"

        return Info()


def test_the_plan_lists_the_model_files_the_card_and_the_message(merged):
    (merged / ".hidden").write_text("x")
    plan = hub.plan_push(merged, "me/merged", private=True, commit_message="merge it")
    assert plan.repo_id == "me/merged" and plan.private and plan.commit_message == "merge it"
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "umm_recipe.yaml"} <= set(plan.files)
    assert ".hidden" not in plan.files and list(plan.files) == sorted(plan.files)
    assert plan.card == (merged / "README.md").read_text() and "base_model_relation" not in plan.card
    assert plan.total_bytes > 0
    assert hub.plan_push(merged, "me/merged").commit_message == "Upload merged with umm"


@pytest.mark.parametrize("repo", ["noslash", "bad//id", "a/b/c", "-x/y"])
def test_a_bad_repo_id_is_refused_before_any_upload(merged, repo):
    with pytest.raises(hub.HubPushError, match="org/name"):
        hub.plan_push(merged, repo)


def test_only_a_finished_model_folder_is_pushed(tmp_path):
    with pytest.raises(hub.HubPushError, match="config.json"):
        hub.plan_push(tmp_path, "me/x")


def test_the_upload_creates_the_repo_if_needed_and_sends_the_planned_files(merged, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    api = FakeApi()
    result = hub.push_folder(merged, "me/merged", private=True, commit_message="m", api=api)
    (create, upload) = api.calls
    assert create == ("create_repo", "me/merged", {"private": True, "repo_type": "model", "exist_ok": True})
    assert upload[2]["folder_path"] == str(merged.absolute()) and upload[2]["commit_message"] == "m"
    assert upload[2]["allow_patterns"] == list(result.plan.files)
    assert result.commit_url.endswith("/commit/abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubPushError, match="HF_HUB_OFFLINE"):
        hub.push_folder(merged, "me/merged", api=FakeApi())


def test_umm_merge_push_to_hub_uploads_the_output(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tiny_models["base"]), "parameters": {"weight": 1}},
        {"model": str(tiny_models["code"]), "parameters": {"weight": 1}}]}))
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "--push-to-hub", "me/o", "--private"])
    assert res.exit_code == 0, res.output
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"] and api.calls[0][2]["private"] is True
    assert "pushed" in res.output
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "p"), "--push-to-hub", "noslash"])
    assert res.exit_code == 2 and "org/name" in res.output and not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["evolve", "fuse"])
def test_evolve_and_fuse_refuse_a_bad_push_target_before_any_work(command, tmp_path):
    """The examples name suite: models, which would be built first: the repo id is checked before."""
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / f"{command}.yaml"
    res = CliRunner().invoke(app, [command, str(example), "--push-to-hub", "noslash"])
    assert res.exit_code == 2 and "org/name" in res.output


@pytest.mark.parametrize("published", [True, False])
def test_umm_combine_pushes_only_a_model_its_decision_publishes(merged, tmp_path, monkeypatch, published):
    """The run itself is stood in for (tests/test_combine_run.py runs it): what is checked is that the
    hub gets the merged model only when the decision publishes it."""
    from types import SimpleNamespace

    import huggingface_hub

    from umm.cli import combine as combine_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    decision = SimpleNamespace(published=published, text="published: merged beats ..." if published else "no improvement")
    monkeypatch.setattr(combine_cli, "_combine", lambda *a, **k: SimpleNamespace(model_dir=merged, decision=decision))
    res = CliRunner().invoke(app, ["combine", str(tmp_path / "c.yaml"), "--push-to-hub", "me/combined"])
    assert res.exit_code == 0, res.output
    if published:
        assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
        assert api.calls[1][2]["commit_message"].startswith("umm combine: published")
    else:
        assert api.calls == [] and "not pushed to me/combined" in res.output
    res = CliRunner().invoke(app, ["combine", str(tmp_path / "c.yaml"), "--push-to-hub", "noslash"])
    assert res.exit_code == 2 and "org/name" in res.output
