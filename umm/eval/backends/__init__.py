"""Generation back ends: who turns the task prompts into completions.

``loop`` and ``hf`` decode with a PyTorch model (:mod:`umm.eval.generate`: our own KV-cache loop,
or ``model.generate``). ``vllm`` hands the same token ids, stops and generation length to a vLLM
engine that holds its own copy of the model on a CUDA GPU (:class:`umm.eval.backends.vllm.VllmEngine`,
the ``umm[vllm]`` extra); a merge search pushes each candidate's weights into that engine in
memory (:meth:`Engine.load_weights`), without writing a folder or restarting it. ``auto`` is
``vllm`` when it can run here and load the model, else :data:`~umm.eval.generate.DEFAULT_BACKEND`
with a warning saying why; asking for ``vllm`` by name fails with the reason instead
(:class:`BackendError`).

One function dispatches: :func:`complete` takes either a PyTorch model (``loop``/``hf``) or an
:class:`Engine`; :func:`open_engine` opens the engine a back-end name asks for (or none).
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from umm.eval.generate import DEFAULT_BACKEND, generate
from umm.eval.task import EvalError

logger = logging.getLogger(__name__)

#: every back-end name ``umm eval --backend`` and ``umm evolve``'s ``backend`` accept
Backend = Literal["loop", "hf", "vllm", "auto"]
BACKENDS: tuple[str, ...] = get_args(Backend)
#: the back ends that decode with a PyTorch model in this process
TORCH_BACKENDS = ("loop", "hf")
#: what to install for the vLLM back end
VLLM_HINT = "pip install 'umm[vllm]' on a machine with an NVIDIA GPU"


class BackendError(EvalError):
    """The generation back end asked for cannot run here; the message says why."""


class Engine(ABC):
    """A generation engine that owns its copy of the model (as vLLM does) and its tokenizer."""

    #: the back-end name this engine implements (``result.meta["backend"]``)
    name: str = ""
    #: the model folder's tokenizer (:func:`umm.checkpoints.loading.load_tokenizer`)
    tokenizer: Any = None

    @abstractmethod
    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        chat: bool = False,
        temperature: float = 0.0,
        seed: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Completions of ``prompts`` as :func:`umm.eval.generate.generate` defines them: the text
        after the prompt, cut at the first stop sequence, greedy when ``temperature == 0``."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Replace the engine's weights by ``(checkpoint tensor name, tensor)`` pairs, in memory;
        returns how many tensors were loaded. Later completions use the new weights."""

    def close(self) -> None:  # noqa: B027 (optional hook: an engine without resources has nothing to free)
        """Free the engine's memory (GPU included)."""


def check_backend(name: str) -> Backend:
    """``name`` as a :data:`Backend`, or :class:`BackendError` listing the valid ones."""
    if name not in BACKENDS:
        raise BackendError(f"unknown generation back end {name!r}; use one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def torch_backend(name: str) -> Literal["loop", "hf"]:
    """The PyTorch decoding a back-end name means with a PyTorch model: ``loop``/``hf`` as named,
    else (``auto``, ``vllm`` fallen back) :data:`~umm.eval.generate.DEFAULT_BACKEND`."""
    return name if name in TORCH_BACKENDS else DEFAULT_BACKEND  # type: ignore[return-value]


def vllm_unavailable(device: str | None) -> str | None:
    """Why the vLLM back end cannot run here for ``device`` (``None``: it can, as far as can be
    told without loading a model): vLLM not installed, no CUDA GPU, or a non-CUDA device asked for."""
    import torch

    if device is not None and str(device).strip().lower() not in ("auto", "") and not str(device).startswith("cuda"):
        return f"vLLM runs on CUDA GPUs and the device asked for is {device!r}"
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed ({VLLM_HINT})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (vLLM needs one)"
    if device is not None and str(device).startswith("cuda:") and str(device) not in ("cuda:0",):
        return (f"vLLM picks its GPU from CUDA_VISIBLE_DEVICES, not from --device {device}: "
                f"run with CUDA_VISIBLE_DEVICES={str(device).split(':', 1)[1]} and --device cuda")
    return None


def open_engine(
    path: str | Path,
    backend: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    **options: Any,
) -> Engine | None:
    """The engine ``backend`` asks for on the model folder ``path``, or ``None`` to decode with a
    PyTorch model (``loop``/``hf``, or ``auto`` where vLLM cannot run or cannot load the model:
    a warning then says why). ``vllm`` by name raises :class:`BackendError` with the reason.
    ``options`` go to :class:`~umm.eval.backends.vllm.VllmEngine`."""
    backend = check_backend(backend)
    if backend in TORCH_BACKENDS:
        return None
    reason = vllm_unavailable(device)
    if reason is None:
        from umm.eval.backends.vllm import VllmEngine, VllmLoadError

        try:
            return VllmEngine(path, dtype=dtype, seed=seed, **options)
        except VllmLoadError as e:
            reason = str(e)
    if backend == "vllm":
        raise BackendError(f"--backend vllm cannot run: {reason}")
    logger.warning("backend auto: using %s, not vLLM: %s", DEFAULT_BACKEND, reason)
    return None


def complete(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    backend: str = DEFAULT_BACKEND,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    chat: bool = False,
    device: Any = None,
    on_batch: Callable[[int], None] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Completions of ``prompts`` by ``model``: an :class:`Engine` generates them itself (its own
    batching; ``batch_size``/``device`` do not apply), a PyTorch model through
    :func:`~umm.eval.generate.generate` with :func:`torch_backend` of ``backend``. ``vllm`` with a
    PyTorch model is a :class:`BackendError` (the engine is opened by :func:`open_engine`)."""
    if isinstance(model, Engine):
        return model.complete(prompts, max_new_tokens=max_new_tokens, stop=stop, chat=chat,
                              temperature=temperature, seed=seed, on_batch=on_batch)
    if check_backend(backend) == "vllm":
        raise BackendError("the vllm back end generates with a vLLM engine (umm.eval.backends.open_engine), "
                           "not with a PyTorch model")
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                    chat=chat, device=device, backend=torch_backend(backend), on_batch=on_batch,
                    temperature=temperature, seed=seed)


def backend_name(model: Any, backend: str) -> str:
    """The back end that generates with ``model`` when ``backend`` is asked for."""
    return model.name if isinstance(model, Engine) else torch_backend(backend)


def shape_model(path: str | Path, dtype: str | None = None) -> Any:
    """A PyTorch model of the folder's architecture on the ``meta`` device (no memory, no weights
    read): the names, shapes and dtypes of its parameters, for a :class:`~umm.evolve.apply.LiveMerge`
    whose merged tensors go to an engine. Same checks as loading (local config, no remote code)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from umm.checkpoints.loading import check_model_config, first_line, resolve_dtype
    from umm.checkpoints.reader import CONFIG_NAME, Checkpoint

    with Checkpoint.open(path) as ckpt:
        check_model_config(ckpt.config, ckpt.path / CONFIG_NAME)
        folder = ckpt.path
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise EvalError(f"{folder}: transformers cannot build this architecture: {first_line(e)}") from None
    torch_dtype = resolve_dtype(dtype) or _checkpoint_dtype(config)
    return model.to(torch_dtype).eval()


def _checkpoint_dtype(config: Any) -> Any:
    import torch

    d = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    return getattr(torch, str(d), torch.float32) if isinstance(d, str) else torch.float32
