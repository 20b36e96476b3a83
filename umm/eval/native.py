"""A lean CPU forward for plain Llama checkpoints: the operations of transformers' ``LlamaForCausalLM``
(SDPA attention), in the same order and on the same tensor shapes, without its per-call machinery.

On the tiny experts, transformers' forward spends most of a decoding step in Python (mask
factories, output capturing, hub-kernel dispatch, config look-ups), and loading the model class
imports about 2 CPU-s of modules (``torch._dynamo``, ``torch.distributed.tensor``). This module
computes each step as::

    h = embed[ids]
    for each layer:  h = h + o(SDPA(rope(q(n1(h))), rope(k(n1(h))), v(n1(h)), mask))
                     h = h + down(silu(gate(n2(h))) * up(n2(h)))
    logits = lm_head(norm(h)[:, -keep:])

with ``n(x) = w * x * rsqrt(mean(x^2) + eps)`` (RMSNorm), ``rope(x) = x cos + rotate_half(x) sin``
at ``theta_i = pos * base^(-2i/d)``, and the same boolean mask transformers passes to SDPA (causal
and padding; none when no position is padded). Same kernels on the same shapes give the same
bits: ``tests/test_eval_native.py`` checks the logits and greedy outputs against transformers.

Only what is checked is taken: ``LlamaForCausalLM`` in float32, default RoPE, SiLU, no biases,
as many key/value heads as query heads, one or more safetensors files, every tensor present with
its shape; :func:`load_native_llama` returns ``None`` for anything else, and the caller loads the
model with transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from umm.checkpoints.budget import check_config_budget
from umm.checkpoints.reader import Checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeConfig:
    """The fields of a Llama ``config.json`` the forward reads (and the ones ``generate`` asks for)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    eos_token_id: int | list[int] | None


@dataclass(frozen=True)
class NativeOutput:
    """What ``generate``'s decode loop reads from a forward: logits and the KV cache."""

    logits: torch.Tensor
    cache: list[tuple[torch.Tensor, torch.Tensor]]


def native_config(config: dict[str, Any]) -> NativeConfig | None:
    """The config as :class:`NativeConfig` when this module computes exactly what transformers does, else None."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", config.get("rope_theta"))
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    supported = (
        config.get("model_type") == "llama"
        and config.get("architectures") in (None, ["LlamaForCausalLM"])
        and config.get("hidden_act", "silu") == "silu"
        and not config.get("attention_bias", False)
        and not config.get("mlp_bias", False)
        and config.get("pretraining_tp", 1) == 1
        and rope_type == "default"
        and rope.get("partial_rotary_factor", 1.0) == 1.0
        and isinstance(theta, (int, float))
        and isinstance(heads, int) and isinstance(hidden, int) and heads > 0
        and config.get("num_key_value_heads", heads) == heads
        and config.get("dtype", config.get("torch_dtype", "float32")) == "float32"
        and not config.get("attention_dropout", 0.0)
        and config.get("_attn_implementation", config.get("attn_implementation")) in (None, "sdpa")
    )
    if not supported:
        return None
    head_dim = config.get("head_dim") or hidden // heads
    return NativeConfig(
        hidden_size=hidden, num_layers=int(config["num_hidden_layers"]), num_heads=heads, head_dim=int(head_dim),
        vocab_size=int(config["vocab_size"]), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings"), eos_token_id=config.get("eos_token_id"),
    )


def _expected_shapes(c: NativeConfig, intermediate: int) -> dict[str, tuple[int, ...]]:
    h, q = c.hidden_size, c.num_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (q, h),
            p + "self_attn.v_proj.weight": (q, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (intermediate, h), p + "mlp.up_proj.weight": (intermediate, h),
            p + "mlp.down_proj.weight": (h, intermediate),
        })
    return shapes


class NativeLlama(torch.nn.Module):
    """``LlamaForCausalLM``'s inference forward (see the module docstring) over a flat weight table.

    Takes and returns its KV cache as ``cache`` (a list of (key, value) per layer, grown by
    concatenation as transformers' ``DynamicCache`` does) and keeps only the last
    ``logits_to_keep`` positions' logits, so :func:`umm.eval.generate.generate` drives it as it
    drives a transformers model.
    """

    def __init__(self, config: NativeConfig, weights: dict[str, torch.Tensor], eos_token_id: Any = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = NativeGenerationConfig(eos_token_id)
        self.weights = torch.nn.ParameterDict({k.replace(".", "/"): torch.nn.Parameter(v, requires_grad=False)
                                               for k, v in weights.items()})
        names = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        self._layers = [tuple(weights[f"model.layers.{i}.{n}.weight"] for n in names) for i in range(config.num_layers)]
        self._embed, self._final_norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
        self._head = self._embed if config.tie_word_embeddings else weights["lm_head.weight"]
        dim = config.head_dim
        # transformers' compute_default_rope_parameters, in float32
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.eval()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.config.rms_norm_eps)
        return weight * x32.to(x.dtype)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _mask(self, attention_mask: torch.Tensor | None, b: int, q_len: int, kv_len: int) -> torch.Tensor | None:
        """transformers' SDPA mask: None when nothing is padded and causality is implied, else
        ``causal & padding`` as a (batch, 1, q, kv) boolean view."""
        pad = None if attention_mask is None else attention_mask[:, -kv_len:].bool()
        if (q_len == 1 or kv_len == q_len) and (pad is None or bool(pad.all())):
            return None
        q_pos = torch.arange(q_len, device=self.inv_freq.device) + (kv_len - q_len)
        kv_pos = torch.arange(kv_len, device=self.inv_freq.device)
        mask = kv_pos[None, None, None, :] <= q_pos[None, None, :, None]
        if pad is not None:
            mask = mask & pad[:, None, None, :]
        return mask.expand(b, -1, q_len, kv_len)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: list | None = None, use_cache: bool = True,
                logits_to_keep: int = 0) -> NativeOutput:
        c = self.config
        b, q_len = input_ids.shape
        past = cache or []
        kv_len = q_len + (past[0][0].shape[2] if past else 0)
        if position_ids is None:
            position_ids = torch.arange(kv_len - q_len, kv_len).unsqueeze(0)
        h = F.embedding(input_ids, self._embed)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * 1.0).to(h.dtype).unsqueeze(1), (emb.sin() * 1.0).to(h.dtype).unsqueeze(1)
        mask = self._mask(attention_mask, b, q_len, kv_len)
        scale = c.head_dim ** -0.5
        causal = q_len > 1 and mask is None
        shape = (b, q_len, -1, c.head_dim)
        new_cache = []
        for i, (n1, wq, wk, wv, wo, n2, wg, wu, wd) in enumerate(self._layers):
            x = self._norm(h, n1)
            q = F.linear(x, wq).view(shape).transpose(1, 2)
            k = F.linear(x, wk).view(shape).transpose(1, 2)
            v = F.linear(x, wv).view(shape).transpose(1, 2)
            q = (q * cos) + (self._rotate_half(q) * sin)
            k = (k * cos) + (self._rotate_half(k) * sin)
            if past:
                k, v = torch.cat([past[i][0], k], dim=-2), torch.cat([past[i][1], v], dim=-2)
            new_cache.append((k, v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=causal)
            a = a.reshape(a.shape[0], -1, q_len, v.shape[-1]).transpose(1, 2).contiguous()
            h = h + F.linear(a.reshape(b, q_len, -1).contiguous(), wo)
            x = self._norm(h, n2)
            h = h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        h = self._norm(h, self._final_norm)
        if logits_to_keep:
            h = h[:, -logits_to_keep:, :]
        return NativeOutput(F.linear(h, self._head), new_cache)


@dataclass(frozen=True)
class NativeGenerationConfig:
    """``generation_config.json``'s end-of-sequence id(s), which ``generate`` adds to the config's."""

    eos_token_id: int | list[int] | None


def load_native_llama(path: str | Path, device: torch.device, dtype: str | None = None) -> NativeLlama | None:
    """The checkpoint at ``path`` as a :class:`NativeLlama` on the CPU, or None when it is not a plain
    float32 Llama this module computes exactly (then load it with transformers).

    ``dtype`` must be None, ``auto`` or ``float32``. Weights are read with umm's safetensors
    reader (no pickle); a missing or mis-shaped tensor also gives None, so that transformers'
    loader reports it.
    """
    if device.type != "cpu" or dtype not in (None, "auto", "float32"):
        return None
    with Checkpoint.open(path) as ckpt:
        config = native_config(dict(ckpt.config))
        if config is None:
            return None
        check_config_budget(ckpt.config, ckpt.path)
        intermediate = ckpt.config.get("intermediate_size")
        if not isinstance(intermediate, int):
            return None
        want = _expected_shapes(config, intermediate)
        have = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
        if have != want or any(i.dtype != torch.float32 for i in ckpt.tensors.values()):
            logger.debug("%s: tensors differ from a plain Llama's; loading with transformers", path)
            return None
        weights = dict(ckpt.iter_tensors())
        gen_file = ckpt.path / "generation_config.json"
    eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else None
    return NativeLlama(config, weights, eos)


# the tokenizer_config.json keys under which transformers' tokenizer encodes and decodes exactly as
# the `tokenizers` library does on tokenizer.json (a BPE model: transformers never cleans up its spaces)
_PLAIN_TOKENIZER_KEYS = frozenset({
    "backend", "bos_token", "eos_token", "pad_token", "unk_token", "is_local", "local_files_only",
    "model_max_length", "padding_side", "truncation_side", "tokenizer_class", "model_input_names",
})


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class NativeTokenizer:
    """A ``tokenizer.json`` driven by the ``tokenizers`` library, with the calls ``generate`` makes of a
    transformers tokenizer (``tokenizer(text, add_special_tokens=...)["input_ids"]``, ``decode``, the
    special token ids); no chat template."""

    chat_template = None

    def __init__(self, backend: Any, special: dict[str, str | None]) -> None:
        self._backend = backend
        ids = {k: (None if v is None else backend.token_to_id(v)) for k, v in special.items()}
        self.bos_token_id, self.eos_token_id = ids.get("bos_token"), ids.get("eos_token")
        self.pad_token_id = ids.get("pad_token") if ids.get("pad_token") is not None else self.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


def load_native_tokenizer(path: str | Path) -> NativeTokenizer | None:
    """The folder's ``tokenizer.json`` through the ``tokenizers`` library when transformers would
    encode and decode it the same way (a BPE model, a plain ``tokenizer_config.json``, no chat
    template, every special token in the vocabulary); None otherwise (load it with transformers)."""
    from tokenizers import Tokenizer

    from umm.checkpoints.loading import check_tokenizer_files

    folder = Path(path)
    check_tokenizer_files(folder)
    tok_file, cfg_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tok_file.is_file() or not cfg_file.is_file() or (folder / "chat_template.jinja").exists():
        return None
    cfg = json.loads(cfg_file.read_text())
    if not isinstance(cfg, dict) or not set(cfg) <= _PLAIN_TOKENIZER_KEYS:
        return None
    if cfg.get("tokenizer_class", "TokenizersBackend") not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return None
    spec = json.loads(tok_file.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict) or spec["model"].get("type") != "BPE":
        return None
    backend = Tokenizer.from_file(str(tok_file))
    special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    if any(v is not None and backend.token_to_id(v) is None for v in special.values()):
        return None
    return NativeTokenizer(backend, special)
