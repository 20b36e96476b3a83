"""Admission: what a coordinator (and a node, before announcing) checks on an untrusted folder.

:func:`admit` runs the checks cheapest first and raises the specific :class:`CheckpointError`:

1. weights are safetensors (never unpickled) with valid headers, config.json is valid JSON
   (size and nesting bounded: :mod:`~umm.checkpoints.safejson`);
2. the config needs no remote code, names a model type transformers knows, is a causal LM, and
   its sizes are valid and within the :class:`~umm.checkpoints.budget.ModelBudget`;
3. size: folder bytes and tensor count within :class:`AdmissionLimits`; the parameters stored
   are within the budget and not far fewer than the config implies (nothing is built yet);
4. structure: the tensor names and shapes are exactly those of the model the config describes
   (built on the ``meta`` device, so no memory is used), tied weights allowed to be absent and
   the stale buffers of older checkpoints that transformers drops on load allowed to be present;
   the buffers that model would allocate when loaded (attention masks...) are within the budget;
5. a tokenizer is present, needs no custom code, and its ids fit the embedding;
6. every tensor is finite (read one at a time, so memory stays at one tensor);
7. the manifest (sha256 of every file) and fingerprint are computed for the report.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from umm.checkpoints.budget import ModelBudget, check_buffer_bytes, check_parameter_count
from umm.checkpoints.errors import CheckpointError, CheckpointTooLargeError, NonFiniteTensorError
from umm.checkpoints.fingerprint import Fingerprint, _pairs_from_tokenizer_json, fingerprint
from umm.checkpoints.loading import check_model_config, check_tokenizer_files, first_line
from umm.checkpoints.manifest import Manifest, build_manifest, list_files
from umm.checkpoints.reader import CONFIG_NAME, Checkpoint
from umm.progress import ProgressSink, track
from umm.ui import human_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmissionLimits:
    """Bounds for an untrusted checkpoint; ``check_finite=False`` skips the NaN/Inf scan."""

    max_total_bytes: int = 64 * 10**9
    max_tensors: int = 100_000
    check_finite: bool = True
    budget: ModelBudget = field(default_factory=ModelBudget)


@dataclass(frozen=True)
class AdmissionReport:
    """What an admitted checkpoint is: its fingerprint, manifest and parameter count."""

    fingerprint: Fingerprint
    manifest: Manifest
    num_parameters: int


def check_finite(tensor: torch.Tensor, name: str, model: str = "") -> None:
    """Raise :class:`NonFiniteTensorError` (naming the tensor and model) if ``tensor`` has NaN/Inf."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return
    t = tensor
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and not t.is_complex():
        t = t.float()  # float8 variants: isfinite is not implemented for all of them
    # Fast screen: NaN and Inf propagate through a sum (NaN + x = NaN, Inf + finite = Inf,
    # Inf - Inf = NaN), so a finite sum proves every element finite. A non-finite sum may
    # also be an overflow of large finite values, so only then run the exact, slower check.
    acc = torch.float64 if t.dtype == torch.float64 else None if t.is_complex() else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc)).all()):
        return
    if bool(torch.isfinite(t).all()):
        return
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    where = f" in {model}" if model else ""
    raise NonFiniteTensorError(f"tensor {name!r}{where} has {nan} NaN and {inf} Inf values; the model is broken")


@dataclass(frozen=True)
class Layout:
    """The tensors a config's causal LM has (built on the ``meta`` device).

    ``tied``: sets of names sharing one tensor (only one of each needs to be stored); ``renamed``:
    transformers converts this model's checkpoint names on load (e.g. fused MoE experts), so names
    cannot be compared; ``buffer_bytes``: what its buffers (masks, caches) take once really built;
    ``ignored``: stored tensors transformers drops on load (see :func:`ignored_on_load`).
    """

    shapes: dict[str, tuple[int, ...]]
    tied: list[set[str]]
    renamed: bool
    buffer_bytes: int
    ignored: re.Pattern[str] | None = None


def ignored_on_load(model: torch.nn.Module) -> re.Pattern[str] | None:
    """What transformers drops from a checkpoint as expected, not as an error: the model's
    ``_keys_to_ignore_on_load_unexpected`` (GPT-NeoX's ``attention.bias``/``masked_bias``) and, when
    the model has such buffers, the per-layer ``rotary_emb.inv_freq`` and ``position_ids`` that
    older transformers versions saved. ``None`` when nothing is ignored."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None


def expected_layout(config_path: Path) -> Layout:
    """The :class:`Layout` of the causal LM the config at ``config_path`` describes.

    Any exception while transformers reads the config or builds the model is this folder's
    :class:`CheckpointError` (a stranger's config can trip transformers in many ways).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"{config_path}: transformers cannot build this model: {first_line(e)}") from None
    groups: dict[int, set[str]] = defaultdict(set)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shapes[name] = tuple(tensor.shape)
        groups[id(tensor)].add(name)
    buffer_bytes = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    renamed = False
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        renamed = bool(get_model_conversion_mapping(model, add_legacy=False))
    except ImportError:  # older transformers: no load-time conversions
        pass
    return Layout(shapes, [g for g in groups.values() if len(g) > 1], renamed, buffer_bytes, ignored_on_load(model))


def structure_mismatch(ckpt: Checkpoint, budget: ModelBudget | None = None) -> str | None:
    """``None`` if the checkpoint's tensors are what its config implies, else the first difference.

    Raises :class:`CheckpointTooLargeError` when the model's buffers exceed ``budget``.
    """
    layout = expected_layout(ckpt.path / CONFIG_NAME)
    check_buffer_bytes(layout.buffer_bytes, ckpt.path, budget)
    shapes, tied = layout.shapes, layout.tied
    dropped = {n for n in ckpt.tensors if n not in shapes and layout.ignored is not None and layout.ignored.search(n)}
    if layout.renamed:
        # Names are converted at load time (e.g. fused MoE experts); the parameter count still
        # has to agree: every distinct tensor once, tied copies optionally stored as well.
        unique = sum(_numel(shapes[next(iter(g))]) for g in _groups(shapes, tied))
        full = sum(_numel(s) for s in shapes.values())
        stored = ckpt.num_parameters - sum(ckpt.tensors[n].numel for n in dropped)
        if not unique <= stored <= full:
            return f"it stores {stored} parameters but config.json implies {unique}"
        return None
    optional = set().union(*[set(g) for g in tied]) if tied else set()
    for name, info in ckpt.tensors.items():
        want = shapes.get(name)
        if want is None and name in dropped:
            continue
        if want is None:
            return f"tensor {name!r} is not part of the model config.json describes"
        if want != info.shape:
            return f"tensor {name!r} has shape {info.shape} but config.json implies {want}"
    for name in shapes:
        if name not in ckpt.tensors and name not in optional:
            return f"tensor {name!r}, which config.json implies, is missing"
    for group in tied:
        if not any(n in ckpt.tensors for n in group):
            return f"none of the tied tensors {sorted(group)} is stored"
    return None


def _groups(shapes: dict[str, tuple[int, ...]], tied: list[set[str]]) -> list[set[str]]:
    """Every tensor name grouped with the names it is tied to."""
    in_tied = set().union(*tied) if tied else set()
    return list(tied) + [{n} for n in shapes if n not in in_tied]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _embedding_rows(ckpt: Checkpoint) -> int | None:
    vocab = ckpt.config.get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        return vocab
    text = ckpt.config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return int(text["vocab_size"])
    return None


def _check_tokenizer_fits(ckpt: Checkpoint) -> None:
    check_tokenizer_files(ckpt.path)
    tok_json = ckpt.path / "tokenizer.json"
    rows = _embedding_rows(ckpt)
    if rows is None or not tok_json.is_file():
        return
    ids = [i for _, i in _pairs_from_tokenizer_json(tok_json) if isinstance(i, int)]
    if ids and max(ids) >= rows:
        raise CheckpointError(
            f"{tok_json}: the tokenizer has token id {max(ids)} but the model's vocab_size is {rows}; "
            "the tokenizer does not belong to this model"
        )


def admit(path: str | Path, limits: AdmissionLimits = AdmissionLimits(), *,
          on_progress: ProgressSink | None = None) -> AdmissionReport:
    """Check an untrusted model folder (see the module docstring); raise the specific
    :class:`CheckpointError` or return its :class:`AdmissionReport`. ``on_progress`` receives a
    bar of the tensors scanned for NaN/Inf."""
    folder = Path(path)
    if folder.is_dir():  # size first: the cheapest check, before any file is parsed
        total = sum(list_files(folder).values())
        if total > limits.max_total_bytes:
            raise CheckpointTooLargeError(
                f"{folder}: {human_bytes(total)} exceeds the admission limit of {human_bytes(limits.max_total_bytes)}"
            )
    with Checkpoint.open(folder) as ckpt:
        where = str(ckpt.path)
        check_model_config(ckpt.config, ckpt.path / CONFIG_NAME, limits.budget)
        if len(ckpt.tensors) > limits.max_tensors:
            raise CheckpointTooLargeError(
                f"{where}: {len(ckpt.tensors)} tensors exceed the admission limit of {limits.max_tensors}"
            )
        check_parameter_count(ckpt.config, ckpt.num_parameters, where, limits.budget)

        reason = structure_mismatch(ckpt, limits.budget)
        if reason is not None:
            raise CheckpointError(f"{where}: weights do not match config.json: {reason}")
        _check_tokenizer_fits(ckpt)

        if limits.check_finite:
            for name in track(ckpt.tensor_names, on_progress, f"scanning {ckpt.path.name}", "tensor"):
                check_finite(ckpt.get_tensor(name), name, where)

        fp = fingerprint(ckpt)
        num_parameters = ckpt.num_parameters
    manifest = build_manifest(folder)
    if manifest.total_bytes > limits.max_total_bytes:  # the folder grew while we were checking it
        raise CheckpointTooLargeError(f"{where}: {human_bytes(manifest.total_bytes)} exceeds the admission limit")
    logger.info(
        "admitted %s: %s, %d parameters, manifest %s", where, fp.model_type, num_parameters, manifest.hash[:12]
    )
    return AdmissionReport(fingerprint=fp, manifest=manifest, num_parameters=num_parameters)
