"""Fingerprints that say whether checkpoints can be merged tensor by tensor.

- *architecture*: sha256 of the canonical JSON of ``model_type`` and the sorted
  ``(name, shape, dtype)`` of every tensor. Two checkpoints with the same architecture fingerprint
  have identical tensor layouts (a merge can still combine dtypes that differ: see
  :func:`incompatibility`).
- *tokenizer*: sha256 of the vocabulary (every ``token -> id`` pair, added tokens included), read
  from ``tokenizer.json`` directly, from ``vocab.json`` (+ ``added_tokens.json``) or ``vocab.txt``;
  only when none of these exists are the raw bytes of ``tokenizer.model`` hashed. No tokenizer
  code runs, so remote code never can.

Models whose token ids mean different strings are *heterogeneous*: their embeddings cannot be
averaged row by row, only fused through their output distributions (``umm fuse``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umm.checkpoints.errors import CorruptCheckpointError, IncompatibleCheckpointsError
from umm.checkpoints.reader import Checkpoint, dtype_code
from umm.checkpoints.safejson import read_json_bounded

logger = logging.getLogger(__name__)

MAX_TOKENIZER_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint is, independent of where it lives or how it is sharded."""

    model_type: str
    architecture: str
    tokenizer: str | None
    num_parameters: int


def _sha256_json(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hashlib.sha256(data).hexdigest()


def architecture_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 hex of ``model_type`` + sorted ``(name, shape, dtype)``; independent of sharding."""
    layout = sorted([name, list(info.shape), dtype_code(info.dtype)] for name, info in ckpt.tensors.items())
    return _sha256_json({"kind": "umm.architecture/1", "model_type": ckpt.model_type, "tensors": layout})


def _load_json(path: Path) -> Any:
    return read_json_bounded(path, "tokenizer file", MAX_TOKENIZER_FILE_BYTES)


def _read_vocab_txt(path: Path) -> list[str]:
    """The lines of a WordPiece ``vocab.txt`` (one token per line, id = line number)."""
    if path.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
        raise CorruptCheckpointError(f"{path}: more than the {MAX_TOKENIZER_FILE_BYTES} bytes allowed")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _pairs_from_tokenizer_json(path: Path) -> list[tuple[str, int]]:
    data = _load_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CorruptCheckpointError(f"{path}: has no 'model' object")
    vocab = model.get("vocab")
    pairs: list[tuple[str, int]] = []
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        pairs.extend((tok, idx) for tok, idx in vocab.items())
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        for idx, entry in enumerate(vocab):
            if not isinstance(entry, list) or not entry:
                raise CorruptCheckpointError(f"{path}: vocab entry {idx} is not [piece, score]")
            pairs.append((entry[0], idx))
    else:
        raise CorruptCheckpointError(f"{path}: model.vocab is neither an object nor a list")
    added = data.get("added_tokens")
    if added is not None and not isinstance(added, list):
        raise CorruptCheckpointError(f"{path}: added_tokens is not a list")
    for entry in added or []:
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{path}: an added_tokens entry is not an object")
        pairs.append((entry.get("content"), entry.get("id")))
    return pairs


def _pairs_from_vocab_files(folder: Path) -> list[tuple[str, int]] | None:
    pairs: list[tuple[str, int]] = []
    if (folder / "vocab.json").is_file():
        vocab = _load_json(folder / "vocab.json")
        if not isinstance(vocab, dict):
            raise CorruptCheckpointError(f"{folder / 'vocab.json'}: is not a token -> id object")
        pairs.extend(vocab.items())
    elif (folder / "vocab.txt").is_file():
        pairs.extend((tok, idx) for idx, tok in enumerate(_read_vocab_txt(folder / "vocab.txt")))
    else:
        return None
    if (folder / "added_tokens.json").is_file():
        added = _load_json(folder / "added_tokens.json")
        if not isinstance(added, dict):
            raise CorruptCheckpointError(f"{folder / 'added_tokens.json'}: is not a token -> id object")
        pairs.extend(added.items())
    return pairs


def _vocab_hash(pairs: Iterable[tuple[Any, Any]], source: Path) -> str:
    canonical: set[tuple[int, str]] = set()
    for tok, idx in pairs:
        if not isinstance(tok, str) or not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise CorruptCheckpointError(f"{source}: invalid vocabulary entry {tok!r} -> {idx!r}")
        canonical.add((idx, tok))
    return _sha256_json({"kind": "umm.vocab/1", "vocab": sorted(canonical)})


def tokenizer_fingerprint(path: str | Path) -> str | None:
    """sha256 hex of the tokenizer vocabulary in folder ``path``; ``None`` when it has no tokenizer.

    The same vocabulary gives the same hash whether it comes from ``tokenizer.json`` or from
    ``vocab.json`` + ``added_tokens.json``. Only a sentencepiece-only folder (``tokenizer.model``
    alone) is hashed by its bytes, which therefore only matches an identical file.
    """
    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        return _vocab_hash(_pairs_from_tokenizer_json(folder / "tokenizer.json"), folder / "tokenizer.json")
    pairs = _pairs_from_vocab_files(folder)
    if pairs is not None:
        return _vocab_hash(pairs, folder)
    if (folder / "tokenizer.model").is_file():
        digest = hashlib.sha256(b"umm.sentencepiece/1\n")
        with (folder / "tokenizer.model").open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return None


def fingerprint(ckpt: Checkpoint) -> Fingerprint:
    """The :class:`Fingerprint` of an open checkpoint."""
    return Fingerprint(
        model_type=ckpt.model_type,
        architecture=architecture_fingerprint(ckpt),
        tokenizer=tokenizer_fingerprint(ckpt.path),
        num_parameters=ckpt.num_parameters,
    )


def incompatibility(a: Checkpoint, b: Checkpoint) -> str | None:
    """``None`` if ``a`` and ``b`` can be merged tensor by tensor, else the first reason they cannot.

    Merge-compatible means: same ``model_type``, the same tensor names with the same shapes
    (dtypes may differ, a merge casts), and the same tokenizer vocabulary. A folder without any
    tokenizer files is not held against the other (its vocabulary is unknown; a warning is logged).
    """
    return _incompatibility(a, b, tokenizer_fingerprint(a.path))


def _incompatibility(a: Checkpoint, b: Checkpoint, ta: str | None) -> str | None:
    if a.model_type != b.model_type:
        return f"model types differ: {a.model_type!r} ({a.path}) vs {b.model_type!r} ({b.path})"
    # the vocabulary first: a different one also shows as embedding shapes, which would hide the cause
    tb = tokenizer_fingerprint(b.path)
    if ta is None or tb is None:
        if ta != tb:
            logger.warning(
                "%s has no tokenizer files: cannot check that its vocabulary matches %s",
                a.path if ta is None else b.path,
                b.path if ta is None else a.path,
            )
    elif ta != tb:
        return (
            f"tokenizers differ between {a.path} and {b.path}: these models are heterogeneous (umm merges "
            "models with one vocabulary, so tokenizer_source: union over different vocabularies is not "
            "supported); use `umm fuse` (distribution fusion)"
        )
    for name, info in a.tensors.items():
        other = b.tensors.get(name)
        if other is None:
            return f"tensor {name!r} is in {a.path} but missing from {b.path}"
        if other.shape != info.shape:
            return (
                f"tensor {name!r} has shape {tuple(info.shape)} in {a.path} "
                f"but {tuple(other.shape)} in {b.path}"
            )
    for name in b.tensors:
        if name not in a.tensors:
            return f"tensor {name!r} is in {b.path} but missing from {a.path}"
    return None


def require_compatible(ckpts: Sequence[Checkpoint]) -> None:
    """Raise :class:`IncompatibleCheckpointsError` unless every checkpoint is compatible with the first."""
    if len(ckpts) < 2:
        return
    first_tokenizer = tokenizer_fingerprint(ckpts[0].path)
    for other in ckpts[1:]:
        reason = _incompatibility(ckpts[0], other, first_tokenizer)
        if reason is not None:
            raise IncompatibleCheckpointsError(
                f"cannot merge these checkpoints: {reason}; models of different architectures or tokenizers "
                "cannot be merged layer-wise: use `umm fuse` (distribution fusion) for heterogeneous models"
            )
