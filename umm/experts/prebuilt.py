"""Models of a suite that ship with umm, built once by umm's own code (``umm experts prepare --stage``).

A merge-friendly base needs far more pretraining than the experts' fine-tunes; on a 2-core machine
that would not fit the suite's build budget. So a recipe model may name a *prebuilt* folder under
``umm/experts/prebuilt/<name>/``: a Hugging Face folder (safetensors weights, config, tokenizer)
plus ``prebuilt.json``, which records

- ``fingerprint``: :func:`stage_fingerprint` of the recipe that trained it (the model's recipe and
  those of its ancestors, its tokenizer's recipe, the data seed and the data generators' versions);
- ``files``: the sha256 of every file of the folder;
- how it was trained (steps, final loss, seconds, torch version).

:func:`load_prebuilt` returns the folder only when its fingerprint is the current recipe's and
every file has its recorded hash: a changed recipe trains the model instead (and says so), a
changed byte is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from umm.errors import UmmError
from umm.partials import partial_path, remove_stale_partials

logger = logging.getLogger(__name__)

PREBUILT_DIR = Path(__file__).parent / "prebuilt"
PREBUILT_FILE = "prebuilt.json"


class PrebuiltCorruptError(UmmError):
    """A prebuilt folder whose files do not have the hashes its ``prebuilt.json`` records."""


@dataclass(frozen=True)
class Prebuilt:
    """A checked prebuilt model folder and what ``prebuilt.json`` says of its training."""

    folder: Path
    steps: int
    final_loss: float
    train_seconds: float


def stage_fingerprint(recipe: Any, name: str) -> str:
    """sha256 of everything that determines model ``name``'s weights, and nothing else.

    The model's recipe (without its ``prebuilt`` name) and its ancestors', its tokenizer's recipe,
    the recipe's data seed and sequence length, and the versions of the data generators.
    """
    from umm.eval.suites import SUITES_VERSION
    from umm.experts.corpus import CORPUS_VERSION

    chain = []
    model = recipe.model(name)
    while True:
        entry = asdict(model)
        entry.pop("prebuilt", None)
        chain.insert(0, entry)
        if model.init_from is None:
            break
        model = recipe.model(model.init_from)
    blob = {
        "chain": chain,
        "tokenizer": asdict(recipe.tokenizers[recipe.model(name).tokenizer]),
        "data_seed": recipe.data_seed,
        "max_length": recipe.max_length,
        "threads": recipe.threads,
        "suites_version": SUITES_VERSION,
        "corpus_version": CORPUS_VERSION,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prebuilt_folder(name: str, root: Path | None = None) -> Path:
    """Where the prebuilt folder ``name`` lives (``root`` or the one shipped with umm)."""
    return (root or PREBUILT_DIR) / name


def load_prebuilt(recipe: Any, name: str, root: Path | None = None) -> Prebuilt | None:
    """The checked prebuilt folder of model ``name``, or ``None`` when it must be trained.

    ``None`` when the model names no prebuilt folder, the folder is missing, or it was built from
    another recipe (logged). Raises :class:`PrebuiltCorruptError` when a file's hash differs.
    """
    model = recipe.model(name)
    if model.prebuilt is None:
        return None
    folder = prebuilt_folder(model.prebuilt, root)
    meta = folder / PREBUILT_FILE
    if not meta.is_file():
        logger.warning("no prebuilt %s at %s: training %s instead", model.prebuilt, folder, name)
        return None
    try:
        info = json.loads(meta.read_text())
        files, fingerprint = dict(info["files"]), str(info["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrebuiltCorruptError(f"{meta} is unreadable ({exc}); rebuild it with `umm experts prepare --stage {name}`") from exc
    if fingerprint != stage_fingerprint(recipe, name):
        logger.warning("prebuilt %s is from another recipe of %s: training it instead "
                       "(refresh it with `umm experts prepare --variant %s --stage %s`)", folder, name, recipe.variant, name)
        return None
    for rel, digest in sorted(files.items()):
        path = folder / rel
        if path.is_symlink() or not path.is_file() or _sha256(path) != digest:
            raise PrebuiltCorruptError(
                f"prebuilt file {path} is missing or changed (sha256 differs from {meta}); restore it from git "
                f"or rebuild it with `umm experts prepare --variant {recipe.variant} --stage {name}`"
            )
    return Prebuilt(folder, int(info.get("steps", 0)), float(info.get("final_loss", float("nan"))),
                    float(info.get("train_seconds", 0.0)))


def write_prebuilt(folder: Path, recipe: Any, name: str, model: Any, tokenizer: Any, entry: dict[str, Any]) -> Path:
    """Save a trained model as a prebuilt folder (atomically: a temp sibling, then a rename).

    ``entry`` is the model's suite entry (``steps``, ``final_loss``, ``train_seconds``).
    """
    import torch

    from umm.ui import transformers_bars_off

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{folder.name}.tmp-"
    remove_stale_partials(folder.parent, prefix)  # of saves killed outright (SIGKILL) while writing
    tmp = partial_path(folder.parent, prefix)
    try:
        with transformers_bars_off():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        info = {
            "model": name,
            "variant": recipe.variant,
            "fingerprint": stage_fingerprint(recipe, name),
            "files": files,
            "steps": entry["steps"],
            "final_loss": entry["final_loss"],
            "train_seconds": entry["train_seconds"],
            "torch_version": torch.__version__,
        }
        (tmp / PREBUILT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
