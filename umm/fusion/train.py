"""Training the pivot on fused sparse targets, with checkpoints and exact resume.

:func:`train_pivot` runs the whole fusion: the teacher pass of the pivot and of every source
(cached per model manifest, data hash, k, max length and prompt layout, so adding a source later
only runs the new one), the fused targets, then ``epochs`` of umm's one training loop
(:mod:`umm.training`: AdamW, linear warm-up and cosine decay to 0, gradient accumulation and
clipping) on ``lam * CE(gold) + (1 - lam) * CE(fused, pivot)`` over response tokens. Every
``checkpoint_every`` optimizer steps the model, optimizer and RNG state are written
(safetensors + JSON, never pickle) to a temporary folder renamed into place; ``resume=True``
continues from the latest one and gives the same weights as an uninterrupted run. The result is
written with ``save_pretrained`` plus a model card, into a temporary folder renamed to ``output``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field

from umm.errors import UmmError
from umm.fusion.data import PLAIN_PROMPT, InstructionData, resolve_layout, tokenize_data
from umm.fusion.fuse import FusionFunction
from umm.fusion.loss import sparse_distill_terms
from umm.fusion.settings import TrainingSettings
from umm.fusion.targets import FusedItem, FusedTargets, build_fused_targets
from umm.fusion.teacher import TeacherOutputs, teacher_pass
from umm.partials import partial_path, remove_stale_partials
from umm.progress import ProgressSink
from umm.training import Loss, OnStep, adamw, train_steps, warmup_cosine
from umm.ui import progress_sink, transformers_bars_off

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.json"


class FusionTrainConfig(TrainingSettings):
    """Everything a fusion run needs; its hash (minus the resume/output knobs) guards resumes."""

    model_config = ConfigDict(extra="forbid")

    pivot: Path
    sources: list[Path] = Field(default_factory=list)
    data: Path
    output: Path
    work_dir: Path | None = None  # default: <output parent>/.<output name>.work
    teacher_cache: Path | None = None  # default: <UMM_HOME>/fusion/teachers
    k: int = Field(10, ge=1)
    max_length: int = Field(2048, ge=2)
    teacher_batch_size: int = Field(8, ge=1)
    layout: Literal["auto", "chat", "plain", "raw"] = "auto"  # prompt layout: umm.fusion.data
    fusion: Literal["minCE", "avgCE"] = "minCE"
    vocab_map: Literal["exact+edit", "stats"] = "exact+edit"
    temperature: float = Field(1.0, gt=0)
    ce_unit: Literal["char", "token"] = "char"  # how teachers' CEs are compared (umm.fusion.targets)
    lam: float = Field(0.9, ge=0, le=1)
    device: str = "auto"
    resume: bool = False

    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.output.parent / f".{self.output.name}.work"

    def training_hash(self) -> str:
        """Hash of the settings that determine the trained weights."""
        keep = self.model_dump(mode="json", exclude={"output", "work_dir", "teacher_cache", "resume",
                                                     "checkpoint_every", "keep_checkpoints",
                                                     "teacher_batch_size", "device"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def collate(items: list[FusedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; targets sit at the row that predicts each response token."""
    length = max(len(it.input_ids) for it in items)
    width = max(it.target.width for it in items)
    b = len(items)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    att = torch.zeros((b, length), dtype=torch.long)
    gold = torch.zeros((b, length), dtype=torch.long)
    resp = torch.zeros((b, length), dtype=torch.bool)
    t_ids = torch.zeros((b, length, width), dtype=torch.long)
    t_lp = torch.full((b, length, width), -torch.inf)
    t_mask = torch.zeros((b, length, width), dtype=torch.bool)
    for r, it in enumerate(items):
        n, p = len(it.input_ids), max(it.n_prompt, 1)
        ids[r, :n] = torch.tensor(it.input_ids)
        att[r, :n] = 1
        rows = slice(p - 1, n - 1)
        gold[r, rows] = ids[r, p:n]
        resp[r, rows] = True
        tgt = it.target
        skip = p - it.n_prompt  # response tokens without a predecessor (empty prompt)
        w = tgt.width
        t_ids[r, rows, :w] = tgt.ids[skip:]
        t_lp[r, rows, :w] = tgt.logprobs[skip:]
        t_mask[r, rows, :w] = tgt.mask[skip:]
    return {"input_ids": ids, "attention_mask": att, "gold": gold, "response_mask": resp,
            "target_ids": t_ids, "target_logprobs": t_lp, "target_mask": t_mask}


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(work: Path, step: int, model: Any, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file, save_model

    ckpt_root = work / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        plain_state[str(pid)] = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                plain_state[str(pid)][name] = v
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"param_groups": opt["param_groups"], "plain_state": plain_state, "trainer": state}
    (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint at step %d: %s", step, final)
    return final


def latest_checkpoint(work: Path) -> Path | None:
    done = sorted(p for p in (work / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
                  if (p / STATE_NAME).is_file())
    return done[-1] if done else None


def _load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer,
                     device: torch.device) -> dict[str, Any]:
    from safetensors.torch import load_file, load_model

    try:
        meta = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        load_model(model, str(path / "model.safetensors"), device=str(device))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as e:
        raise UmmError(f"checkpoint {path} is damaged ({e}); remove it to resume from an earlier one") from None
    state: dict[int, dict[str, Any]] = {}
    for pid, plain in meta["plain_state"].items():
        state[int(pid)] = dict(plain)
    for name, t in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t if key == "step" else t.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    return dict(meta["trainer"])


# --------------------------------------------------------------------------- the run


def prepare_targets(config: FusionTrainConfig, *, show_progress: bool = False,
                    on_progress: ProgressSink | None = None,
                    device: str | None = None) -> tuple[FusedTargets, list[TeacherOutputs]]:
    """Teacher passes (cached) of the pivot and the sources, then the fused targets. ``on_progress``
    receives their bars; ``show_progress`` is shorthand for terminal bars (:func:`umm.ui.progress_sink`)."""
    from umm.checkpoints.loading import load_tokenizer
    from umm.paths import home

    data = InstructionData.from_jsonl(config.data)
    cache = config.teacher_cache or home() / "fusion" / "teachers"
    pivot_tok = load_tokenizer(config.pivot)
    on_progress = progress_sink(on_progress, show_progress)
    teachers = []
    tokenizers = []
    for path in [config.pivot, *config.sources]:
        tokenizers.append(load_tokenizer(path))
        teachers.append(teacher_pass(path, data, cache, k=config.k, batch_size=config.teacher_batch_size,
                                     device=device or config.device, max_length=config.max_length,
                                     on_progress=on_progress, layout=config.layout))
    pivot_data = tokenize_data(pivot_tok, data, config.max_length, config.layout)
    targets = build_fused_targets(pivot_tok, pivot_data, data, teachers, tokenizers,
                                  fusion=config.fusion, vocab_map_method=config.vocab_map,
                                  temperature=config.temperature, ce_unit=config.ce_unit,
                                  on_progress=on_progress)
    return targets, teachers


def train_pivot(
    config: FusionTrainConfig,
    *,
    targets: FusedTargets | None = None,
    stop_after: int | None = None,
    show_progress: bool = False,
    on_progress: ProgressSink | None = None,
    on_step: OnStep | None = None,
) -> Path:
    """Run the fusion described by ``config``; returns the output model folder.

    ``targets``: precomputed fused targets (else :func:`prepare_targets`, whose bars go to
    ``on_progress``; ``show_progress``: terminal bars). ``on_step`` receives each optimizer step's report (run
    ``"fusion training"``; terms ``ce_gold`` and ``ce_fused``). ``stop_after``: stop after that many
    optimizer steps in this call, with a checkpoint (time-sliced jobs); the output folder is then
    not written and the work folder's path is returned instead.
    """
    from umm.checkpoints.loading import check_model_config, load_causal_lm, load_tokenizer, resolve_device
    from umm.checkpoints.reader import Checkpoint

    FusionFunction(config.fusion)
    if config.output.exists() and any(config.output.iterdir()):
        raise UmmError(f"output folder {config.output} exists and is not empty; choose another or remove it")
    with Checkpoint.open(config.pivot) as ckpt:  # refuse a pivot that is not a causal LM up front
        check_model_config(ckpt.config, ckpt.path / "config.json")
    work = config.resolved_work_dir()
    previous = latest_checkpoint(work)
    if previous is not None and not config.resume:
        raise UmmError(f"{work} holds checkpoints of an earlier run; pass resume to continue it, "
                       "or remove that folder to start over")
    device = resolve_device(config.device)
    teachers: list[TeacherOutputs] = []
    if targets is None:
        targets, teachers = prepare_targets(config, show_progress=show_progress, on_progress=on_progress,
                                            device=str(device))
    train_items = [it for it in targets.items if it is not None]
    if not train_items:
        raise UmmError("no training sequence left (every example was dropped); raise max_length")

    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    grad_ckpt = config.gradient_checkpointing if config.gradient_checkpointing is not None else device.type == "cuda"
    tokenizer = load_tokenizer(config.pivot)
    torch.manual_seed(config.seed)
    model = load_causal_lm(config.pivot, device=device, dtype=torch.float32)
    model.train()
    if grad_ckpt:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _check_vocab(model, train_items)

    total = config.max_steps or steps_per_epoch(len(train_items), config) * config.epochs
    warmup = round(config.warmup_ratio * total)
    optimizer = adamw(model, config.lr, config.weight_decay)
    state: dict[str, Any] = {"step": 0, "config_hash": config.training_hash(), "history": []}
    if previous is not None:
        state = _load_checkpoint(previous, model, optimizer, device)
        if state.get("config_hash") != config.training_hash():
            raise UmmError(f"{previous} was written with other training settings; remove {work} to start over")
        logger.info("resuming from %s (step %d of %d)", previous, state["step"], total)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def loss_of(items: list[FusedItem]) -> Loss:
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce_gold, ce_kd = sparse_distill_terms(logits, batch["target_ids"], batch["target_logprobs"],
                                              batch["target_mask"], batch["gold"], batch["response_mask"])
        return Loss(config.lam * ce_gold + (1.0 - config.lam) * ce_kd, {"ce_gold": ce_gold, "ce_fused": ce_kd})

    def lr_at(step: int) -> float:
        return config.lr * warmup_cosine(step, total, warmup)

    plan = fusion_plan(train_items, config, state["step"], total)
    if stop_after is not None:
        if stop_after < 1:
            raise ValueError(f"stop_after must be at least 1, got {stop_after}")
        plan = itertools.islice(plan, stop_after)
    t0 = time.perf_counter()
    for report in train_steps(model, optimizer, plan, loss_of, lr_at=lr_at, total=total, start=state["step"],
                              grad_clip=config.max_grad_norm, run="fusion training"):
        state["step"] = report.step
        state["history"].append({"step": report.step, "loss": report.loss, **report.terms, "lr": report.lr})
        if on_step is not None:
            on_step(report)
        if report.step % config.checkpoint_every == 0:
            _save_checkpoint(work, report.step, model, optimizer, state, config.keep_checkpoints)
    if state["step"] < total:  # stopped after ``stop_after`` steps
        if state["step"] % config.checkpoint_every != 0:
            _save_checkpoint(work, state["step"], model, optimizer, state, config.keep_checkpoints)
        logger.info("stopped after %d steps (step %d of %d); resume to continue", stop_after, state["step"], total)
        return work
    seconds = time.perf_counter() - t0
    out = _write_output(config, model, tokenizer, targets, teachers, state, seconds)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    try:
        work.rmdir()
    except OSError:
        pass  # not empty: something else lives there
    return out


def _check_vocab(model: Any, items: list[FusedItem]) -> None:
    """Refuse token ids (inputs or targets) that the pivot's output layer has no row for."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    top_id = max(max(int(it.target.ids.max()) if it.target.ids.numel() else 0, max(it.input_ids)) for it in items)
    if top_id >= vocab:
        raise UmmError(f"token id {top_id} does not fit the pivot's {vocab}-row output layer; "
                       "its tokenizer has more tokens than its embeddings")


def steps_per_epoch(n_items: int, config: TrainingSettings) -> int:
    """Optimizer steps of one pass over ``n_items``: micro-batches of ``batch_size``, ``grad_accum`` a step."""
    return math.ceil(math.ceil(n_items / config.batch_size) / config.grad_accum)


def fusion_plan(items: list[FusedItem], config: TrainingSettings, start: int, total: int) -> Iterator[list[list[FusedItem]]]:
    """The micro-batches of each step from ``start`` to ``total``.

    Epoch ``e`` orders the items by a permutation seeded with ``seed + e``, cuts it into batches of
    ``batch_size`` and groups ``grad_accum`` batches a step (the last group of an epoch may be
    shorter). A pure function of the step, so a resumed run sees the same batches.
    """
    per_epoch = steps_per_epoch(len(items), config)
    step = start
    while step < total:
        epoch, first = divmod(step, per_epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for k in range(first, per_epoch):
            if step >= total:
                return
            yield [[items[i] for i in b] for b in batches[k * config.grad_accum : (k + 1) * config.grad_accum]]
            step += 1


def _write_output(config: FusionTrainConfig, model: Any, tokenizer: Any, targets: FusedTargets,
                  teachers: list[TeacherOutputs], state: dict[str, Any], seconds: float) -> Path:
    out = config.output
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-"
    remove_stale_partials(out.parent, prefix)  # of runs killed outright (SIGKILL) while writing
    tmp = partial_path(out.parent, prefix)
    tmp.mkdir()
    try:
        _fill_output(config, tmp, model, tokenizer, targets, teachers, state, seconds)
        if out.exists():
            out.rmdir()  # checked empty at the start
        os.replace(tmp, out)
    except BaseException:  # an error, Ctrl-C or (in the umm command) SIGTERM: no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("fused model written to %s", out)
    return out


def _fill_output(config: FusionTrainConfig, tmp: Path, model: Any, tokenizer: Any, targets: FusedTargets,
                 teachers: list[TeacherOutputs], state: dict[str, Any], seconds: float) -> None:
    """Write the fused model, its tokenizer, recipe and model card into ``tmp``."""
    model.eval()
    model.config.use_cache = True
    with transformers_bars_off():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    recipe = {
        "method": "distribution fusion (FuseLLM-style)",
        "pivot": str(config.pivot),
        "sources": [str(s) for s in config.sources],
        "layout": config.layout,
        "pivot_layout": resolve_layout(tokenizer, config.layout),
        "teachers": [{"model": str(t.model_path), "manifest": t.model_manifest, "k": t.k,
                      "layout": t.layout, "bytes_per_token": round(t.bytes_per_token, 2)} for t in teachers],
        "data": str(config.data),
        "data_sha256": teachers[0].data_sha256 if teachers else None,
        "fusion": config.fusion, "lam": config.lam, "k": config.k, "vocab_map": config.vocab_map,
        "temperature": config.temperature, "ce_unit": config.ce_unit, "lr": config.lr, "epochs": config.epochs,
        "steps": state["step"], "batch_size": config.batch_size, "grad_accum": config.grad_accum,
        "max_length": config.max_length, "seed": config.seed,
        "fallback_fraction": dict(zip(targets.teacher_names, targets.fallback_fraction)),
        "minCE_wins": dict(zip(targets.teacher_names, targets.chosen)),
        "final_loss": state["history"][-1] if state["history"] else None,
        "history": state["history"],  # every step's loss and terms (the dashboard's curve once the checkpoints are gone)
        "train_seconds_last_call": round(seconds, 2),
    }
    (tmp / "fusion_recipe.json").write_text(json.dumps(recipe, indent=1), encoding="utf-8")
    (tmp / "README.md").write_text(_model_card(recipe), encoding="utf-8")


def _model_card(r: dict[str, Any]) -> str:
    sources = "\n".join(f"  - `{s}`" for s in r["sources"]) or "  - (none: self-distillation)"
    return (
        "---\ntags:\n- umm\n- distribution-fusion\n---\n\n"
        f"# Fused model (pivot `{Path(r['pivot']).name}`)\n\n"
        "Trained by `umm` with distribution fusion: each source's next-token distributions (top-"
        f"{r['k']}) on instruction-response data were aligned to the pivot's tokenizer, fused with "
        f"**{r['fusion']}**, and distilled into the pivot.\n\n"
        f"- Pivot: `{r['pivot']}`\n- Sources:\n{sources}\n"
        f"- Data: `{r['data']}` (sha256 `{r['data_sha256']}`)\n"
        f"- Prompt layout: {_layout_text(r['pivot_layout'])} (configured: `{r['layout']}`); prompt the "
        "fused model the same way\n"
        f"- Loss: {r['lam']} * CE(gold) + {1 - r['lam']:.2f} * CE(fused, pivot) on response tokens "
        f"(lambda = {r['lam']})\n"
        f"- Vocabulary mapping: {r['vocab_map']}; temperature {r['temperature']}\n"
        f"- Optimisation: lr {r['lr']}, {r['epochs']} epoch(s), {r['steps']} steps, batch "
        f"{r['batch_size']} x {r['grad_accum']} accumulation, max length {r['max_length']}, seed {r['seed']}\n\n"
        "The full recipe is in `fusion_recipe.json`.\n"
    )


def _layout_text(layout: str) -> str:
    """How the model card describes a resolved prompt layout."""
    if layout == "chat":
        return "`chat` (the tokenizer's chat template)"
    if layout == "raw":
        return "`raw` (the instruction text, directly followed by the response and EOS)"
    return f"`plain` ({PLAIN_PROMPT!r} + response + EOS)"
