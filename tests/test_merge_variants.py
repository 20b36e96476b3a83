"""The task-arithmetic family is one table; every method's formula stays reachable as its doc."""

from __future__ import annotations

import pytest

from umm.merge import METHODS
from umm.merge.methods import variants


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_documents_its_formula(name):
    doc = METHODS[name].__doc__
    assert doc and f"``{name}``" in doc and "Formula" in doc
    assert doc == METHODS[name].doc


def test_each_row_is_the_registered_method_with_its_formula():
    assert {v.name for v in variants.VARIANTS} == set(METHODS) - {
        "linear", "slerp", "passthrough", "model_stock", "sce", "nuslerp", "karcher", "arcee_fusion"}
    for v in variants.VARIANTS:
        m = METHODS[v.name]
        assert m.__doc__ == v.doc and v.doc in variants.__doc__
        assert m.fn.keywords == {"method": v.name, "sparsification": v.sparsify, "consensus": v.sign_consensus}
        assert (m.global_params["normalize"], m.global_params["rescale"]) == (v.normalize, v.rescale)
        assert m.elementwise == (v.sparsify is None)
