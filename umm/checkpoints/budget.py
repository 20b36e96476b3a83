"""What a model folder's ``config.json`` may ask for, checked before anything is built from it.

A config is a few hundred bytes, but transformers builds what it says: 100,000 layers (tens of
seconds and gigabytes of Python objects even on the ``meta`` device), or a GPT-Neo with a huge
``max_position_embeddings`` whose attention layers each allocate a P×P mask when the model is
loaded. :func:`check_config_budget` therefore runs on the parsed JSON alone:

- every size key transformers reads (layers, hidden and intermediate sizes, attention and KV heads,
  positions, vocabulary, experts; see :data:`SIZE_KEYS`) must be a positive integer (``null`` =
  the model's default) no larger than its :class:`ModelBudget` bound, at the top level and in
  ``text_config``; integers under those keys in other sub-configs (a vision tower) are bounded too;
- ``num_key_value_heads`` must divide ``num_attention_heads`` (0 or a non-divisor crashes inside
  transformers with ZeroDivisionError or builds a model that cannot run);
- GPT-Neo's ``attention_types`` repeat counts may not add up to more than ``max_layers``.

:func:`check_parameter_count` then compares the parameters stored in the safetensors headers with a
floor computed from the config, ``layers·hidden² + vocab·hidden`` (every block has at least one
hidden×hidden projection's worth of weights, the embedding has vocab×hidden): a config describing
a model more than twice the floor bigger than its files is refused before it is built. Buffers
that a model allocates when it is built but never stores (masks, caches) are bounded by
``max_buffer_bytes``, measured by the caller on the ``meta`` device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from umm.checkpoints.errors import CheckpointTooLargeError, InvalidConfigError


class ModelBudget(BaseModel):
    """Upper bounds on what an untrusted config may ask for (the defaults admit every public model
    we know of: e.g. 126 layers, hidden 16384, 10M positions, a 256k vocabulary)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_layers: int = Field(default=1024, ge=1, description="transformer blocks")
    max_hidden_size: int = Field(default=65_536, ge=1, description="hidden size, embedding width, head_dim")
    max_intermediate_size: int = Field(default=1_048_576, ge=1, description="MLP width")
    max_attention_heads: int = Field(default=4096, ge=1, description="attention and key/value heads")
    max_positions: int = Field(default=16_777_216, ge=1, description="max_position_embeddings and alike")
    max_vocab_size: int = Field(default=2_097_152, ge=1, description="vocabulary rows")
    max_experts: int = Field(default=4096, ge=1, description="MoE experts per layer")
    max_parameters: int = Field(default=2 * 10**12, ge=1, description="parameters stored in the files")
    max_buffer_bytes: int = Field(
        default=512 * 2**20, ge=0, description="bytes of buffers (masks, caches) the built model allocates"
    )


#: config key -> (budget field, smallest valid value)
SIZE_KEYS: dict[str, tuple[str, int]] = {
    **{k: ("max_layers", 1) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")},
    **{k: ("max_hidden_size", 1) for k in ("hidden_size", "n_embd", "d_model", "head_dim")},
    **{
        k: ("max_intermediate_size", 1)
        for k in ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size")
    },
    **{
        k: ("max_attention_heads", 1)
        for k in ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "n_head_kv", "num_kv_heads")
    },
    **{k: ("max_positions", 1) for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")},
    **{k: ("max_vocab_size", 1) for k in ("vocab_size", "padded_vocab_size")},
    **{k: ("max_experts", 0) for k in ("num_local_experts", "num_experts", "n_routed_experts")},
}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _over(where: str, key: str, value: int, budget: ModelBudget, field: str) -> CheckpointTooLargeError:
    return CheckpointTooLargeError(
        f"{where}: config.json asks for {key} = {value}, over the admission budget of "
        f"{getattr(budget, field)} (model_budget.{field})"
    )


def _check_level(config: Mapping[str, Any], where: str, budget: ModelBudget, strict: bool) -> None:
    """Check one (sub-)config; ``strict``: the language model's own keys must also be valid."""
    for key, (field, minimum) in SIZE_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if strict and not (values and all(_is_int(v) and v >= minimum for v in values)):
            raise InvalidConfigError(
                f"{where}: config.json has {key} = {repr(value)[:80]}; it must be an integer >= {minimum} (or a list of them)"
            )
        for v in values:
            if _is_int(v) and v > getattr(budget, field):
                raise _over(where, key, v, budget, field)
    if strict:
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if _is_int(heads) and _is_int(kv) and (kv > heads or heads % kv):
            raise InvalidConfigError(
                f"{where}: config.json has num_key_value_heads = {kv}, which does not divide "
                f"num_attention_heads = {heads}"
            )
        _check_attention_types(config.get("attention_types"), where, budget)


def _check_attention_types(value: Any, where: str, budget: ModelBudget) -> None:
    """GPT-Neo's ``[[["global", "local"], repeats], ...]``: transformers expands it into one entry per layer."""
    if value is None:
        return
    if not isinstance(value, list):
        raise InvalidConfigError(f"{where}: config.json attention_types is not a list")
    total = 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) and _is_int(item[1])
                and item[1] >= 0):
            raise InvalidConfigError(f"{where}: config.json attention_types entry {repr(item)[:80]} is not [[types], repeats]")
        total += len(item[0]) * item[1]
        if total > budget.max_layers:
            raise _over(where, "attention_types (layers)", total, budget, "max_layers")


def check_config_budget(config: Mapping[str, Any], where: str | Path, budget: ModelBudget | None = None) -> None:
    """Raise :class:`InvalidConfigError` or :class:`CheckpointTooLargeError` (see the module docstring)."""
    budget = budget or ModelBudget()
    where = str(where)
    _check_level(config, where, budget, strict=True)
    for key, sub in config.items():
        if isinstance(sub, dict):
            _check_level(sub, f"{where} ({key})", budget, strict=key == "text_config")


def _language_level(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    if isinstance(text, dict) and not any(_is_int(config.get(k)) for k in _HIDDEN_KEYS):
        return text
    return config


def _first_int(config: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        if _is_int(config.get(key)):
            return int(config[key])
    return 0


def parameter_floor(config: Mapping[str, Any]) -> int:
    """A lower bound on the parameters of the model ``config`` describes: ``layers·hidden² + vocab·hidden``."""
    level = _language_level(config)
    hidden = _first_int(level, _HIDDEN_KEYS)
    layers = _first_int(level, _LAYER_KEYS)
    vocab = _first_int(level, ("vocab_size", "padded_vocab_size"))
    return layers * hidden * hidden + vocab * hidden


def check_parameter_count(config: Mapping[str, Any], stored: int, where: str | Path,
                          budget: ModelBudget | None = None) -> None:
    """Refuse ``stored`` parameters over the budget, or fewer than half the config's :func:`parameter_floor`."""
    budget = budget or ModelBudget()
    if stored > budget.max_parameters:
        raise CheckpointTooLargeError(
            f"{where}: {stored} parameters, over the admission budget of {budget.max_parameters} "
            "(model_budget.max_parameters)"
        )
    floor = parameter_floor(config)
    if stored < floor // 2:
        raise InvalidConfigError(
            f"{where}: config.json describes a model of at least {floor} parameters but the weights hold {stored}; "
            "the config does not belong to these weights"
        )


def check_buffer_bytes(nbytes: int, where: str | Path, budget: ModelBudget | None = None) -> None:
    """Refuse a model whose buffers (allocated when built, never stored) exceed the budget."""
    budget = budget or ModelBudget()
    if nbytes > budget.max_buffer_bytes:
        raise CheckpointTooLargeError(
            f"{where}: building this model allocates {nbytes} bytes of buffers (e.g. attention masks sized by "
            f"max_position_embeddings), over the admission budget of {budget.max_buffer_bytes} "
            "(model_budget.max_buffer_bytes)"
        )
