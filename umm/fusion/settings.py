"""Optimisation settings of a fusion run, shared by ``umm fuse``'s config and the trainer.

Kept free of torch so that config files can be validated before anything heavy is imported.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
