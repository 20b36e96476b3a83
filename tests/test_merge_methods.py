"""Merge methods against direct, independent formulas (full sorts, plain loops) on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from umm.errors import UmmError
from umm.merge import METHODS, get_method, tensor_generator


def _count(method, want: int) -> int:
    """``want`` models, or the nearest count the method merges (slerp: 1, nuslerp: 2, ...)."""
    return max(method.min_sources, min(want, method.max_sources or want))


def _inputs(n_models: int = 3, shape=(12, 20), seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    xs = [base + scale * torch.randn(*shape, generator=g) for _ in range(n_models)]
    return base, xs


# ------------------------------------------------------------------------- reference formulas
def ref_topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim by a full stable sort: keep the max(1, int(density*n)) largest |delta|."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool)
    k = max(1, int(density * n))
    order = torch.sort(delta.abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(delta.shape)


def ref_outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool)
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    order = torch.sort(delta.abs().flatten(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n_bot + target]] = True
    return mask.view(delta.shape)


def ref_gta(base, xs, weights, masks, *, consensus, normalize, lam=1.0, rescale=False):
    """Plain-loop generalised task arithmetic in float64."""
    base = base.double()
    deltas = []
    for x, m in zip(xs, masks):
        d = x.double() - base
        kept = d * m
        if rescale and kept.abs().sum() > 1e-7:
            kept = kept * (d.abs().sum() / kept.abs().sum())
        deltas.append(kept)
    v = [w * d for w, d in zip(weights, deltas)]
    total = sum(v)
    if consensus:
        sign = torch.where(total >= 0, 1.0, -1.0).double()
        keep = [torch.sign(vi) == sign for vi in v]
        mixed = sum(vi * k for vi, k in zip(v, keep))
        div = sum(w * k.double() for w, k in zip(weights, keep))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = total
        div = sum(weights)
        if abs(div) < 1e-8:
            div = 1.0
    if normalize:
        mixed = mixed / div
    return (base + lam * mixed).float()


def ref_slerp(t, v0, v1):
    a, b = v0.double().numpy().ravel(), v1.double().numpy().ravel()
    ua = a / np.linalg.norm(a) if np.linalg.norm(a) > 1e-8 else a
    ub = b / np.linalg.norm(b) if np.linalg.norm(b) > 1e-8 else b
    c = float(np.clip(np.dot(ua, ub), -1, 1))
    if abs(c) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        th = math.acos(c)
        out = math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b
    return torch.from_numpy(out.reshape(v0.shape)).float()


def close(a, b, tol=1e-5):
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b.float(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_weighted_sum(normalize):
    _, xs = _inputs()
    w = [0.5, 0.2, 0.7]
    out = get_method("linear").merge(None, xs, [{"weight": x} for x in w], {"normalize": normalize})
    expect = sum(wi * x.double() for wi, x in zip(w, xs))
    if normalize:
        expect = expect / sum(w)
    close(out, expect)


def test_linear_default_normalizes_and_zero_weight_sum_is_an_error():
    _, xs = _inputs(2)
    out = get_method("linear").merge(None, xs, [{"weight": 2.0}, {"weight": 2.0}], {})
    close(out, (xs[0] + xs[1]) / 2)
    with pytest.raises(UmmError, match="sum to 0"):
        get_method("linear").merge(None, xs, [{"weight": 1.0}, {"weight": -1.0}], {})


# ----------------------------------------------------------------------- task arithmetic
@pytest.mark.parametrize(("normalize", "lam"), [(False, 1.0), (True, 1.0), (False, 0.6), (True, 1.7)])
def test_task_arithmetic(normalize, lam):
    base, xs = _inputs()
    w = [0.4, -0.3, 0.9]
    out = get_method("task_arithmetic").merge(
        base, xs, [{"weight": x} for x in w], {"normalize": normalize, "lambda": lam}
    )
    ones = [torch.ones_like(base, dtype=torch.bool)] * 3
    close(out, ref_gta(base, xs, w, ones, consensus=False, normalize=normalize, lam=lam))


# ---------------------------------------------------------------------------------- TIES
@pytest.mark.parametrize(
    ("densities", "normalize", "lam", "rescale"),
    [
        ([0.3, 0.7, 0.5], True, 1.0, False),
        ([0.3, 0.7, 0.5], False, 1.0, False),
        ([0.2, 0.2, 0.9], True, 0.5, True),
        ([1.0, 1.0, 1.0], True, 1.0, False),
        ([0.001, 0.05, 1.0], True, 1.0, False),
    ],
)
def test_ties_matches_full_sort_reference(densities, normalize, lam, rescale):
    base, xs = _inputs()
    w = [0.6, 0.3, -0.4]
    params = [{"weight": wi, "density": d} for wi, d in zip(w, densities)]
    out = get_method("ties").merge(
        base, xs, params, {"normalize": normalize, "lambda": lam, "rescale": rescale}
    )
    masks = [ref_topk_mask(x - base, d) for x, d in zip(xs, densities)]
    close(out, ref_gta(base, xs, w, masks, consensus=True, normalize=normalize, lam=lam, rescale=rescale))


def test_ties_breaks_magnitude_ties_like_a_stable_sort():
    base = torch.zeros(8, 25)
    g = torch.Generator().manual_seed(3)
    # heavily quantised deltas: many exactly equal magnitudes around the threshold
    xs = [torch.randint(-3, 4, (8, 25), generator=g).float() * 0.25 for _ in range(2)]
    params = [{"weight": 1.0, "density": 0.37}, {"weight": 0.5, "density": 0.61}]
    out = get_method("ties").merge(base, xs, params, {})
    masks = [ref_topk_mask(x, p["density"]) for x, p in zip(xs, params)]
    for x, p, m in zip(xs, params, masks):
        assert int(m.sum()) == int(p["density"] * x.numel())
    close(out, ref_gta(base, xs, [1.0, 0.5], masks, consensus=True, normalize=True))


def test_int8_mask_does_not_change_the_result():
    base, xs = _inputs()
    params = [{"weight": 0.5, "density": 0.4}] * 3
    a = get_method("ties").merge(base, xs, params, {"int8_mask": True})
    b = get_method("ties").merge(base, xs, params, {"int8_mask": False})
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.requires_base))
def test_all_zero_deltas_return_the_base(name):
    base, _ = _inputs(1)
    method = get_method(name)
    n = _count(method, 3)
    params = [{"weight": 0.5, "density": 0.5} if method.tensor_params else {} for _ in range(n)]
    params = [{k: v for k, v in p.items() if k in method.tensor_params} for p in params]
    gp = {"t": 0.4} if name == "slerp" else {}
    gen = tensor_generator(0, "w") if method.random else None
    out = method.merge(base, [base.clone() for _ in range(n)], params, gp, generator=gen)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- breadcrumbs
@pytest.mark.parametrize(
    ("density", "gamma", "consensus"),
    [(0.5, 0.01, False), (0.8, 0.1, False), (0.995, 0.05, False), (0.3, 0.0, False), (0.6, 0.02, True)],
)
def test_breadcrumbs_matches_full_sort_reference(density, gamma, consensus):
    base, xs = _inputs(2)
    w = [0.7, 0.4]
    name = "breadcrumbs_ties" if consensus else "breadcrumbs"
    params = [{"weight": wi, "density": density, "gamma": gamma} for wi in w]
    out = get_method(name).merge(base, xs, params, {})
    masks = [ref_outlier_mask(x - base, density, gamma) for x in xs]
    close(out, ref_gta(base, xs, w, masks, consensus=consensus, normalize=False))


# ---------------------------------------------------------------------------- DARE / DELLA
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_reproducible_per_seed(name):
    base, xs = _inputs(2, shape=(16, 64))
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.8, "density": 0.4}]
    m = get_method(name)
    a = m.merge(base, xs, params, {}, generator=tensor_generator(7, "model.layers.0.mlp.up_proj.weight"))
    b = m.merge(base, xs, params, {}, generator=tensor_generator(7, "model.layers.0.mlp.up_proj.weight"))
    c = m.merge(base, xs, params, {}, generator=tensor_generator(8, "model.layers.0.mlp.up_proj.weight"))
    d = m.merge(base, xs, params, {}, generator=tensor_generator(7, "model.layers.1.mlp.up_proj.weight"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    with pytest.raises(UmmError, match="generator"):
        m.merge(base, xs, params, {})


def test_dare_keeps_density_and_rescales_l1():
    base, xs = _inputs(1, shape=(200, 100))
    delta = xs[0] - base
    gen = tensor_generator(1, "w")
    out = get_method("dare_linear").merge(base, xs, [{"weight": 1.0, "density": 0.3}], {}, generator=gen)
    kept = out - base
    frac = float((kept != 0).float().mean())
    assert abs(frac - 0.3) < 0.02
    # mergekit's rescale: the kept entries are scaled so the L1 norm is unchanged
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
    nz = kept != 0
    ratio = kept[nz] / delta[nz]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.median())), rtol=1e-2, atol=0)
    # rescale off: kept entries are the original deltas
    gen = tensor_generator(1, "w")
    raw = get_method("dare_linear").merge(base, xs, [{"weight": 1.0, "density": 0.3}], {"rescale": False},
                                          generator=gen) - base
    assert torch.equal(raw != 0, nz)
    torch.testing.assert_close(raw[nz], delta[nz], rtol=1e-5, atol=1e-6)


def test_dare_ties_density_one_is_ties_without_trim():
    base, xs = _inputs()
    params = [{"weight": w, "density": 1.0} for w in (0.5, 0.2, -0.6)]
    a = get_method("dare_ties").merge(base, xs, params, {"normalize": True})
    b = get_method("ties").merge(base, xs, params, {})
    assert torch.equal(a, b)


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(1, 20000)
    x = torch.linspace(0.001, 1.0, 20000).view(1, -1)
    gen = tensor_generator(3, "w")
    out = get_method("della_linear").merge(
        base, [x], [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}], {"rescale": False}, generator=gen
    )
    kept = (out != 0).float().view(-1)
    low, high = float(kept[:4000].mean()), float(kept[-4000:].mean())
    assert abs(low - 0.26) < 0.03 and abs(high - 0.74) < 0.03  # p = 0.2 + 0.6 * rank_norm
    with pytest.raises(UmmError, match="epsilon"):
        get_method("della").merge(base, [x], [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}], {},
                                  generator=gen)


# -------------------------------------------------------------------------------- slerp
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_formula(t):
    base, xs = _inputs(1, scale=1.0)
    out = get_method("slerp").merge(base, xs[:1], [{}], {"t": t})
    close(out, ref_slerp(t, base, xs[0]))
    if t == 0.0:
        close(out, base)
    if t == 1.0:
        close(out, xs[0])


def test_slerp_colinear_falls_back_to_lerp_and_needs_two_models():
    base, xs = _inputs(2)
    other = base * 3.0
    out = get_method("slerp").merge(base, [other], [{}], {"t": 0.25})
    close(out, 0.75 * base + 0.25 * other)
    opposite = -base
    close(get_method("slerp").merge(base, [opposite], [{}], {"t": 0.5}), 0.5 * base + 0.5 * opposite)
    with pytest.raises(UmmError, match="exactly two"):
        get_method("slerp").merge(base, xs, [{}, {}], {"t": 0.5})
    with pytest.raises(UmmError, match="'t'"):
        get_method("slerp").merge(base, xs[:1], [{}], {})


# -------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract_float32_out_inputs_untouched_any_float_dtype(name):
    method = get_method(name)
    base, xs = _inputs(_count(method, 2))
    base16, xs16 = base.bfloat16(), [x.bfloat16() for x in xs]
    keep = [base16.clone(), *(x.clone() for x in xs16)]
    params = [{k: v for k, v in {"weight": 0.6, "density": 0.5}.items() if k in method.tensor_params} for _ in xs]
    gp = {"t": 0.3} if name == "slerp" else {}
    gen = tensor_generator(0, "x") if method.random else None
    b = base16 if method.uses_base else None
    out = method.merge(b, xs16, params, gp, generator=gen)
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert torch.equal(base16, keep[0]) and all(torch.equal(x, k) for x, k in zip(xs16, keep[1:]))
    # float32 inputs must not be aliased or modified either
    xs32 = [x.clone() for x in xs]
    out32 = method.merge(base if method.uses_base else None, xs32, params, gp,
                         generator=tensor_generator(0, "x") if method.random else None)
    assert all(torch.equal(a, c) for a, c in zip(xs32, xs))
    assert out32.data_ptr() not in {x.data_ptr() for x in [base, *xs32]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_elementwise_methods_merge_row_chunks_exactly(name):
    method = get_method(name)
    base, xs = _inputs(_count(method, 3), shape=(24, 16))
    params = [{k: v for k, v in {"weight": 0.3 + i / 10, "density": 1.0}.items() if k in method.tensor_params}
              for i in range(len(xs))]
    gp = {"t": 0.3} if name == "slerp" else {}
    elementwise = method.is_elementwise(params, gp)
    whole_tensor = ("slerp", "model_stock", "sce", "nuslerp", "karcher", "arcee_fusion")
    assert elementwise == (name not in whole_tensor)  # density 1 makes every GTA method elementwise
    if method.elementwise:
        assert name in ("linear", "task_arithmetic", "passthrough")
    b = base if method.uses_base else None
    gen = (lambda: tensor_generator(0, "x")) if method.random else (lambda: None)
    whole = method.merge(b, xs, params, gp, generator=gen())
    parts = [
        method.merge(b[r] if b is not None else None, [x[r] for x in xs], params, gp, generator=gen())
        for r in (slice(0, 5), slice(5, 17), slice(17, 24))
    ]
    same = torch.equal(torch.cat(parts), whole)
    if elementwise:
        assert same
    if name in whole_tensor:
        assert not same
    sparse = [{**p, "density": 0.5} for p in params] if "density" in method.tensor_params else params
    assert method.is_elementwise(sparse, gp) == method.elementwise


def test_unknown_method_and_parameters_list_the_valid_ones():
    with pytest.raises(UmmError) as exc:
        get_method("tiez")
    assert "ties" in str(exc.value) and "linear" in str(exc.value) and "slerp" in str(exc.value)
    base, xs = _inputs(1)
    with pytest.raises(UmmError, match=r"unknown per-model parameter.*'dens'.*valid.*density"):
        get_method("ties").merge(base, xs, [{"weight": 1.0, "dens": 0.5}], {})
    with pytest.raises(UmmError, match=r"unknown global parameter.*valid.*normalize"):
        get_method("ties").merge(base, xs, [{"weight": 1.0}], {"normalise": True})
    with pytest.raises(UmmError, match="missing required parameter 'weight'"):
        get_method("ties").merge(base, xs, [{"density": 0.5}], {})
    with pytest.raises(UmmError, match="base model"):
        get_method("ties").merge(None, xs, [{"weight": 1.0}], {})


def test_method_defaults_match_mergekit():
    expect = {
        "linear": {"normalize": True},
        "task_arithmetic": {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
        "ties": {"normalize": True, "rescale": False},
        "dare_linear": {"normalize": False, "rescale": True},
        "dare_ties": {"normalize": False, "rescale": True},
        "breadcrumbs": {"normalize": False, "rescale": False},
        "della": {"normalize": True, "rescale": True},
        "della_linear": {"normalize": False, "rescale": True},
        "slerp": {"t": None},
    }
    for name, defaults in expect.items():
        for k, v in defaults.items():
            assert METHODS[name].global_params[k] == v, (name, k)
    assert METHODS["breadcrumbs"].tensor_params["gamma"] == 0.01
    assert METHODS["della"].tensor_params["epsilon"] == 0.15
    assert METHODS["ties"].tensor_params == {"weight": None, "density": 1.0}
    assert [n for n, m in METHODS.items() if not m.requires_base] == ["linear", "passthrough", "nuslerp", "karcher"]
    assert [n for n, m in METHODS.items() if m.optional_base] == ["nuslerp"]


def test_tensor_generator_depends_only_on_seed_and_name():
    a = torch.rand(5, generator=tensor_generator(1, "a"))
    tensor_generator(1, "b")  # creating others in between changes nothing
    assert torch.equal(a, torch.rand(5, generator=tensor_generator(1, "a")))
    assert not torch.equal(a, torch.rand(5, generator=tensor_generator(1, "b")))


@pytest.mark.parametrize("kind", ["float", "quantised", "zeros"])
def test_radix_selection_equals_a_stable_full_sort(kind):
    """The O(n) selection behind TIES/breadcrumbs on tensors large enough to use the radix path."""
    from umm.merge.methods.sparsify import RADIX_MIN, kth_smallest, rank_range_mask, top_k_mask

    g = torch.Generator().manual_seed(5)
    n = RADIX_MIN + 4321
    if kind == "float":
        a = torch.randn(n, generator=g).abs()
    elif kind == "quantised":  # many exact ties, as deltas of bf16 weights have
        a = torch.randint(0, 40, (n,), generator=g).float() * 0.125
    else:
        a = torch.zeros(n)
        a[:100] = torch.rand(100, generator=g)
    asc = torch.sort(a, stable=True).indices
    desc = torch.sort(a, descending=True, stable=True).indices
    for r in (0, n // 2, n - 1):
        assert kth_smallest(a, r) == a[asc[r]]
    for k in (n // 10, n - 7):
        ref = torch.zeros(n, dtype=torch.bool)
        ref[desc[:k]] = True
        assert torch.equal(top_k_mask(a, k), ref), k
    for lo, hi in ((0, n // 2), (n // 4, n - 5), (17, 18)):
        ref = torch.zeros(n, dtype=torch.bool)
        ref[asc[lo:hi]] = True
        assert torch.equal(rank_range_mask(a, lo, hi), ref), (lo, hi)


# ------------------------------------------------------- row blocks after a whole-tensor prepare
def _block_merge(method, base, xs, params, gp, block_rows, reads=None):
    """prepare() on readers of the whole tensors, then merge(state=, row_offset=) block by block."""
    def reader(i, t):
        def read(s, e):
            if reads is not None:
                reads.append((i, s, e))
            return t[s:e]
        return read

    rows = base.shape[0]
    state = method.prepare(reader(-1, base), [reader(i, x) for i, x in enumerate(xs)], base.shape,
                           params, gp, block_rows=block_rows)
    parts = [method.merge(base[s:s + block_rows], [x[s:s + block_rows] for x in xs], params, gp,
                          state=state, row_offset=s) for s in range(0, rows, block_rows)]
    return torch.cat(parts), state


SPARSE_CASES = [
    ("ties", {"density": 0.35}, {}),
    ("ties", {"density": 0.5}, {"rescale": True, "normalize": False, "lambda": 0.7}),
    ("ties", {"density": 0.0}, {}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}, {}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.0}, {"rescale": True}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}, {"normalize": True}),
    ("breadcrumbs_ties", {"density": 0.001, "gamma": 0.01}, {}),
]


@pytest.mark.parametrize(("name", "tparams", "gp"), SPARSE_CASES)
@pytest.mark.parametrize("quantised", [False, True])
def test_prepared_row_blocks_equal_the_whole_tensor_merge_bitwise(name, tparams, gp, quantised):
    """The executor's path for TIES/breadcrumbs: same bits (signed zeros included) as one call."""
    method = get_method(name)
    g = torch.Generator().manual_seed(11)
    shape = (23, 17)  # odd sizes: blocks never align with SIMD widths or with the ties
    base = torch.randn(*shape, generator=g).bfloat16()
    if quantised:  # bf16 deltas of a few values: thousands of exact magnitude ties at the cuts
        xs = [(base.float() + torch.randint(-3, 4, shape, generator=g).float() * 0.25).bfloat16()
              for _ in range(3)]
    else:
        xs = [(base.float() + 0.05 * torch.randn(*shape, generator=g)).bfloat16() for _ in range(3)]
    params = [{"weight": w, **tparams} for w in (0.6, 0.3, -0.4)]
    assert method.needs_prepare(params, gp)
    whole = method.merge(base, xs, params, gp)
    for block_rows in (1, 4, 9, 23):
        got, _ = _block_merge(method, base, xs, params, gp, block_rows)
        assert torch.equal(got.view(torch.int32), whole.view(torch.int32)), block_rows


def test_ties_at_the_threshold_straddling_blocks_keep_the_first_by_flat_index():
    method = get_method("ties")
    base = torch.zeros(6, 10)
    x = torch.ones(6, 10)  # every magnitude ties: keep k = 21 -> flat indices 0..20
    x.view(-1)[45] = 3.0  # one clear winner, so 20 ties are kept (0..19), the 20th sits in row 1
    params = [{"weight": 1.0, "density": 0.35}]
    got, state = _block_merge(method, base, [x], params, {}, block_rows=1)
    want = torch.zeros(60)
    want[:20] = 1.0
    want[45] = 3.0
    assert torch.equal(got.view(-1), want)
    assert state[0].lower.tie_end == 20  # ties kept: flat index < 20, across rows 0 and 1
    assert torch.equal(got, method.merge(base, [x], params, {}))


def test_breadcrumbs_ties_at_both_cuts_straddling_blocks_follow_a_stable_sort():
    method = get_method("breadcrumbs")
    base = torch.zeros(5, 8)
    x = torch.full((5, 8), -0.5)  # all tied: ranks are flat indices
    params = [{"weight": 1.0, "density": 0.5, "gamma": 0.2}]  # keep ranks 12..31
    got, state = _block_merge(method, base, [x], params, {}, block_rows=3)
    want = torch.zeros(40)
    want[12:32] = -0.5
    assert torch.equal(got.view(-1), want)
    assert (state[0].lower.tie_start, state[0].upper.tie_start) == (12, 32)
    assert torch.equal(got.view(torch.int32), method.merge(base, [x], params, {}).view(torch.int32))


@pytest.mark.parametrize("rescale", [False, True])
def test_prepare_reads_one_model_at_a_time_in_blocks(rescale):
    method = get_method("ties")
    base, xs = _inputs(3, shape=(20, 8))
    params = [{"weight": 0.5, "density": 0.3}] * 3
    reads = []
    _block_merge(method, base, xs, params, {"rescale": rescale}, block_rows=3, reads=reads)
    models = [i for i, _, _ in reads if i >= 0]
    assert models == sorted(models) and set(models) == {0, 1, 2}  # never interleaved
    sizes = [e - s for _, s, e in reads]
    if rescale:  # plus one whole read of each model (and of the base) for the exact L1 sums
        assert sizes.count(20) == 6 and max(s for s in sizes if s != 20) == 3
    else:
        assert max(sizes) == 3


def test_prepare_only_for_sparsified_deterministic_methods():
    params = [{"weight": 0.5, "density": 0.5}]
    assert get_method("ties").needs_prepare(params, {})
    assert not get_method("ties").needs_prepare([{"weight": 0.5, "density": 1.0}], {})  # element-wise
    assert get_method("ties").prepare(None, [lambda s, e: None], (4, 4), [{"weight": 1.0}], {},
                                      block_rows=2) is None
    assert not get_method("dare_ties").can_merge_rows(params, {})  # random: whole tensors
    with pytest.raises(UmmError, match="blocks of rows"):
        get_method("dare_ties").prepare(None, [], (4, 4), params, {}, block_rows=2)
    assert not get_method("slerp").can_merge_rows([{}], {"t": 0.5})


@pytest.mark.parametrize("kind", ["quantised", "float"])
def test_block_selection_equals_whole_tensor_selection_on_radix_sizes(kind):
    """The histogram selection over a stream of blocks picks exactly the whole-tensor entries."""
    from umm.merge.methods.sparsify import RADIX_MIN, plan_selection, rank_range_mask, top_k_mask

    g = torch.Generator().manual_seed(9)
    n = RADIX_MIN + 999
    if kind == "quantised":
        a = torch.randint(0, 30, (n,), generator=g).float() * 0.125
    else:
        a = torch.randn(n, generator=g).abs()
    cuts = [0, 1000, 33333, 50000, n]

    def blocks():
        return (a[s:e] for s, e in zip(cuts, cuts[1:]))

    def mask(sel):
        return torch.cat([sel.keep_mask(a[s:e], s) for s, e in zip(cuts, cuts[1:])])

    for density in (0.1, 0.5, 0.97):
        assert torch.equal(mask(plan_selection("magnitude", blocks, n, density)),
                           top_k_mask(a, max(1, int(density * n))))
        sel = plan_selection("magnitude_outliers", blocks, n, density, gamma=0.02)
        target = int(density * n)
        n_bot = max(0, n - target - int(0.02 * n))
        assert torch.equal(mask(sel), rank_range_mask(a, n_bot, n_bot + target))
