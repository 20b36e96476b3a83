"""The tiny expert suite as data: tokenizers, model shapes, data mixtures, steps and learning rates.

A :class:`SuiteRecipe` fully determines a suite (with the code of :mod:`umm.eval.suites` and
:mod:`umm.experts.train`): building it twice gives the same weights. Its :meth:`~SuiteRecipe.fingerprint`
is stored in ``suite.json`` so a cached suite built from another recipe is rebuilt, not reused.

Design of ``full`` (merges must beat their sources): a Llama ``pretrain`` trained long on the
domains' primitives (:mod:`umm.experts.corpus`; shipped prebuilt, see :mod:`umm.experts.prebuilt`),
then a short anneal into ``base`` on both domains' prompt -> answer pairs, so the base holds
partial skill in each; the ``math`` and ``code`` experts are short, low-learning-rate fine-tunes
of it with one recipe (small task vectors in the base's basin, which add up in a merge);
the ``list`` expert is a GPT-NeoX model with its own metaspace tokenizer, trained from scratch on a
domain the Llama models are weak at (the heterogeneous source for distribution fusion).
``small`` keeps the old single-stage layout at toy size, for tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from umm.errors import UmmError
from umm.experts.train import TrainConfig

Family = Literal["llama", "gptneox"]
RECIPE_VERSION = 1


@dataclass(frozen=True)
class TokenizerRecipe:
    """A tokenizer trained on ``corpus_per_domain`` train-split texts of every suite."""

    kind: Literal["bytelevel", "metaspace"]
    vocab_size: int
    corpus_per_domain: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class ModelRecipe:
    """One model of the suite.

    ``init_from`` names an earlier model of the recipe to fine-tune (its config and tokenizer are
    then reused and the shape fields ignored). ``mixture`` maps domains to training-record counts
    from each suite's ``train`` split. ``experts_of`` names the domains an expert is an expert of
    when its mixture also replays a little of other domains (default: every mixture domain).
    """

    name: str
    role: Literal["base", "expert"]
    family: Family
    tokenizer: str
    mixture: Mapping[str, int]
    train: TrainConfig
    init_from: str | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 352
    init_seed: int = 0
    experts_of: tuple[str, ...] | None = None
    documents: Mapping[str, int] = field(default_factory=dict)
    loss: Literal["target", "text"] = "target"
    prebuilt: str | None = None

    @property
    def domains(self) -> list[str]:
        """Domains this model is an expert of (empty for a base)."""
        if self.role == "base":
            return []
        return list(self.experts_of) if self.experts_of is not None else list(self.mixture)


@dataclass(frozen=True)
class SuiteRecipe:
    """All models of a suite variant, built in order (a model's ``init_from`` comes earlier)."""

    variant: str
    tokenizers: Mapping[str, TokenizerRecipe]
    models: tuple[ModelRecipe, ...]
    threads: int = 1  # one thread: as fast for these sizes, and far faster on a loaded machine
    data_seed: int = 0
    max_length: int = 128
    description: str = ""
    score_items: int = 256  # search items per task each model is scored on for suite.json (0: none)

    def model(self, name: str) -> ModelRecipe:
        for m in self.models:
            if m.name == name:
                return m
        raise UmmError(f"suite {self.variant!r} has no model {name!r}; it has {', '.join(m.name for m in self.models)}")

    def to_dict(self) -> dict:
        from umm.eval.suites import SUITES_VERSION
        from umm.experts.corpus import CORPUS_VERSION

        d = asdict(self)
        d["version"] = RECIPE_VERSION
        d["suites_version"] = SUITES_VERSION
        d["corpus_version"] = CORPUS_VERSION
        return d

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the recipe (and the recipe format version)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def validate(self) -> None:
        """Check names, references and tokenizer keys; raise :class:`UmmError` naming the problem."""
        from umm.eval.suites import suite_for_domain

        seen: dict[str, ModelRecipe] = {}
        for m in self.models:
            if m.name in seen:
                raise UmmError(f"recipe {self.variant}: model name {m.name!r} appears twice")
            if m.tokenizer not in self.tokenizers:
                raise UmmError(f"recipe {self.variant}: model {m.name} uses unknown tokenizer {m.tokenizer!r}")
            if m.init_from is not None:
                parent = seen.get(m.init_from)
                if parent is None:
                    raise UmmError(f"recipe {self.variant}: model {m.name} starts from {m.init_from!r}, not built before it")
                if parent.tokenizer != m.tokenizer or parent.family != m.family:
                    raise UmmError(f"recipe {self.variant}: model {m.name} must keep {m.init_from}'s family and tokenizer")
            for d in m.mixture:
                suite_for_domain(d)
            if m.experts_of is not None and (not m.experts_of or not set(m.experts_of) <= set(m.mixture)):
                raise UmmError(f"recipe {self.variant}: model {m.name} is an expert of {list(m.experts_of)}, "
                               f"which must be a non-empty part of its mixture {list(m.mixture)}")
            seen[m.name] = m


def _full() -> SuiteRecipe:
    llama = dict(family="llama", tokenizer="bytelevel", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352)
    return SuiteRecipe(
        variant="full",
        description="Llama base (0.93M params, pretrained long, shipped prebuilt) + short math/code fine-tunes "
        "that merge; GPT-NeoX list expert; a few minutes on 2 cores",
        tokenizers={
            "bytelevel": TokenizerRecipe("bytelevel", vocab_size=512, corpus_per_domain=1500),
            "metaspace": TokenizerRecipe("metaspace", vocab_size=320, corpus_per_domain=1500),
        },
        models=(
            # Long pretraining on the domains' primitives (equations, questions, descriptions,
            # functions, copying) with a few whole prompt+answer texts, loss on every token.
            # 2000 steps take 10-15 min on one core: shipped prebuilt (`umm experts prepare --stage pretrain`).
            ModelRecipe(
                name="pretrain", role="base", mixture={"math": 450, "code": 450}, loss="text",
                documents={"equations": 5200, "math-questions": 3000, "code-descriptions": 3000, "code-defs": 3800,
                           "repeat": 5000},
                train=TrainConfig(steps=2000, batch_size=32, lr=3e-3, warmup=50, seed=1), init_seed=1,
                prebuilt="full-pretrain", **llama,
            ),
            # A short anneal on both domains' prompt -> answer pairs (with some equations and
            # copying): partial skill in each domain, the shared start of both experts.
            ModelRecipe(
                name="base", role="base", init_from="pretrain", mixture={"math": 3000, "code": 3000},
                documents={"equations": 1000, "repeat": 500},
                train=TrainConfig(steps=400, batch_size=32, lr=1e-3, warmup=20, seed=5), **llama,
            ),
            # Short, gentle fine-tunes with one recipe for both (unequal recipes merge worse), no
            # replay: task vectors ~6% of the base per matrix that add up in a merge.
            ModelRecipe(
                name="math", role="expert", mixture={"math": 4000}, init_from="base",
                train=TrainConfig(steps=300, batch_size=32, lr=3e-4, warmup=20, seed=2), **llama,
            ),
            ModelRecipe(
                name="code", role="expert", mixture={"code": 4000}, init_from="base",
                train=TrainConfig(steps=300, batch_size=32, lr=3e-4, warmup=20, seed=3), **llama,
            ),
            ModelRecipe(
                name="list", role="expert", family="gptneox", tokenizer="metaspace", mixture={"list": 4000},
                train=TrainConfig(steps=500, batch_size=32, lr=3e-3, warmup=30, seed=4), init_seed=4,
                hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
            ),
        ),
    )


def _small() -> SuiteRecipe:
    llama = dict(family="llama", tokenizer="bytelevel", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160)
    return SuiteRecipe(
        variant="small",
        description="same layout, 2 layers x 64 hidden, few steps: for tests (well under a minute)",
        score_items=16,
        tokenizers={
            "bytelevel": TokenizerRecipe("bytelevel", vocab_size=384, corpus_per_domain=300),
            "metaspace": TokenizerRecipe("metaspace", vocab_size=256, corpus_per_domain=300),
        },
        models=(
            ModelRecipe(
                name="base", role="base", mixture={"math": 300, "code": 300, "list": 300},
                train=TrainConfig(steps=40, batch_size=8, lr=5e-3, warmup=5, seed=1), init_seed=1, **llama,
            ),
            ModelRecipe(
                name="math", role="expert", mixture={"math": 600}, init_from="base",
                train=TrainConfig(steps=25, batch_size=8, lr=2e-3, warmup=5, seed=2), **llama,
            ),
            ModelRecipe(
                name="code", role="expert", mixture={"code": 600}, init_from="base",
                train=TrainConfig(steps=25, batch_size=8, lr=2e-3, warmup=5, seed=3), **llama,
            ),
            ModelRecipe(
                name="list", role="expert", family="gptneox", tokenizer="metaspace", mixture={"list": 600},
                train=TrainConfig(steps=30, batch_size=8, lr=5e-3, warmup=5, seed=4), init_seed=4,
                hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
            ),
        ),
    )


RECIPES: Mapping[str, SuiteRecipe] = {"full": _full(), "small": _small()}


def get_recipe(variant: str) -> SuiteRecipe:
    """The recipe of a named variant (``full`` or ``small``)."""
    try:
        return RECIPES[variant]
    except KeyError:
        raise UmmError(f"unknown expert suite variant {variant!r}; use one of: {', '.join(RECIPES)}") from None


def scaled(recipe: SuiteRecipe, steps: float = 1.0, data: float = 1.0, variant: str | None = None) -> SuiteRecipe:
    """A copy of ``recipe`` with every model's steps and data counts multiplied (to regenerate bigger/smaller)."""
    models = tuple(
        replace(
            m,
            mixture={d: max(1, round(n * data)) for d, n in m.mixture.items()},
            train=replace(m.train, steps=max(1, round(m.train.steps * steps))),
        )
        for m in recipe.models
    )
    return replace(recipe, models=models, variant=variant or f"{recipe.variant}-x{steps:g}")
