"""The one place where models and tokenizers are loaded for inference or training.

Every load is local (``local_files_only``), safetensors-only and ``trust_remote_code=False``.
A folder is validated with :class:`~umm.checkpoints.reader.Checkpoint` first, so a pickle-only or
truncated folder gets our message, and its config is checked (:func:`check_model_config`) before
transformers sees it: configs that ask for remote code (``auto_map``), model types this
transformers does not know, and models that are not causal LMs are refused with a reason.
A load that would leave weights randomly initialised (names missing from the checkpoint) fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from umm.checkpoints.budget import ModelBudget, check_config_budget
from umm.checkpoints.errors import CheckpointError, UnsupportedModelError
from umm.checkpoints.reader import CONFIG_NAME, Checkpoint, read_json_file
from umm.errors import UmmError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "auto": None,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``/``"auto"``: CUDA if available, else CPU.

    Raises :class:`UmmError` when a CUDA device is asked for but absent.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip() if isinstance(name, str) else name)
    except (RuntimeError, TypeError) as e:
        raise UmmError(f"unknown device {name!r} ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UmmError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UmmError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UmmError(f"device {name!r} asked for, but MPS is not available here")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """float32|fp32|bfloat16|bf16|float16|fp16 -> that dtype; ``"auto"``/``None`` -> ``None``
    (keep the checkpoint's dtype). Raises :class:`UmmError` for anything else."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UmmError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def first_line(e: BaseException) -> str:
    """The exception's type and the first line of its message, for a one-line reason."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:500]}" if lines else type(e).__name__


def check_model_config(config: Mapping[str, Any], where: str | Path, budget: ModelBudget | None = None) -> str:
    """Refuse a config that needs remote code, names an unknown model type or is not a causal LM
    (:class:`UnsupportedModelError`), or declares sizes that are invalid or over ``budget``
    (:func:`~umm.checkpoints.budget.check_config_budget`).

    Returns the causal-LM class name transformers would build. ``where`` names the folder in messages.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "auto_map" in config or config.get("trust_remote_code"):
        raise UnsupportedModelError(
            f"{where}: config.json asks for custom model code (auto_map); umm never runs code that "
            "comes with a model (trust_remote_code=False): use a model type built into transformers"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is unknown to the installed transformers; "
            "upgrade transformers or convert the model to a supported architecture"
        )
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if mapped is None:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not a causal language model")
    names = (mapped,) if isinstance(mapped, str) else tuple(mapped)
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and not any(
        isinstance(a, str) and (a.endswith(("ForCausalLM", "LMHeadModel")) or a in names) for a in archs
    ):
        raise UnsupportedModelError(
            f"{where}: architectures {archs} is not a causal LM head (expected e.g. {names[0]}); "
            "its weights would not fit a causal LM"
        )
    check_config_budget(config, where, budget)
    return names[0]


def _read_optional_json(path: Path) -> Any:
    return read_json_file(path, path.name) if path.is_file() else None


def check_tokenizer_files(path: str | Path) -> None:
    """Refuse a tokenizer that is absent or asks for custom code, without loading it."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    tok_cfg = _read_optional_json(folder / "tokenizer_config.json")
    model_cfg = _read_optional_json(folder / "config.json")
    custom = [(name, cfg) for name, cfg in (("tokenizer_config.json", tok_cfg), ("config.json", model_cfg))
              if isinstance(cfg, dict) and isinstance(cfg.get("auto_map"), dict)
              and (name == "tokenizer_config.json" or "AutoTokenizer" in cfg["auto_map"])]
    if custom:
        raise CheckpointError(
            f"{folder / custom[0][0]}: the tokenizer needs custom code (auto_map); umm never "
            "runs code that comes with a model (trust_remote_code=False)"
        )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, loaded locally without remote code. If it has no pad token, the EOS
    token is used for padding (batched generation needs one)."""
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # custom code was refused above, by the files' auto_map, not by this message
        raise CheckpointError(f"{path}: cannot load the tokenizer: {first_line(e)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> PreTrainedModel:
    """Load a causal LM from a local safetensors folder, in eval mode, on ``device``.

    ``dtype=None``/``"auto"`` keeps the checkpoint's dtype. Raises :class:`CheckpointError` for
    pickle-only or corrupt folders, configs needing remote code, non-causal-LM models, and
    checkpoints lacking weights the model needs (they would be silently random otherwise).
    """
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    with Checkpoint.open(path) as ckpt:
        check_model_config(ckpt.config, ckpt.path / CONFIG_NAME)
        folder = ckpt.path
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=torch_dtype if torch_dtype is not None else "auto",
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            output_loading_info=True,
        )
    except Exception as e:
        raise CheckpointError(f"{folder}: transformers cannot load this model: {first_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}")
        if mismatched:
            detail.append(f"wrong shape {', '.join(map(str, mismatched[:5]))}")
        raise CheckpointError(
            f"{folder}: weights do not match config.json ({'; '.join(detail)}); the model would be partly random"
        )
    if info.get("unexpected_keys"):
        logger.warning("%s: ignoring unexpected tensors %s", folder, sorted(info["unexpected_keys"])[:5])
    model = model.to(target)
    model.eval()
    logger.info("loaded %s (%s) on %s in %s", folder, type(model).__name__, target, model.dtype)
    return model
