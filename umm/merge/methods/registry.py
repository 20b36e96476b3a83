"""All merge methods by name, and the per-tensor random generator.

``METHODS`` maps mergekit's method names to :class:`MergeMethod` records: ``linear``, the
task-arithmetic family (one table, :mod:`.variants`), ``slerp``, ``passthrough`` (layer
stacking), ``model_stock``, ``sce``, ``nuslerp``, ``karcher`` and ``arcee_fusion``; each
record's ``__doc__`` is its formula. :func:`get_method` raises a :class:`~umm.errors.UmmError` listing the valid names
for an unknown one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from umm.errors import UmmError
from umm.merge.methods.arcee_fusion import ARCEE_FUSION
from umm.merge.methods.base import MergeMethod, MergeParameterError, tensor_generator
from umm.merge.methods.karcher import KARCHER
from umm.merge.methods.linear import LINEAR
from umm.merge.methods.model_stock import MODEL_STOCK
from umm.merge.methods.nuslerp import NUSLERP
from umm.merge.methods.passthrough import PASSTHROUGH
from umm.merge.methods.sce import SCE
from umm.merge.methods.slerp import SLERP
from umm.merge.methods.variants import FAMILY

__all__ = ["METHODS", "MergeMethod", "MergeParameterError", "UnknownMethodError", "get_method", "tensor_generator"]

METHODS: Mapping[str, MergeMethod] = MappingProxyType({
    m.name: m
    for m in (LINEAR, *FAMILY, SLERP, PASSTHROUGH, MODEL_STOCK, SCE, NUSLERP, KARCHER, ARCEE_FUSION)
})


class UnknownMethodError(UmmError):
    """A recipe names a merge method umm does not implement."""


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; an unknown name raises an error listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge_method {name!r}; valid: {', '.join(sorted(METHODS))}"
        ) from None
