"""Boolean flags of every command (umm, umm-node, umm-coordinator) read and show as --x/--no-x:
no ``<bool>`` metavar in any --help (it invited ``--overwrite true``, which fails)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from node.cli import app as node_app
from umm.cli import app as umm_app

runner = CliRunner()


def _commands(group: typer.core.TyperCommand, path: tuple[str, ...] = ()):
    yield path, group
    if hasattr(group, "list_commands"):  # typer bundles its own click: duck-typed
        ctx = type(group).context_class(group)
        for name in group.list_commands(ctx):
            yield from _commands(group.get_command(ctx, name), (*path, name))


def _every_command():
    for app in (umm_app, node_app, coordinator_app):
        for path, cmd in _commands(typer.main.get_command(app)):
            yield pytest.param(app, path, cmd, id=" ".join([app.info.name or "umm", *path]))


@pytest.mark.parametrize(("app", "path", "cmd"), list(_every_command()))
def test_help_shows_no_bool_metavar_and_every_flag_has_its_negation(app, path, cmd):
    res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output
    for p in cmd.params:
        if p.param_type_name == "option" and p.is_flag and not p.count and p.name != "help":
            assert p.secondary_opts, f"{' '.join(path)} {p.opts[0]}: write it as --x/--no-x"
            assert f"{p.opts[0]} / {p.secondary_opts[0]}" in res.output


def test_no_overwrite_and_overwrite_both_parse(tiny_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_models['base']}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("occupied")
    res = runner.invoke(umm_app, ["merge", str(recipe), str(out), "--dry-run", "--no-overwrite"])
    assert res.exit_code == 2 and "already exists" in " ".join(res.output.split())
    res = runner.invoke(umm_app, ["merge", str(recipe), str(out), "--dry-run", "--overwrite"])
    assert res.exit_code == 0, res.output
