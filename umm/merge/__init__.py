"""Model merging: pure tensor methods, mergekit-compatible recipes, layer-wise parameters, genome.

- :mod:`umm.merge.methods`: linear, slerp, passthrough, model_stock, sce, nuslerp, karcher,
  arcee_fusion, the task-arithmetic family (task_arithmetic, ties, dare_linear, dare_ties,
  breadcrumbs, breadcrumbs_ties, della, della_linear: one table of variants over one engine)
  and the registry.
- :mod:`umm.merge.layout`: which input tensors make each output tensor (slices, layer stacking).
- :mod:`umm.merge.params`: parameter values (scalars, gradients, filter rules) and their
  resolution for one tensor, with mergekit's precedence.
- :mod:`umm.merge.recipe`: the recipe YAML (mergekit's schema).
- :mod:`umm.merge.genome`: the typed layer-group × model × parameter set the CMA-ES search writes.
- the streaming executor (``umm merge``), one module per concern: :mod:`umm.merge.dtypes`,
  :mod:`umm.merge.inputs` (open and check the models), :mod:`umm.merge.plan` (jobs and their
  memory), :mod:`umm.merge.schedule` (the thread pool), :mod:`umm.merge.run` (jobs into a sink;
  in memory) and :mod:`umm.merge.disk` (to a model folder).
"""

from umm.merge.genome import Genome
from umm.merge.methods.registry import (
    METHODS,
    MergeMethod,
    MergeParameterError,
    UnknownMethodError,
    get_method,
    tensor_generator,
)
from umm.merge.params import (
    FilterRule,
    ParameterError,
    ParamValue,
    TensorParams,
    layer_index,
    layer_t,
    resolve,
    resolve_tensor_params,
)
from umm.merge.recipe import MergeRecipe, ModelEntry, RecipeError

__all__ = [
    "METHODS",
    "FilterRule",
    "Genome",
    "MergeMethod",
    "MergeParameterError",
    "MergeRecipe",
    "ModelEntry",
    "ParamValue",
    "ParameterError",
    "RecipeError",
    "TensorParams",
    "UnknownMethodError",
    "get_method",
    "layer_index",
    "layer_t",
    "resolve",
    "resolve_tensor_params",
    "tensor_generator",
]
