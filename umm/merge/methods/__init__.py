"""Merge methods: pure functions over tensors (see :mod:`.registry`).

``linear``, ``slerp``, ``passthrough``, ``model_stock``, ``sce``, ``nuslerp``, ``karcher`` and
``arcee_fusion`` have a module each; the task-arithmetic family is one table of variants
(:mod:`.variants`) over one engine (:mod:`.gta`).
"""

from umm.merge.methods.registry import (
    METHODS,
    MergeMethod,
    MergeParameterError,
    UnknownMethodError,
    get_method,
    tensor_generator,
)

__all__ = ["METHODS", "MergeMethod", "MergeParameterError", "UnknownMethodError", "get_method", "tensor_generator"]
