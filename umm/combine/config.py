"""The ``umm combine`` configuration: one frozen pydantic model read from a YAML file.

:class:`CombineSettings` is what a coordinator's config also carries (how to evolve, how to fuse,
the publication margin); :class:`CombineConfig` adds what to combine and how to score it. Unknown
keys are errors naming the valid keys of their section. Relative model paths and ``fusion.data``
are relative to the config file (the path rule of :mod:`umm.configfile`); ``fusion.teacher_cache``
is relative to the current directory, as ``umm fuse``'s outputs. See ``examples/combine.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from umm import configfile
from umm.errors import UmmError
from umm.evolve.config import Budget, EvolveSettings, TaskSpec, check_task_specs, expand_task_names
from umm.fusion.settings import FusionSettings, TrainingSettings


class CombineConfigError(UmmError):
    """The combine config file is missing, unreadable or invalid."""


class FusionStageSettings(FusionSettings):
    """The per-pair fusion settings (the keys and defaults of ``umm fuse``'s config, without its
    models, output and evaluation), plus the vocabulary coverage a source needs to be fused."""

    #: the least fraction of the source's vocabulary that maps exactly onto the pivot's
    #: (:func:`umm.fusion.align.vocab_coverage`); a source below it is dropped
    min_vocab_coverage: float = Field(0.5, ge=0, le=1)


class CombineSettings(configfile.Strict):
    """How a combination runs: the evolve search, the pairwise fusions and the publication margin."""

    evolve: EvolveSettings = Field(default_factory=EvolveSettings)
    fusion: FusionStageSettings = Field(default_factory=FusionStageSettings)
    #: publish only if the 95% CI lower bounds of (merged - best source) and (merged - previous) exceed it
    margin: float = 0.0


class CombineConfig(CombineSettings):
    """Everything ``umm combine`` needs: the settings, the models, the tasks and the device."""

    #: model folders, of one or several families (architecture and tokenizer fingerprints)
    models: list[str] = Field(min_length=2)
    #: the shared base of the pivot's family (used only when it has the pivot's fingerprints)
    base_model: str | None = None
    #: the pivot (one of ``models``); ``None``: the best model of the hardest domain on ``search``
    pivot: str | None = None
    #: the domain that chooses the pivot instead of the hardest one
    pivot_domain: str | None = None
    #: the previously published merged model: compared on ``test``, and a candidate of the merge
    previous: str | None = None
    tasks: list[TaskSpec] = Field(min_length=1)
    seed: int = 0
    device: str = "auto"
    #: generation batch size of the pivot choice and of the test comparison
    eval_batch_size: int = Field(16, ge=1)
    #: cap on generated tokens in the pivot choice and the comparison (``None``: each task's own)
    max_new_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> CombineConfig:
        check_task_specs(self.tasks)
        paths = [_key(m) for m in self.models]
        dup = sorted({m for m, k in zip(self.models, paths) if paths.count(k) > 1})
        if dup:
            raise ValueError(f"models listed twice: {', '.join(dup)}")
        if self.pivot is not None and _key(self.pivot) not in paths:
            raise ValueError(f"pivot {self.pivot} is not one of the models")
        return self


def _key(path: str) -> str:
    """A path as compared between keys (resolved when it can be)."""
    try:
        return str(Path(path).resolve())
    except OSError:
        return path


_SECTIONS: dict[str, type[BaseModel]] = {
    "": CombineConfig, "evolve": EvolveSettings, "budget": Budget, "fusion": FusionStageSettings,
    "training": TrainingSettings, "tasks": TaskSpec,
}
#: keys holding model paths (relative to the config file)
_PATH_KEYS = ("models", "base_model", "pivot", "previous")


def parse_config(data: Any, *, source: str = "<dict>", base_dir: Path | None = None) -> CombineConfig:
    """Validate a mapping into a :class:`CombineConfig`; raises :class:`CombineConfigError` listing
    every problem by its dotted key (e.g. ``fusion.k``)."""
    if not isinstance(data, dict):
        raise CombineConfigError(f"{source}: the config must be a YAML mapping (got {type(data).__name__})")
    data = expand_task_names(configfile.resolve_paths(data, _PATH_KEYS, base_dir))
    fusion = data.get("fusion")
    if isinstance(fusion, dict):
        fusion = configfile.resolve_paths(fusion, ("data",), base_dir)
        if isinstance(fusion.get("teacher_cache"), str):  # an output: relative to the current directory
            fusion["teacher_cache"] = str(Path(fusion["teacher_cache"]).expanduser().absolute())
        data["fusion"] = fusion
    try:
        return CombineConfig.model_validate(data)
    except ValidationError as exc:
        raise CombineConfigError(configfile.explain(exc, f"invalid combine config {source}:", _SECTIONS)) from None


def load_config(path: str | Path, **overrides: Any) -> CombineConfig:
    """Read a YAML config; ``overrides`` (e.g. ``device="cpu"``) replace top-level keys when not ``None``."""
    return configfile.load_config(path, parse_config, CombineConfigError, overrides=overrides)
