"""Apply a candidate recipe to a live model in place: no disk write, no reload.

:class:`LiveMerge` reads every source tensor once (through the merge executor's checked
:func:`~umm.merge.executor.open_inputs`, so incompatible models fail here with the executor's
error naming the tensor or tokenizer), keeps float32 copies on the device, and for each
candidate computes every parameter with the recipe's merge method (the same pure function,
parameters resolution and per-tensor random generator as ``umm merge``) and copies it into the
live model's parameter with ``param.data.copy_``. The result equals the streamed merge of the
same recipe, up to the live model's dtype.

Memory: (number of models) x (parameters) x 4 bytes on the device, plus the live model.
Tied embeddings are handled by the model: ``named_parameters`` yields a tied weight once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from umm.errors import UmmError

logger = logging.getLogger(__name__)


class LiveMergeError(UmmError):
    """The live model does not match the checkpoints, or a candidate changes the models."""


def recipe_seed(recipe: Any) -> int:
    """Seed of a recipe's random method: ``parameters.seed`` if set, else 0 (as ``umm merge``)."""
    params = getattr(recipe, "parameters", None) or {}
    value = params.get("seed") if isinstance(params, Mapping) else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class LiveMerge:
    """Source tensors cached on ``device``; :meth:`apply` merges a recipe into ``model``.

    ``recipe`` fixes the models, their order, the base and the method; every recipe given to
    :meth:`apply` must use the same ones (only parameters change between candidates).
    """

    def __init__(self, recipe: Any, model: torch.nn.Module, *, device: str | torch.device = "cpu") -> None:
        from umm.merge.executor import open_inputs

        self.device = torch.device(device)
        self.model = model
        inputs = open_inputs(recipe)
        try:
            self.method = inputs.method
            self.model_paths = list(inputs.names)
            self.num_layers = inputs.num_layers
            self.base_index = inputs.base_index
            self.merge_indices = list(inputs.merge_indices)
            params = dict(model.named_parameters())
            missing = [n for n in params if n not in inputs.shapes]
            if missing:
                raise LiveMergeError(
                    f"the live model has parameter(s) the checkpoints do not: {missing[:5]}; "
                    "load the live model from the base model folder of the recipe"
                )
            self.params: dict[str, torch.nn.Parameter] = {}
            self.inputs: dict[str, list[torch.Tensor]] = {}
            for name, param in params.items():
                if tuple(param.shape) != tuple(inputs.shapes[name]):
                    raise LiveMergeError(
                        f"tensor {name!r}: live model shape {tuple(param.shape)} != checkpoint "
                        f"shape {inputs.shapes[name]}"
                    )
                if not param.is_floating_point():
                    continue
                self.params[name] = param
                self.inputs[name] = [
                    src.read_rows(name).to(self.device, torch.float32) for src in inputs.sources
                ]
        finally:
            inputs.close()
        self.tensor_names = list(self.params)
        logger.info(
            "live merge ready: %d tensors x %d models cached on %s", len(self.tensor_names),
            len(self.model_paths), self.device,
        )

    def _plan(self, recipe: Any) -> tuple[Any, int | None, list[int]]:
        """Method, base index and merged indices of ``recipe`` in the cached model order."""
        from umm.merge import get_method

        paths = [str(p) for p in recipe.model_paths()]
        if sorted(paths) != sorted(self.model_paths):
            raise LiveMergeError(
                f"recipe models {paths} differ from the models loaded for the search {self.model_paths}"
            )
        index = {p: i for i, p in enumerate(self.model_paths)}
        base = recipe.base_model
        base_index = index[str(base)] if base is not None else None
        merge_indices = [index[p] for p in paths if p != (str(base) if base is not None else None)]
        return get_method(recipe.merge_method), base_index, merge_indices

    @torch.no_grad()
    def merged_tensor(self, recipe: Any, name: str, plan: tuple[Any, int | None, list[int]] | None = None) -> torch.Tensor:
        """The float32 merged value of one tensor under ``recipe`` (on the device)."""
        from umm.merge import resolve_tensor_params, tensor_generator

        method, base_index, merge_indices = plan or self._plan(recipe)
        cached = self.inputs[name]
        params = resolve_tensor_params(recipe, method, name, self.num_layers)
        base = cached[base_index] if base_index is not None else None
        tensors = [cached[i] for i in merge_indices]
        gen = (
            tensor_generator(recipe_seed(recipe), name, device=self.device)
            if getattr(method, "random", False)
            else None
        )
        return method.merge(base, tensors, params.per_model, params.global_, generator=gen)

    @torch.no_grad()
    def apply(self, recipe: Any) -> float:
        """Write the merge of ``recipe`` (same models, any method) into the live model's
        parameters; returns the seconds taken."""
        plan = self._plan(recipe)
        t0 = time.perf_counter()
        for name, param in self.params.items():
            param.data.copy_(self.merged_tensor(recipe, name, plan))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def load_source(self, index: int) -> None:
        """Put the unmerged model ``model_paths[index]`` into the live model."""
        for name, param in self.params.items():
            param.data.copy_(self.inputs[name][index])
