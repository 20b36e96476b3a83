"""Build (once) and load the tiny expert suite: ``<experts_dir>/<variant>/``.

Layout of a built suite::

    <variant>/suite.json          what is there: models, domains, bases, recipe + fingerprint
    <variant>/<model>/            a Hugging Face folder: config.json, model.safetensors,
                                  generation_config.json, tokenizer.json, tokenizer_config.json,
                                  README.md (model card with the recipe)

A suite is built in a temporary sibling folder and renamed into place, so a reader sees either
no suite or a complete one. A cached suite is reused when its recipe fingerprint matches the
current recipe of its variant; otherwise (or with ``force``) it is rebuilt. The temporary folder
names its builder process (:mod:`umm.partials`): a build removes those of dead builders first.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from umm.errors import UmmError
from umm.experts.prebuilt import Prebuilt, load_prebuilt
from umm.experts.recipes import ModelRecipe, SuiteRecipe, get_recipe
from umm.partials import partial_path, remove_stale_partials
from umm.progress import ProgressSink, track
from umm.training import OnStep
from umm.ui import transformers_bars_off

logger = logging.getLogger(__name__)

SUITE_FILE = "suite.json"
SUITE_FORMAT = 1
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gptneox": "GPTNeoXForCausalLM"}


class SuiteNotBuiltError(UmmError):
    """No (complete) suite at the expected place."""


@dataclass(frozen=True)
class ExpertSuite:
    """A built suite on disk: ``info`` is the parsed ``suite.json``."""

    root: Path
    info: dict[str, Any]

    @property
    def variant(self) -> str:
        return self.info["variant"]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """Model name -> its entry (role, family, architecture, tokenizer, params, domains, base, ...)."""
        return self.info["models"]

    def path(self, name: str) -> Path:
        """The Hugging Face folder of model ``name``."""
        if name not in self.models:
            raise UmmError(f"expert suite {self.variant!r} has no model {name!r}; it has {', '.join(self.models)}")
        return self.root / self.models[name]["path"]

    def expert_for(self, domain: str) -> str:
        """Name of the expert model of ``domain``."""
        for name, m in self.models.items():
            if domain in m["domains"]:
                return name
        raise UmmError(f"expert suite {self.variant!r} has no expert for domain {domain!r}")

    def base_of(self, name: str) -> str | None:
        """The model ``name`` was fine-tuned from (the task-arithmetic base), or ``None``."""
        return self.models[name]["base"]

    def load(self, name: str, device: str = "cpu"):
        """``(model, tokenizer)`` of model ``name`` (safetensors only, no remote code), in eval mode."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.path(name)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        return model.to(device).eval(), tokenizer


def suite_dir(variant: str, root: str | Path | None = None) -> Path:
    """Where variant ``variant`` lives: ``<root or umm.paths.experts_dir()>/<variant>``."""
    from umm.paths import experts_dir

    return (Path(root).expanduser() if root is not None else experts_dir()) / variant


def load_suite(variant: str = "full", root: str | Path | None = None) -> ExpertSuite:
    """The built suite ``variant`` under ``root``; :class:`SuiteNotBuiltError` if there is none."""
    folder = suite_dir(variant, root)
    meta = folder / SUITE_FILE
    if not meta.is_file():
        raise SuiteNotBuiltError(
            f"no expert suite {variant!r} at {folder}; build it with `umm experts prepare --variant {variant}`"
        )
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SuiteNotBuiltError(f"{meta} is unreadable ({exc}); rebuild with `umm experts prepare --force`") from exc
    if info.get("format") != SUITE_FORMAT:
        raise SuiteNotBuiltError(f"{meta} has format {info.get('format')!r}, expected {SUITE_FORMAT}; rebuild with --force")
    return ExpertSuite(folder, info)


def is_current(suite: ExpertSuite, recipe: SuiteRecipe | None = None) -> bool:
    """Whether ``suite`` was built from ``recipe`` (default: the current recipe of its variant)."""
    recipe = recipe or get_recipe(suite.variant)
    return suite.info.get("recipe_fingerprint") == recipe.fingerprint()


def ensure_suite(
    variant: str | SuiteRecipe = "full",
    root: str | Path | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
    on_step: OnStep | None = None,
    on_progress: ProgressSink | None = None,
) -> ExpertSuite:
    """The suite ``variant``, built first if it is missing, stale (other recipe) or ``force``;
    ``on_step`` and ``on_progress`` receive a build's steps and bars (see :func:`build_suite`)."""
    recipe = get_recipe(variant) if isinstance(variant, str) else variant
    if not force:
        try:
            suite = load_suite(recipe.variant, root)
        except SuiteNotBuiltError:
            pass
        else:
            if is_current(suite, recipe):
                return suite
            logger.info("expert suite %s at %s is from another recipe; rebuilding", recipe.variant, suite.root)
    return build_suite(recipe, root, device=device, on_step=on_step, on_progress=on_progress)


# ---------------------------------------------------------------- building


def _corpus(recipe: SuiteRecipe, per_domain: int, seed: int) -> list[str]:
    from umm.eval.suites import SUITES, split_records

    return [s.text(r) for s in SUITES.values() for r in split_records(s, "train", per_domain, seed)]


def _pairs(recipe: SuiteRecipe, m: ModelRecipe) -> list[tuple[str, str]]:
    """The model's training examples as ``(prompt, target)``: the loss covers the target only.

    Pretraining documents, and every pair when ``m.loss == "text"``, have an empty prompt.
    """
    from umm.eval.suites import split_records, suite_for_domain
    from umm.experts.corpus import documents

    pairs = [("", doc) for doc in documents(m.documents, recipe.data_seed)] if m.documents else []
    for domain, n in m.mixture.items():
        suite = suite_for_domain(domain)
        for r in split_records(suite, "train", n, recipe.data_seed):
            prompt, target = suite.prompt(r), suite.target(r)
            pairs.append(("", prompt + target) if m.loss == "text" else (prompt, target))
    return pairs


def _new_model(m: ModelRecipe, tokenizer, max_length: int):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
    )
    if m.family == "llama":
        config = LlamaConfig(
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_heads,
            **ids,
        )
        cls = LlamaForCausalLM
    elif m.family == "gptneox":
        config = GPTNeoXConfig(
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_parallel_residual=True,
            **ids,
        )
        cls = GPTNeoXForCausalLM
    else:
        raise UmmError(f"model {m.name}: unknown family {m.family!r}; use llama or gptneox")
    torch.manual_seed(m.init_seed)
    model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _model_card(name: str, m: ModelRecipe, recipe: SuiteRecipe, entry: dict[str, Any]) -> str:
    from dataclasses import asdict

    return (
        f"# umm tiny expert suite `{recipe.variant}`: `{name}`\n\n"
        f"Role: {m.role}. Architecture: {entry['architecture']} ({entry['params']:,} parameters), "
        f"tokenizer: {m.tokenizer}. Domains: {', '.join(entry['domains']) or 'none (base)'}. "
        f"Fine-tuned from: {m.init_from or 'random init'}.\n\n"
        "Trained on synthetic data (`umm.eval.suites`, train split only) by `umm experts prepare`.\n\n"
        f"Recipe fingerprint: `{recipe.fingerprint()}`\n\n```json\n{json.dumps(asdict(m), indent=2, default=str)}\n```\n"
    )


def build_suite(
    variant: str | SuiteRecipe = "full",
    root: str | Path | None = None,
    *,
    device: str = "cpu",
    on_model: Callable[[str, dict[str, Any]], None] | None = None,
    on_step: OnStep | None = None,
    on_progress: ProgressSink | None = None,
    prebuilt_root: Path | None = None,
) -> ExpertSuite:
    """Train (or take prebuilt) every tokenizer and model of the recipe, score them, write the suite atomically.

    A model whose recipe names a prebuilt folder (:mod:`umm.experts.prebuilt`, looked up under
    ``prebuilt_root`` or the one shipped with umm) is taken from it once its fingerprint and file
    hashes check out, with its tokenizer; otherwise it is trained. After training, every model is
    scored on ``recipe.score_items`` ``search`` items of each task and each expert's task vector is
    measured (:func:`task_vector_stats`): both go into ``suite.json``. An existing suite of that
    variant is replaced only once the new one is complete. ``on_model(name, entry)`` is called
    after each model is trained; ``on_step`` receives each training step (run: the model's name);
    ``on_progress`` receives a bar of the models built and one of the models scored.
    """
    import torch

    recipe = get_recipe(variant) if isinstance(variant, str) else variant
    recipe.validate()
    target = suite_dir(recipe.variant, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{recipe.variant}.tmp-"
    remove_stale_partials(target.parent, prefix)  # builds killed outright (SIGKILL) left these
    tmp = partial_path(target.parent, prefix)
    tmp.mkdir()
    started = time.perf_counter()
    try:
        prebuilt = {m.name: load_prebuilt(recipe, m.name, prebuilt_root) for m in recipe.models}
        tokenizers = _tokenizers(recipe, prebuilt)
        trained: dict[str, Any] = {}
        entries: dict[str, dict[str, Any]] = {}
        for m in track(recipe.models, on_progress, f"experts ({recipe.variant})", "model"):
            model, entry = _model(recipe, m, tokenizers[m.tokenizer], trained, prebuilt[m.name], device, on_step)
            trained[m.name] = model
            out = tmp / m.name
            with transformers_bars_off():
                model.save_pretrained(out)
            tokenizers[m.tokenizer].save_pretrained(out)
            (out / "README.md").write_text(_model_card(m.name, m, recipe, entry))
            entries[m.name] = entry
            if on_model is not None:
                on_model(m.name, entry)
        _check_complete(tmp, entries)
        scores = _search_scores(recipe, trained, tokenizers, device, on_progress)
        vectors = task_vector_stats(trained, {n: e["base"] for n, e in entries.items() if e["base"]})
        info = _suite_info(recipe, entries, time.perf_counter() - started, torch.__version__)
        info["search_scores"], info["task_vectors"] = scores, vectors
        (tmp / SUITE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built expert suite %s in %.1fs at %s", recipe.variant, time.perf_counter() - started, target)
    return load_suite(recipe.variant, root)


def build_stage(
    variant: str | SuiteRecipe,
    name: str,
    out: Path | None = None,
    *,
    device: str = "cpu",
    prebuilt_root: Path | None = None,
    on_step: OnStep | None = None,
) -> Path:
    """Train model ``name`` of the recipe (and what it starts from) and save it as a prebuilt folder.

    ``out`` defaults to the folder the recipe names for it in umm's own ``umm/experts/prebuilt/``
    (in a source checkout: commit it). Ancestors are taken prebuilt when they check out.
    ``on_step`` receives each training step (run: the model's name).
    """
    from umm.experts.prebuilt import prebuilt_folder, write_prebuilt

    recipe = get_recipe(variant) if isinstance(variant, str) else variant
    recipe.validate()
    m = recipe.model(name)
    if out is None and m.prebuilt is None:
        raise UmmError(f"model {name!r} of suite {recipe.variant!r} names no prebuilt folder; pass an output folder")
    chain = [m]
    while chain[0].init_from is not None:
        chain.insert(0, recipe.model(chain[0].init_from))
    ready = {c.name: load_prebuilt(recipe, c.name, prebuilt_root) for c in chain[:-1]}
    ready[name] = None
    tokenizers = _tokenizers(recipe, {**{x.name: None for x in recipe.models}, **ready})
    tok = tokenizers[m.tokenizer]
    trained: dict[str, Any] = {}
    for c in chain:
        trained[c.name], entry = _model(recipe, c, tok, trained, ready[c.name], device, on_step)
    return write_prebuilt(out or prebuilt_folder(m.prebuilt, prebuilt_root), recipe, name, trained[name], tok, entry)


def _tokenizers(recipe: SuiteRecipe, prebuilt: dict[str, Prebuilt | None]) -> dict[str, Any]:
    """Each tokenizer of the recipe: a prebuilt model's own, else trained on the suites' ``train`` texts."""
    from transformers import AutoTokenizer

    from umm.experts.tokenizers import train_tokenizer

    out: dict[str, Any] = {}
    for m in recipe.models:
        if prebuilt[m.name] is not None and m.tokenizer not in out:
            out[m.tokenizer] = AutoTokenizer.from_pretrained(prebuilt[m.name].folder, trust_remote_code=False)
    for key, tr in recipe.tokenizers.items():
        if key not in out:
            out[key] = train_tokenizer(tr.kind, _corpus(recipe, tr.corpus_per_domain, tr.seed), tr.vocab_size)
    return out


def _model(recipe: SuiteRecipe, m: ModelRecipe, tok: Any, trained: dict[str, Any], ready: Prebuilt | None,
           device: str, on_step: OnStep | None = None) -> tuple[Any, dict[str, Any]]:
    """Model ``m`` (prebuilt, or trained from scratch or from its ``init_from``) and its suite entry."""
    from transformers import AutoModelForCausalLM

    from umm.experts.train import train_causal_lm

    if ready is not None:
        model = AutoModelForCausalLM.from_pretrained(ready.folder, use_safetensors=True, trust_remote_code=False).eval()
        steps, final_loss, seconds = ready.steps, ready.final_loss, ready.train_seconds
    else:
        model = copy.deepcopy(trained[m.init_from]) if m.init_from is not None else _new_model(m, tok, recipe.max_length)
        result = train_causal_lm(model, tok, _pairs(recipe, m), m.train, device=device, threads=recipe.threads,
                                 desc=m.name, on_step=on_step)
        model.to("cpu")
        steps, final_loss, seconds = result.steps, result.final_loss, result.seconds
    entry = {
        "path": m.name,
        "role": m.role,
        "family": m.family,
        "architecture": ARCHITECTURES[m.family],
        "tokenizer": m.tokenizer,
        "vocab_size": len(tok),
        "params": sum(p.numel() for p in model.parameters()),
        "domains": m.domains,
        "base": m.init_from,
        "steps": steps,
        "final_loss": round(final_loss, 5),
        "train_seconds": round(seconds, 2),
        "prebuilt": ready is not None,
        "threads": recipe.threads,
        "device": str(device),
    }
    return model, entry


def _search_scores(recipe: SuiteRecipe, models: dict[str, Any], tokenizers: dict[str, Any], device: str,
                   on_progress: ProgressSink | None) -> dict[str, Any]:
    """Each model's score on ``recipe.score_items`` ``search`` items of every synthetic task."""
    from umm.eval import evaluate
    from umm.eval.suites import SUITES

    if recipe.score_items <= 0:
        return {}
    out: dict[str, Any] = {"split": "search", "n": recipe.score_items, "models": {}}
    for m in track(recipe.models, on_progress, "scoring (search)", "model"):
        res = evaluate(models[m.name].to(device), tokenizers[m.tokenizer], list(SUITES), split="search",
                       limit=recipe.score_items, num_threads=recipe.threads)
        models[m.name].to("cpu")
        out["models"][m.name] = {t: round(s.score, 4) for t, s in res.scores.items()}
    return out


def task_vector_stats(models: dict[str, Any], base_of: dict[str, str]) -> dict[str, Any]:
    """Size and direction of each expert's task vector ``tau = theta_expert - theta_base``.

    ``relative_norm``: ``||tau_W|| / ||W_base||`` over the expert's 2-D weight matrices W
    (min / mean / max); ``cosine``: ``<tau_a, tau_b> / (||tau_a|| ||tau_b||)`` over all parameters,
    for each pair of experts with the same base. ``base_of`` maps each expert to its base's name.
    """
    import torch

    vectors: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"relative_norm": {}, "cosine": {}}
    for name, base_name in base_of.items():
        base = dict(models[base_name].named_parameters())
        tau = {n: (p.detach().float() - base[n].detach().float()) for n, p in models[name].named_parameters()}
        rel = [float(t.norm() / base[n].detach().float().norm()) for n, t in tau.items() if t.ndim == 2]
        out["relative_norm"][name] = {"min": round(min(rel), 4), "mean": round(sum(rel) / len(rel), 4), "max": round(max(rel), 4)}
        vectors[name] = {"base": base_name, "flat": torch.cat([t.flatten() for t in tau.values()])}
    names = sorted(vectors)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if vectors[a]["base"] == vectors[b]["base"]:
                va, vb = vectors[a]["flat"], vectors[b]["flat"]
                out["cosine"][f"{a}~{b}"] = round(float(va @ vb / (va.norm() * vb.norm())), 4)
    return out


def _suite_info(recipe: SuiteRecipe, entries: dict[str, dict[str, Any]], seconds: float, torch_version: str) -> dict[str, Any]:
    from umm import __version__
    from umm.eval.suites import SUITES

    domains = {
        s.domain: {"task": s.name, "kind": s.kind, "experts": [n for n, e in entries.items() if s.domain in e["domains"]]}
        for s in SUITES.values()
    }
    bases = {e["family"]: n for n, e in entries.items() if e["role"] == "base"}
    return {
        "format": SUITE_FORMAT,
        "variant": recipe.variant,
        "description": recipe.description,
        "recipe_fingerprint": recipe.fingerprint(),
        "recipe": recipe.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "umm_version": __version__,
        "torch_version": torch_version,
        "build_seconds": round(seconds, 2),
        "domains": domains,
        "bases": bases,
        "models": entries,
    }


def _check_complete(folder: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Every model folder has its config, weights and tokenizer (e.g. nobody removed the temp dir)."""
    for name in entries:
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / name / f).is_file():
                raise UmmError(f"building the expert suite: {folder / name / f} is missing after training; rebuild")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process put a suite there between our two renames: keep theirs.
        if (target / SUITE_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
