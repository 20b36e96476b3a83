"""The vLLM back end: greedy (or seeded sampled) completions from a vLLM engine, and new weights
pushed into the running engine in memory.

Prompts are encoded by umm (:func:`umm.eval.generate.encode_prompts`: the same chat template,
special tokens and left truncation as the PyTorch loop) and given to ``LLM.generate`` as token
ids, with the task's stop strings, the model's end-of-sequence ids as stop tokens and the same
``max_tokens``; the returned text is cut at the first stop as the loop's is. vLLM batches by
itself (continuous batching), so ``batch_size`` does not apply.

Weights (:meth:`VllmEngine.load_weights`): ``(name, tensor)`` pairs under the Hugging Face
checkpoint names go to the vLLM model's own ``load_weights`` (which knows its fused layouts:
``qkv_proj``, ``gate_up_proj``, GPT-NeoX's ``query_key_value``), run inside the engine by
``LLM.apply_model``; then the prefix cache is reset (its KV blocks were computed with the old
weights). Nothing is written to disk and the engine is not restarted. The engine core runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set unless the environment already sets it),
so the tensors are handed over by reference, not serialized.

vLLM versions (:data:`VLLM_VERSIONS`): ``LLM.apply_model`` and ``LLM.reset_prefix_cache`` of
the V1 engine (added by 0.8.5, still in the current sources); a V0 engine without
``apply_model`` is reached through ``llm.llm_engine.model_executor.driver_worker.model_runner.model``.
Newer releases also have a native weight-transfer API (``WeightTransferConfig`` with an NCCL or
CUDA-IPC backend, ``LLM.update_weights``), made for a trainer in another process; here the
merged tensors are already in the engine's process, so they are handed over by reference instead
(that API's CUDA-IPC backend is the way should direct ``load_weights`` calls stop working; its
``finish_weight_update`` post-processing matters for quantized checkpoints, which the search does
not merge). Written from vLLM's source and documentation; not yet run on a GPU here
(``bench/gpu_check.sh`` does).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from umm.eval.backends import BackendError, Engine
from umm.eval.generate import _eos_ids, cut_at_stop, encode_prompts, generation_budget

logger = logging.getLogger(__name__)

#: the vLLM releases whose API this module uses (the ``umm[vllm]`` extra pins the same range)
VLLM_VERSIONS = ">=0.8.5"
#: share of the GPU's memory vLLM may take (weights + KV cache); the rest stays for the search's
#: cached source tensors (:class:`umm.evolve.apply.LiveMerge`) and the final PyTorch evaluation
DEFAULT_GPU_MEMORY_UTILIZATION = 0.5


class VllmLoadError(BackendError):
    """vLLM is installed but cannot open this model (architecture, dtype, head size, memory...)."""


class _Counted:
    """An iterator over ``(name, tensor)`` pairs that counts what was consumed."""

    def __init__(self, pairs: Iterable[tuple[str, Any]]) -> None:
        self._it = iter(pairs)
        self.n = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self

    def __next__(self) -> tuple[str, Any]:
        try:
            item = next(self._it)
        except StopIteration:
            self.exhausted = True
            raise
        self.n += 1
        return item


def engine_dtype(dtype: str | None, config: Any) -> str:
    """The dtype vLLM runs in: the one asked for, else the checkpoint's (vLLM's own ``auto`` would
    run a float32 checkpoint in half precision, unlike ``umm eval``'s PyTorch path)."""
    from umm.checkpoints.loading import resolve_dtype
    from umm.eval.backends import _checkpoint_dtype

    torch_dtype = resolve_dtype(dtype) or _checkpoint_dtype(config)
    return str(torch_dtype).removeprefix("torch.")


class VllmEngine(Engine):
    """A vLLM ``LLM`` on the model folder ``path`` (safetensors, no remote code), on the GPU that
    ``CUDA_VISIBLE_DEVICES`` makes ``cuda:0``.

    ``dtype``: float32, bfloat16, float16 or ``None``/``auto`` (the checkpoint's). ``seed`` seeds
    the engine. ``enforce_eager`` skips CUDA graph capture (faster start, slower decoding).
    Raises :class:`VllmLoadError` when vLLM cannot load the model, and the checkpoint loader's
    errors for a folder that is not a valid model.
    """

    name = "vllm"

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: str | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
    ) -> None:
        from transformers import AutoConfig, GenerationConfig

        from umm.checkpoints.loading import check_model_config, first_line, load_tokenizer
        from umm.checkpoints.reader import CONFIG_NAME, Checkpoint

        with Checkpoint.open(path) as ckpt:
            check_model_config(ckpt.config, ckpt.path / CONFIG_NAME)
            folder = ckpt.path
        self.path = Path(folder)
        self.tokenizer = load_tokenizer(folder)
        self.config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        self.generation_config = None
        if (self.path / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        self.dtype = engine_dtype(dtype, self.config)
        # the engine core in this process: apply_model then runs here and gets tensors by reference
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except Exception as e:  # a broken install (CUDA/torch mismatch) fails at import
            raise VllmLoadError(f"vllm cannot be imported: {first_line(e)}") from None
        options: dict[str, Any] = dict(
            model=str(folder), tokenizer=str(folder), dtype=self.dtype, seed=int(seed), trust_remote_code=False,
            gpu_memory_utilization=float(gpu_memory_utilization), enforce_eager=bool(enforce_eager),
            load_format="safetensors",
        )
        if max_num_seqs is not None:
            options["max_num_seqs"] = int(max_num_seqs)
        try:
            self._llm = vllm.LLM(**options)
        except Exception as e:  # unsupported architecture, head size, dtype, out of memory: vLLM's message says
            _free_gpu()  # what the half-built engine took, before a fallback loads the PyTorch model
            raise VllmLoadError(f"vLLM {getattr(vllm, '__version__', '?')} cannot load {folder}: {first_line(e)}") from e
        self._sampling_params = vllm.SamplingParams
        logger.info("vLLM %s engine on %s (%s)", getattr(vllm, "__version__", "?"), folder, self.dtype)

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
        """See :meth:`Engine.complete`. Sampled requests (``temperature > 0``) are seeded with
        ``seed + i`` (``i``: the prompt's index), so a call is reproducible."""
        if not prompts:
            return []
        max_new_tokens, limit = generation_budget(self, max_new_tokens, temperature)
        encoded = encode_prompts(self.tokenizer, prompts, chat, None if limit is None else limit - max_new_tokens)
        eos = sorted(_eos_ids(self, self.tokenizer))
        stops = [s for s in stop if s]
        params = [self._params(max_new_tokens, stops, eos, temperature, seed + i) for i in range(len(encoded))]
        outputs = self._llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        texts = [cut_at_stop(o.outputs[0].text, stop) for o in outputs]
        if on_batch is not None:
            on_batch(len(texts))
        return texts

    def _params(self, max_new_tokens: int, stops: list[str], eos: list[int], temperature: float, seed: int) -> Any:
        kwargs: dict[str, Any] = dict(
            n=1, max_tokens=max_new_tokens, temperature=float(temperature), stop=stops or None,
            stop_token_ids=eos or None, skip_special_tokens=True,
        )
        if temperature > 0:
            kwargs.update(top_p=1.0, seed=int(seed))
        return self._sampling_params(**kwargs)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """See :meth:`Engine.load_weights`: the vLLM model's ``load_weights`` consumes the pairs
        one by one (each tensor may be freed once copied), then the prefix cache is reset."""
        pairs = _Counted(named_tensors)

        def push(model: Any) -> None:
            model.load_weights(pairs)

        try:
            if hasattr(self._llm, "apply_model"):
                self._llm.apply_model(push)
            else:  # V0 engine (vLLM < 0.8.5)
                push(self._llm.llm_engine.model_executor.driver_worker.model_runner.model)
        except Exception as e:
            raise BackendError(f"vLLM could not load the new weights: {type(e).__name__}: {e}".splitlines()[0]) from e
        if not pairs.exhausted:
            raise BackendError(
                "vLLM's model did not take the new weights in this process (its engine core runs in another "
                "one); set VLLM_ENABLE_V1_MULTIPROCESSING=0"
            )
        reset = getattr(self._llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        return pairs.n

    def close(self) -> None:
        """Drop the engine and free its GPU memory (so another engine or model can load)."""
        llm = self.__dict__.pop("_llm", None)
        if llm is None:
            return
        del llm
        _free_gpu()


def _free_gpu() -> None:
    """Collect dropped engine objects and release vLLM's distributed state and cached GPU memory."""
    import torch

    gc.collect()
    with contextlib.suppress(ImportError):
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
