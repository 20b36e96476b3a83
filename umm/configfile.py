"""Reading a YAML config file: one path rule and one way of explaining what is wrong.

**Path rule.** A relative path in a config file is relative to the folder that holds the config
file, whether or not it exists yet (``~`` is expanded; absolute paths stay). A reference with a
scheme, such as ``suite:full/math`` or ``instructions:list=1000``, is not a path: the command
line turns it into one before the config is loaded. The one documented exception is where
``umm fuse`` writes its results (``output``, ``teacher_cache``): like ``umm evolve --run-dir``,
they are relative to the current directory, so running an example never writes into the
checkout's ``examples/`` folder.

**Errors.** A missing file, a YAML syntax error (with its line and column) and every pydantic
validation error (with the dotted key path, and for an unknown key the valid keys of its section)
are reported in one format that names the file, as the caller's :class:`~umm.errors.UmmError`
subclass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from umm.errors import UmmError

T = TypeVar("T", covariant=True)

#: ``suite:...``, ``instructions:...``: references the command line resolves, not paths
_REFERENCE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


class Strict(BaseModel):
    """A config model or section: an unknown key is an error (which :func:`explain` lists the
    valid keys for), and a loaded config is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ParseConfig(Protocol[T]):
    """A module's ``parse_config(data, *, source, base_dir)``: validate a mapping into its model."""

    def __call__(self, data: Any, *, source: str, base_dir: Path | None) -> T: ...


def read_yaml(path: Path, error: type[UmmError], *, missing_hint: str = "") -> Any:
    """The parsed YAML of ``path``; ``error`` when the file is missing, unreadable or not YAML."""
    if not path.is_file():
        raise error(f"config file not found: {path}{missing_hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid YAML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path), error)


def parse_yaml(text: str, source: str, error: type[UmmError]) -> Any:
    """The parsed YAML ``text`` (safe loader: plain data only); ``error`` naming ``source`` and the
    line and column of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(_yaml_problem(source, exc)) from None


def _yaml_problem(path: Path | str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"


def resolve_path(value: Any, base_dir: Path | None) -> Any:
    """``value`` as the path rule reads it (see the module docstring); non-strings are returned as is.

    Without ``base_dir`` (a mapping that came from no file) only ``~`` is expanded.
    """
    if not isinstance(value, (str, Path)) or (isinstance(value, str) and _REFERENCE.match(value)):
        return value
    p = Path(value).expanduser()
    if base_dir is None or p.is_absolute():
        return str(p)
    return str((base_dir / p).resolve())


def resolve_paths(data: dict[str, Any], keys: Iterable[str], base_dir: Path | None) -> dict[str, Any]:
    """A copy of ``data`` whose ``keys`` (each a path or a list of paths) follow the path rule."""
    out = dict(data)
    for key in keys:
        if isinstance(out.get(key), list):
            out[key] = [resolve_path(v, base_dir) for v in out[key]]
        elif key in out:
            out[key] = resolve_path(out[key], base_dir)
    return out


def explain(exc: ValidationError, title: str, sections: Mapping[str, type[BaseModel]]) -> str:
    """Every error of ``exc`` on its own line under ``title``, named by its dotted key path.

    ``sections`` maps a section key (``""`` for the top level) to its model, so an unknown key
    lists the valid keys of the section it sits in.
    """
    lines = [title]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = next((p for p in reversed(loc[:-1]) if p in sections), "")
            lines.append(f"  unknown key '{where}'; valid keys here: {', '.join(sections[section].model_fields)}")
        else:
            lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path,
    parse: ParseConfig[T],
    error: type[UmmError],
    *,
    overrides: Mapping[str, Any] | None = None,
    missing_hint: str = "",
) -> T:
    """Read the YAML config at ``path`` and validate it with ``parse`` (relative paths against its folder).

    ``overrides`` replace top-level keys when not ``None`` (the command line's flags); they are
    read by the same path rule as the file's own values.
    """
    p = Path(path)
    data = read_yaml(p, error, missing_hint=missing_hint)
    if isinstance(data, dict):
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse(data, source=str(p), base_dir=p.parent.resolve())
