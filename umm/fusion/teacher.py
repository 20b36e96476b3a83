"""Teacher pass: one no-grad pass of a model over instruction-response data, kept sparse.

For every response token the pass keeps the top-k token ids and log-probabilities of the
distribution that predicted it, plus each sequence's cross-entropy on its gold response (mean over
response tokens, the model's own tokenization). Output: safetensors shards of ``shard_sequences``
consecutive examples and an ``index.json``, under ``out_dir/<model name>-<key>``, where the key
hashes (format version, model manifest hash, data sha256, k, max_length, resolved prompt layout:
see :func:`umm.fusion.data.resolve_layout`). The index is rewritten
atomically after each finished shard, so a killed pass resumes at the first unfinished shard and
produces byte-identical shards; a finished pass is a cache hit, so adding a source to a fusion
never redoes the other sources' passes.

Shard tensors (T = response tokens in the shard, n = examples in the shard):
``topk_ids [T, k] int32``, ``topk_logprobs [T, k] float16``, ``gold_ids [T] int32``,
``offsets [n + 1] int64`` (rows of example i: offsets[i]:offsets[i+1]; empty when dropped),
``ce [n] float32`` (NaN when dropped).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umm.atomic import atomic_path, remove_stale_temps, write_json_atomic
from umm.errors import UmmError
from umm.fusion.data import InstructionData, TokenizedExample, resolve_layout, tokenize_data
from umm.progress import ProgressSink, open_bar
from umm.ui import human_bytes, progress_sink

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_NAME = "index.json"


class TeacherCacheError(UmmError):
    """A teacher-output directory that is missing, unfinished or inconsistent."""


@dataclass(frozen=True)
class TeacherSequence:
    """One example's sparse teacher output (rows = the example's response tokens)."""

    topk_ids: torch.Tensor  # [T, k] int64
    topk_logprobs: torch.Tensor  # [T, k] float32
    gold_ids: torch.Tensor  # [T] int64
    ce: float


def cache_key(model_manifest: str, data_sha256: str, k: int, max_length: int, layout: str) -> str:
    """The identity of a teacher pass: same inputs, same key, same files.

    ``layout`` is the resolved prompt layout (``chat``, ``plain`` or ``raw``): it decides the token
    sequences, so passes in different layouts never share a cache entry."""
    blob = json.dumps(
        {"format": FORMAT_VERSION, "model": model_manifest, "data": data_sha256, "k": k,
         "max_length": max_length, "layout": layout}, sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _safe_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.resolve().name)[:48] or "model"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TeacherOutputs:
    """A finished teacher pass on disk (see module docstring); read a sequence with ``[i]``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        index_path = self.dir / INDEX_NAME
        try:
            self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TeacherCacheError(f"{self.dir}: no {INDEX_NAME}; run the teacher pass first") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TeacherCacheError(f"{index_path}: not valid JSON ({e})") from None
        if self.index.get("format") != FORMAT_VERSION:
            raise TeacherCacheError(f"{index_path}: unknown format {self.index.get('format')!r}")
        if not self.index.get("complete"):
            raise TeacherCacheError(f"{self.dir}: the teacher pass is unfinished; run it again to resume")
        self._starts = [s["start"] for s in self.index["shards"]]
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    key = property(lambda self: self.index["key"])
    k = property(lambda self: int(self.index["k"]))
    model_path = property(lambda self: Path(self.index["model_path"]))
    model_manifest = property(lambda self: self.index["model_manifest"])
    data_sha256 = property(lambda self: self.index["data_sha256"])
    n_tokens = property(lambda self: int(self.index["n_tokens"]))
    n_truncated = property(lambda self: int(self.index["n_truncated"]))
    n_dropped = property(lambda self: int(self.index["n_dropped"]))
    layout = property(lambda self: str(self.index.get("layout", "")))  # resolved prompt layout

    def __len__(self) -> int:
        return int(self.index["n_examples"])

    @property
    def storage_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.index["shards"])

    @property
    def bytes_per_token(self) -> float:
        return self.storage_bytes / max(1, self.n_tokens)

    def _shard(self, j: int) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != j:
            from safetensors.torch import load_file

            info = self.index["shards"][j]
            try:
                tensors = load_file(str(self.dir / info["file"]))
            except Exception as e:
                raise TeacherCacheError(f"{self.dir / info['file']}: cannot read shard ({e})") from None
            self._cached = (j, tensors)
        return self._cached[1]

    def __getitem__(self, i: int) -> TeacherSequence | None:
        """Example ``i`` of the data (``None`` if it was dropped: its prompt filled the context)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = bisect.bisect_right(self._starts, i) - 1
        t = self._shard(j)
        local = i - self._starts[j]
        a, b = int(t["offsets"][local]), int(t["offsets"][local + 1])
        ce = float(t["ce"][local])
        if a == b:
            return None
        return TeacherSequence(t["topk_ids"][a:b].long(), t["topk_logprobs"][a:b].float(),
                               t["gold_ids"][a:b].long(), ce)


def _forward_batch(model: Any, items: list[TokenizedExample], k: int, pad_id: int,
                   device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Top-k (ids, logprobs), gold ids and mean CE over the response tokens of each item."""
    length = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    att = torch.zeros((len(items), length), dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, : len(it.input_ids)] = torch.tensor(it.input_ids)
        att[r, : len(it.input_ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
    out = []
    for r, it in enumerate(items):
        start = max(it.n_prompt, 1)  # a token needs a predecessor to be predicted
        n = len(it.input_ids)
        gold = ids[r, start:n]
        lp = torch.log_softmax(logits[r, start - 1 : n - 1].float(), dim=-1)
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        ce = -lp.gather(1, gold.to(lp.device).view(-1, 1)).mean()
        out.append((top.indices.cpu(), top.values.cpu(), gold, float(ce)))
    return out


def teacher_pass(
    model_path: str | Path,
    data: InstructionData,
    out_dir: str | Path,
    *,
    k: int = 10,
    batch_size: int = 8,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    max_length: int = 2048,
    show_progress: bool = False,
    on_progress: ProgressSink | None = None,
    shard_sequences: int = 256,
    model_manifest: str | None = None,
    layout: str = "auto",
) -> TeacherOutputs:
    """Run (or resume, or reuse) the teacher pass of ``model_path`` on ``data`` under ``out_dir``.

    ``model_manifest``: the model's manifest hash if already known (else it is computed).
    ``layout``: the prompt layout (:data:`umm.fusion.data.LAYOUTS`); resolved for this model's
    tokenizer before anything runs (``chat`` without a template is refused) and part of the key.
    ``on_progress`` receives a bar of the sequences; ``show_progress`` is shorthand for terminal
    bars (:func:`umm.ui.progress_sink`). Returns the finished :class:`TeacherOutputs`; logs the
    storage cost per token.
    """
    from safetensors.torch import save_file

    from umm.checkpoints.loading import load_causal_lm, load_tokenizer, resolve_device
    from umm.checkpoints.manifest import build_manifest

    if k < 1:
        raise UmmError(f"k must be at least 1, got {k}")
    if batch_size < 1 or shard_sequences < 1:
        raise UmmError("batch_size and shard_sequences must be at least 1")
    model_path = Path(model_path)
    tokenizer = load_tokenizer(model_path)  # refuses remote-code tokenizers before any work
    resolved = resolve_layout(tokenizer, layout)
    manifest = model_manifest or build_manifest(model_path).hash
    key = cache_key(manifest, data.sha256, k, max_length, resolved)
    target = Path(out_dir) / f"{_safe_name(model_path)}-{key[:16]}"
    index_path = target / INDEX_NAME
    if index_path.is_file():
        try:
            done = TeacherOutputs(target)
            logger.info("teacher outputs of %s found in %s (cache hit)", model_path, target)
            return done
        except TeacherCacheError:
            pass  # unfinished: resume below
    target.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)  # of passes killed mid-write; a live concurrent pass keeps its own

    tokenized = tokenize_data(tokenizer, data, max_length, resolved)
    index = _resume_index(target, key) or {
        "format": FORMAT_VERSION, "key": key, "model_path": str(model_path.resolve()),
        "model_manifest": manifest, "data_sha256": data.sha256, "k": k, "max_length": max_length,
        "layout": resolved, "shard_sequences": shard_sequences, "n_examples": len(data), "shards": [],
        "n_truncated": tokenized.n_truncated, "n_dropped": tokenized.n_dropped,
        "dropped_lines": tokenized.dropped_lines, "vocab_size": len(tokenizer),
        "n_tokens": 0, "complete": False, "compute_seconds": 0.0,
    }
    shard_sequences = int(index["shard_sequences"])
    first = index["shards"][-1]["stop"] if index["shards"] else 0
    if first:
        logger.info("resuming the teacher pass of %s at example %d of %d", model_path, first, len(data))

    dev = resolve_device(device)
    model = load_causal_lm(model_path, device=dev, dtype=dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = open_bar(progress_sink(on_progress, show_progress), len(data), f"teacher {model_path.name}", "seq")
    bar.advance(first)
    with torch.inference_mode():
        for start in range(first, len(data), shard_sequences):
            stop = min(start + shard_sequences, len(data))
            t0 = time.perf_counter()
            rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None] = []
            for b in range(start, stop, batch_size):
                chunk = [tokenized.items[i] for i in range(b, min(b + batch_size, stop))]
                kept = [it for it in chunk if it is not None]
                results = iter(_forward_batch(model, kept, k, pad_id, dev) if kept else [])
                rows.extend(next(results) if it is not None else None for it in chunk)
                bar.advance(len(chunk))
            seconds = time.perf_counter() - t0
            info = _write_shard(target, start, stop, rows, k, save_file)
            index["shards"].append(info)
            index["n_tokens"] += info["n_tokens"]
            index["compute_seconds"] += seconds
            write_json_atomic(index_path, index, indent=1)
    bar.close()
    index["complete"] = True
    write_json_atomic(index_path, index, indent=1)
    result = TeacherOutputs(target)
    logger.info(
        "teacher %s: %d response tokens, %s on disk, %.1f bytes/token (a dense fp16 target would be "
        "%s/token); %d truncated, %d dropped", model_path.name, result.n_tokens,
        human_bytes(result.storage_bytes), result.bytes_per_token, human_bytes(2 * len(tokenizer)),
        result.n_truncated, result.n_dropped,
    )
    return result


def _resume_index(target: Path, key: str) -> dict[str, Any] | None:
    """The unfinished index of a previous run, its shard list cut at the first bad shard."""
    path = target / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s is unreadable; starting the teacher pass over", path)
        return None
    if index.get("format") != FORMAT_VERSION or index.get("key") != key:
        return None
    good = []
    for s in index.get("shards", []):
        f = target / s["file"]
        if not f.is_file() or f.stat().st_size != s["bytes"] or _sha256(f) != s["sha256"]:
            logger.warning("%s is missing or damaged; redoing it and what follows", f)
            break
        good.append(s)
    index["shards"] = good
    index["n_tokens"] = sum(int(s["n_tokens"]) for s in good)
    return index


def _write_shard(target: Path, start: int, stop: int,
                 rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None],
                 k: int, save_file: Any) -> dict[str, Any]:
    offsets = [0]
    ids, lps, golds, ces = [], [], [], []
    for r in rows:
        if r is None:
            ces.append(float("nan"))
        else:
            top_i, top_v, gold, ce = r
            if top_i.shape[1] < k:  # a vocabulary smaller than k: pad with impossible entries
                pad = k - top_i.shape[1]
                top_i = torch.cat([top_i, torch.zeros(top_i.shape[0], pad, dtype=top_i.dtype)], 1)
                top_v = torch.cat([top_v, torch.full((top_v.shape[0], pad), -torch.inf)], 1)
            ids.append(top_i)
            lps.append(top_v)
            golds.append(gold)
            ces.append(ce)
        offsets.append(offsets[-1] + (0 if r is None else int(r[2].numel())))
    tensors = {
        "topk_ids": (torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.long)).to(torch.int32),
        "topk_logprobs": (torch.cat(lps) if lps else torch.zeros(0, k)).to(torch.float16),
        "gold_ids": (torch.cat(golds) if golds else torch.zeros(0, dtype=torch.long)).to(torch.int32),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "ce": torch.tensor(ces, dtype=torch.float32),
    }
    name = f"shard-{start:08d}-{stop:08d}.safetensors"
    with atomic_path(target / name) as tmp:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata={"format": str(FORMAT_VERSION)})
    return {"file": name, "start": start, "stop": stop, "n_tokens": offsets[-1],
            "bytes": (target / name).stat().st_size, "sha256": _sha256(target / name)}
