"""The one YAML-config loader (``umm.configfile``): its path rule and its error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from umm.configfile import explain, load_config, read_yaml, resolve_path, resolve_paths
from umm.errors import UmmError


class _Err(UmmError):
    pass


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 1


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str]
    out: str | None = None
    inner: _Inner = _Inner()


_SECTIONS: dict[str, type[BaseModel]] = {"": _Cfg, "inner": _Inner}


def _parse(data: Any, *, source: str, base_dir: Path | None) -> _Cfg:
    data = resolve_paths(data, ["models"], base_dir)
    try:
        return _Cfg.model_validate(data)
    except ValidationError as exc:
        raise _Err(explain(exc, f"invalid test config {source}:", _SECTIONS)) from None


def test_relative_paths_are_relative_to_the_config_folder_whether_or_not_they_exist(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "here").mkdir()
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text("models: [here, not/yet, /abs/m, '~/m', 'suite:full/math']\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("cfg/c.yaml"), _parse, _Err, overrides={"out": "o", "inner": None})
    assert cfg.models == [str(tmp_path / "cfg" / "here"), str(tmp_path / "cfg" / "not" / "yet"), "/abs/m",
                          str(Path("~/m").expanduser()), "suite:full/math"]  # a reference is not a path
    assert cfg.out == "o" and cfg.inner.size == 1  # a None override leaves the file's value


def test_without_a_file_only_the_home_is_expanded():
    assert resolve_path("rel/m", None) == "rel/m"
    assert resolve_path("~/m", None) == str(Path.home() / "m")
    assert resolve_path(3, tmp := Path("/x")) == 3 and resolve_path(None, tmp) is None
    assert resolve_paths({"a": "m", "b": "m"}, ["a"], Path("/x")) == {"a": "/x/m", "b": "m"}


def test_a_missing_file_names_the_file_and_the_hint(tmp_path):
    with pytest.raises(_Err, match=r"config file not found: .*missing.yaml; run init"):
        load_config(tmp_path / "missing.yaml", _parse, _Err, missing_hint="; run init")


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - a\n  - [b\n")
    with pytest.raises(_Err) as e:
        read_yaml(path, _Err)
    msg = str(e.value)
    assert msg.startswith(f"{path}, line ") and "column" in msg and "not valid YAML" in msg
    (tmp_path / "latin.yaml").write_bytes(b"models: [\xe9]\n")
    with pytest.raises(_Err, match="not valid YAML: not UTF-8"):
        read_yaml(tmp_path / "latin.yaml", _Err)


def test_validation_errors_name_the_file_the_key_path_and_the_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: [m]\ninner: {size: big, colour: red}\nmodles: [x]\n")
    with pytest.raises(_Err) as e:
        load_config(path, _parse, _Err)
    lines = str(e.value).splitlines()
    assert lines[0] == f"invalid test config {path}:"
    assert "  inner.size: Input should be a valid integer, unable to parse string as an integer" in lines
    assert "  unknown key 'inner.colour'; valid keys here: size" in lines
    assert "  unknown key 'modles'; valid keys here: models, out, inner" in lines
