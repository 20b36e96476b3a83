"""Optimisation settings of a fusion run, shared by ``umm fuse``'s config and the trainer.

Kept free of torch so that config files can be validated before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from umm import configfile


class TrainingSettings(BaseModel):
    """How the pivot is optimised: the ``training`` section of a fuse config, and the
    optimisation fields of :class:`umm.fusion.train.FusionTrainConfig`."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_grad_norm: float | None = 1.0
    seed: int = 42
    bf16: bool | None = None  # default: on for CUDA
    gradient_checkpointing: bool | None = None  # default: on for CUDA
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class FusionSettings(configfile.Strict):
    """How one fusion runs, whatever it fuses: the instruction data, the teacher passes, the
    vocabulary mapping, the fusion function and the training. ``umm fuse``'s config
    (:class:`umm.fusion.pipeline.FuseConfig`) adds the models, the output and the evaluation;
    ``umm combine``'s ``fusion`` section adds its coverage check."""

    #: instruction-response JSONL the teachers are run on (``umm fuse`` requires it)
    data: Path | None = None
    #: where the teacher passes are cached (``None``: the command's default)
    teacher_cache: Path | None = None
    k: int = Field(10, ge=1)
    max_length: int = Field(2048, ge=2)
    teacher_batch_size: int = Field(8, ge=1)
    layout: Literal["auto", "chat", "plain", "raw"] = "auto"
    fusion: Literal["minCE", "avgCE"] = "minCE"
    vocab_map: Literal["exact+edit", "stats"] = "exact+edit"
    temperature: float = Field(1.0, gt=0)
    ce_unit: Literal["char", "token"] = "char"
    lam: float = Field(0.9, ge=0, le=1)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
