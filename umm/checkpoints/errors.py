"""Errors raised when a model folder cannot be used.

All derive from :class:`umm.errors.UmmError`, so the CLI prints their message (which names the
folder, file or tensor at fault and what to do) without a traceback.
"""

from __future__ import annotations

from umm.errors import UmmError


class CheckpointError(UmmError):
    """A model folder cannot be used as it is."""


class NotSafetensorsError(CheckpointError):
    """The folder holds only pickle weights (.bin/.pt/.pth); umm refuses to unpickle them."""


class CorruptCheckpointError(CheckpointError):
    """Missing config, missing or truncated shard, invalid header, or an inconsistent index."""


class IncompatibleCheckpointsError(CheckpointError):
    """Checkpoints that cannot be merged tensor by tensor (architecture or tokenizer differ)."""


class NonFiniteTensorError(CheckpointError):
    """A tensor holds NaN or Inf values."""


class ManifestMismatchError(CheckpointError):
    """A folder's files do not match its manifest (missing, extra, or different file)."""


class CheckpointTooLargeError(CheckpointError):
    """A checkpoint exceeds an admission limit (bytes or tensor count)."""


class InvalidConfigError(CheckpointError):
    """config.json declares sizes no model can be built from (zero heads, a config bigger than its weights)."""


class UnsupportedModelError(CheckpointError):
    """config.json names a model umm cannot run: custom code (``auto_map``), a model type the
    installed transformers does not know, or a model that is not a causal LM."""
