"""Model folders: open lazily (safetensors only), fingerprint, hash, admit, load, write.

Submodules: :mod:`.reader` (headers + tensor reads), :mod:`.fingerprint` (architecture and
tokenizer identity, merge compatibility), :mod:`.manifest` (file hashes), :mod:`.admission`
(checks on untrusted folders), :mod:`.budget` (what an untrusted config may ask for),
:mod:`.safejson` (size- and depth-bounded JSON), :mod:`.loading` (transformers models/tokenizers),
:mod:`.placement` (checkpoint tensors in a loaded model's parameters), :mod:`.writer`.
"""

from umm.checkpoints.admission import AdmissionLimits, AdmissionReport, admit, check_finite
from umm.checkpoints.budget import ModelBudget
from umm.checkpoints.errors import (
    CheckpointError,
    CheckpointTooLargeError,
    CorruptCheckpointError,
    IncompatibleCheckpointsError,
    InvalidConfigError,
    ManifestMismatchError,
    NonFiniteTensorError,
    NotSafetensorsError,
    UnsupportedModelError,
)
from umm.checkpoints.fingerprint import (
    Fingerprint,
    architecture_fingerprint,
    fingerprint,
    incompatibility,
    require_compatible,
    tokenizer_fingerprint,
)
from umm.checkpoints.loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from umm.checkpoints.manifest import FileEntry, Manifest, build_manifest, sha256_file, verify_folder
from umm.checkpoints.reader import Checkpoint, TensorInfo

# Writing side (umm/checkpoints/writer.py, owned separately).
from umm.checkpoints.writer import CheckpointWriter

__all__ = [
    "AdmissionLimits",
    "AdmissionReport",
    "Checkpoint",
    "CheckpointError",
    "CheckpointTooLargeError",
    "CheckpointWriter",
    "CorruptCheckpointError",
    "FileEntry",
    "Fingerprint",
    "IncompatibleCheckpointsError",
    "InvalidConfigError",
    "Manifest",
    "ManifestMismatchError",
    "ModelBudget",
    "NonFiniteTensorError",
    "NotSafetensorsError",
    "TensorInfo",
    "UnsupportedModelError",
    "admit",
    "architecture_fingerprint",
    "build_manifest",
    "check_finite",
    "fingerprint",
    "incompatibility",
    "load_causal_lm",
    "load_tokenizer",
    "require_compatible",
    "resolve_device",
    "resolve_dtype",
    "sha256_file",
    "tokenizer_fingerprint",
    "verify_folder",
]
