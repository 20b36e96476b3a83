"""Merge methods: pure functions over tensors, one module each (see :mod:`.registry`)."""

from umm.merge.methods.registry import (
    METHODS,
    MergeMethod,
    MergeParameterError,
    UnknownMethodError,
    get_method,
    tensor_generator,
)

__all__ = ["METHODS", "MergeMethod", "MergeParameterError", "UnknownMethodError", "get_method", "tensor_generator"]
