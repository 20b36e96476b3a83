"""A model with a PEFT LoRA adapter applied in memory, read like any :class:`Checkpoint`.

``model+adapter`` in a recipe opens the model's checkpoint and the adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``; pickle adapters are refused) as a
:class:`LoraCheckpoint`: the same tensor names, shapes and dtypes as the base model, whose reads
return the adapted weights, so the merge sees merged tensors and nothing is written to disk.

For a linear layer with ``lora_A`` (``r x in``) and ``lora_B`` (``out x r``)::

    W' = W + s * B @ A,   s = lora_alpha / r   (use_rslora: s = lora_alpha / sqrt(r))

(``fan_in_fan_out``: the transpose is added). For an embedding (``lora_embedding_A``:
``r x vocab``, ``lora_embedding_B``: ``dim x r``): ``E' = E + s * (B @ A)^T``. The sum is taken in
float32 and cast back to the stored dtype. Weights the adapter saves whole (``modules_to_save``)
replace the base tensor. ``r`` is the rank of each pair's tensors; ``alpha_pattern`` overrides
``lora_alpha`` per module as PEFT matches it (the pattern is a suffix of the module name). DoRA and
other PEFT types are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from umm.checkpoints.errors import CheckpointError, CorruptCheckpointError, NotSafetensorsError
from umm.checkpoints.reader import Checkpoint, TensorInfo, parse_safetensors_header, read_json_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterError(CheckpointError):
    """A LoRA adapter that cannot be applied to its base model."""


@dataclass(frozen=True)
class LoraPair:
    """One adapted tensor: the adapter's ``a`` / ``b`` tensor names, the scale, and whether the
    delta is transposed (embeddings, ``fan_in_fan_out``)."""

    a: str
    b: str
    scale: float
    transpose: bool


class LoraAdapter:
    """An adapter folder opened lazily: its config, and its tensors mapped onto base tensor names."""

    def __init__(self, folder: Path, config: dict[str, Any], ckpt: Checkpoint,
                 pairs: Mapping[str, LoraPair], replaced: Mapping[str, str]) -> None:
        self.folder = folder
        self.config = config
        self.ckpt = ckpt
        self.pairs = MappingProxyType(dict(pairs))
        self.replaced = MappingProxyType(dict(replaced))

    @classmethod
    def open(cls, folder: str | Path) -> LoraAdapter:
        """Read ``adapter_config.json`` and the safetensors header of ``adapter_model.safetensors``."""
        root = Path(folder)
        config = _adapter_config(root)
        ckpt = _open_weights(root)
        try:
            pairs, replaced = _map_tensors(root, config, ckpt.tensors)
        except BaseException:
            ckpt.close()
            raise
        return cls(root, config, ckpt, pairs, replaced)

    def close(self) -> None:
        self.ckpt.close()


def _adapter_config(root: Path) -> dict[str, Any]:
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{root}: no {ADAPTER_CONFIG}; an adapter is a PEFT LoRA folder (save_pretrained)")
    config = read_json_file(path, ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path}: is not a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"{path}: peft_type {kind} is not supported; umm applies LoRA adapters only")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora) are not supported; use a plain LoRA adapter")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CorruptCheckpointError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    return config


def _open_weights(root: Path) -> Checkpoint:
    """The adapter's weights as a headers-only :class:`Checkpoint` (it has no config.json)."""
    path = root / ADAPTER_WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise NotSafetensorsError(
                f"{root}: the adapter has only pickle weights ({', '.join(pickles)}); umm reads "
                f"{ADAPTER_WEIGHTS} only: save the adapter with safe_serialization=True"
            )
        raise AdapterError(f"{root}: no {ADAPTER_WEIGHTS}")
    fh = open(path, "rb", buffering=0)
    try:
        import os

        header = parse_safetensors_header(fh, ADAPTER_WEIGHTS, os.fstat(fh.fileno()).st_size)
    except BaseException:
        fh.close()
        raise
    tensors = {t.name: t for t in header.tensors}
    return Checkpoint(root, {"model_type": "peft-lora"}, tensors, [ADAPTER_WEIGHTS], {ADAPTER_WEIGHTS: fh},
                      {ADAPTER_WEIGHTS: header.metadata})


_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def _map_tensors(root: Path, config: dict[str, Any],
                 tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, LoraPair], dict[str, str]]:
    """Base tensor name -> its LoRA pair, and base tensor name -> adapter tensor replacing it."""
    halves: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in tensors:
        key = name.removeprefix(_PREFIX)
        m = _PAIR.match(key)
        if m is None:
            if "lora_magnitude_vector" in key:
                raise AdapterError(f"{root}: {name} is a DoRA magnitude; DoRA adapters are not supported")
            replaced[key.replace(".modules_to_save.default", "")] = name
            continue
        module = m["module"]
        kind = "emb" if m["emb"] else "lin"
        halves.setdefault(f"{kind}:{module}", {})[m["ab"]] = name
    pairs: dict[str, LoraPair] = {}
    for key, ab in halves.items():
        kind, module = key.split(":", 1)
        if set(ab) != {"A", "B"}:
            raise CorruptCheckpointError(f"{root}: {module} has lora_{next(iter(ab))} but not its other half")
        a, b = tensors[ab["A"]], tensors[ab["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CorruptCheckpointError(
                f"{root}: {module}: lora_A {a.shape} and lora_B {b.shape} are not rank-r factors (r x in, out x r)"
            )
        r = a.shape[0]
        alpha = _alpha(config, module)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transpose = kind == "emb" or bool(config.get("fan_in_fan_out"))
        pairs[f"{module}.weight"] = LoraPair(ab["A"], ab["B"], scale, transpose)
    return pairs, replaced


def _alpha(config: dict[str, Any], module: str) -> float:
    """``lora_alpha``, or the ``alpha_pattern`` entry whose key is a suffix of ``module`` (as PEFT)."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    return float(config["lora_alpha"])


class LoraCheckpoint:
    """``base`` with ``adapter`` applied: reads like :class:`Checkpoint` (same tensors, shapes, dtypes,
    config and path as the base model). Closing it closes both."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self.path = base.path
        self.config = base.config
        self._check()

    @classmethod
    def open(cls, model: str | Path, adapter: str | Path) -> LoraCheckpoint:
        """Open the model folder and the adapter folder, and check the adapter fits the model."""
        base = Checkpoint.open(model)
        try:
            lora = LoraAdapter.open(adapter)
        except BaseException:
            base.close()
            raise
        try:
            return cls(base, lora)
        except BaseException:
            base.close()
            lora.close()
            raise

    def _check(self) -> None:
        ad = self.adapter
        for name, pair in ad.pairs.items():
            info = self.base.tensors.get(name)
            if info is None:
                raise AdapterError(
                    f"{ad.folder}: adapts {name}, which {self.path} does not have; is this adapter for another base model?"
                )
            a, b = ad.ckpt.tensors[pair.a].shape, ad.ckpt.tensors[pair.b].shape
            want = (a[1], b[0]) if pair.transpose else (b[0], a[1])
            if tuple(info.shape) != want:
                raise AdapterError(
                    f"{ad.folder}: {name} is {tuple(info.shape)} in {self.path}, but the adapter's factors "
                    f"make {want}; is this adapter for another base model?"
                )
        for name, src in ad.replaced.items():
            info = self.base.tensors.get(name)
            if info is None or tuple(info.shape) != tuple(ad.ckpt.tensors[src].shape):
                raise AdapterError(f"{ad.folder}: saves {src} whole, which does not match {name} of {self.path}")

    # -- the Checkpoint interface the merge uses ------------------------------------------------
    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.base.tensors

    @property
    def tensor_names(self) -> list[str]:
        return self.base.tensor_names

    @property
    def model_type(self) -> str:
        return self.base.model_type

    @property
    def num_layers(self) -> int | None:
        return self.base.num_layers

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    @property
    def weight_bytes(self) -> int:
        return self.base.weight_bytes

    @property
    def dtype(self) -> torch.dtype | None:
        return self.base.dtype

    @property
    def weight_files(self) -> list[str]:
        return self.base.weight_files

    @property
    def metadata(self) -> Mapping[str, Mapping[str, str]]:
        return self.base.metadata

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"LoraCheckpoint({str(self.path)!r} + {str(self.adapter.folder)!r})"

    def get_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` with the adapter applied (``out`` as :meth:`Checkpoint.get_tensor`)."""
        rows = self.base.tensors[name].shape[0] if name in self.base.tensors and self.base.tensors[name].shape else None
        if rows is None:
            return self._adapted(name, self.base.get_tensor(name, out), 0, 0)
        return self.get_rows(name, 0, rows, out)

    def get_rows(self, name: str, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of tensor ``name`` with the adapter applied (``W[s:e] + s * B[s:e] @ A``)."""
        src = self.adapter.replaced.get(name)
        if src is not None:
            return self.adapter.ckpt.get_rows(src, start, end, out).to(self.base.tensors[name].dtype)
        return self._adapted(name, self.base.get_rows(name, start, end, out), start, end)

    def _adapted(self, name: str, w: torch.Tensor, start: int, end: int) -> torch.Tensor:
        pair = self.adapter.pairs.get(name)
        if pair is None:
            return w
        a = self.adapter.ckpt.get_tensor(pair.a).float()
        b = self.adapter.ckpt.get_tensor(pair.b).float()
        if pair.transpose:  # delta = (B @ A)^T: rows of the delta are columns of A
            delta = (b @ a[:, start:end]).T
        else:
            delta = b[start:end] @ a
        w.copy_((w.float() + pair.scale * delta).to(w.dtype))
        return w

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names if names is None else names:
            yield name, self.get_tensor(name)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
