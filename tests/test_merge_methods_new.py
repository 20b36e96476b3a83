"""passthrough, model_stock, sce, nuslerp, karcher and arcee_fusion against independent float64
numpy formulas written from the papers / mergekit's documented semantics, and DARE / DELLA
statistics (their random streams cannot be mergekit's, so their statistics are what must match)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umm.errors import UmmError
from umm.merge import get_method, tensor_generator
from umm.merge.genome import Genome, GenomeError


def _models(n: int, shape=(10, 16), seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + scale * torch.randn(*shape, generator=g) for _ in range(n)]


def close(out: torch.Tensor, ref: np.ndarray, atol: float = 2e-5) -> None:
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=atol)


def npy(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


# ------------------------------------------------------------------------------ references
def ref_model_stock(base, xs, filter_wise=False):
    b = npy(base)
    vecs = [npy(x) for x in xs]
    if filter_wise:
        rows_b = b.reshape(1, -1) if b.ndim == 1 else b
        rows = [v.reshape(rows_b.shape) for v in vecs]
    else:
        rows_b, rows = b.reshape(1, -1), [v.reshape(1, -1) for v in vecs]
    n = len(rows)
    out = np.empty_like(rows_b)
    for r in range(rows_b.shape[0]):
        ds = [row[r] - rows_b[r] for row in rows]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                c = ds[i] @ ds[j] / max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6)
                cos.append(min(1.0, max(-1.0, c)))
        c = float(np.mean(cos))
        den = 1 + (n - 1) * c
        t = 0.0 if abs(den) < 1e-6 else n * c / den
        out[r] = t * np.mean([row[r] for row in rows], axis=0) + (1 - t) * rows_b[r]
    return out.reshape(b.shape)


def ref_sce(base, xs, topk):
    b = npy(base)
    d = np.stack([npy(x) - b for x in xs])
    if topk < 1:
        var = d.var(axis=0).ravel()
        k = int(np.float32(np.count_nonzero(var)) * np.float32(topk))
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        d = d * keep.reshape(b.shape)
    energy = np.array([np.mean(di**2) for di in d])
    w = np.full(len(xs), 1 / len(xs)) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    s = np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
    m = np.sign(d) == s
    num = sum(w[i] * m[i] * d[i] for i in range(len(xs)))
    den = np.maximum(sum(w[i] * m[i] for i in range(len(xs))), 1e-6)
    return b + num / den


def _slerp_vec(t, a, b):
    ua, ub = a / max(np.linalg.norm(a), 1e-7), b / max(np.linalg.norm(b), 1e-7)
    c = float(np.clip(ua @ ub, -1, 1))
    if 1 - c * c <= 1e-16:
        return (1 - t) * a + t * b
    th = np.arccos(c)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def ref_nuslerp(base, x0, x1, w0, w1, flatten=True, row_wise=False):
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    b = npy(base) if base is not None else 0.0
    a, c = npy(x0) - b, npy(x1) - b
    if flatten:
        out = _slerp_vec(t, a.ravel(), c.ravel()).reshape(a.shape)
    elif row_wise:  # one vector per column
        out = np.stack([_slerp_vec(t, a[:, j], c[:, j]) for j in range(a.shape[1])], axis=1)
    else:
        out = np.stack([_slerp_vec(t, a[i], c[i]) for i in range(a.shape[0])])
    return out + b


def ref_karcher(xs, max_iter=10, tol=1e-5):
    vs = [npy(x).ravel() for x in xs]
    norms = [np.linalg.norm(v) for v in vs]
    us = [v / n for v, n in zip(vs, norms)]
    a = np.full(len(vs), 1 / len(vs))
    u = sum(ai * ui for ai, ui in zip(a, us))
    u = u / np.linalg.norm(u)
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for ai, ui in zip(a, us):
            c = np.clip(u @ ui, -1, 1)
            th = np.arccos(c)
            if th >= tol:
                step += ai * th / np.sin(th) * (ui - c * u)
        nt = np.linalg.norm(step)
        if nt < tol:
            break
        u = np.cos(nt) * u + np.sin(nt) * step / nt
        u = u / np.linalg.norm(u)
    return (float(np.dot(a, norms)) * u).reshape(xs[0].shape)


def ref_arcee_fusion(base, x):
    b, v = npy(base), npy(x)

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(v) + 1e-8, softmax(b) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.abs(v - b) * kl
    srt = np.sort(s.ravel())
    n = srt.size

    def at(q):
        return srt[int(np.float32(q) * np.float32(n - 1))]

    thr = at(0.5) + 1.5 * (at(0.75) - at(0.25))
    return b + (v - b) * (s >= thr), s, thr


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_passthrough_copies_one_model_scaled(scale):
    _, (x,) = _models(1)
    params = [{"scale": scale}] if scale != 1.0 else [{}]
    close(get_method("passthrough").merge(None, [x], params, {}), npy(x) * scale, atol=0)
    with pytest.raises(UmmError, match="exactly one model"):
        get_method("passthrough").merge(None, [x, x], [{}, {}], {})


@pytest.mark.parametrize(("n", "filter_wise", "shape"), [(2, False, (10, 16)), (3, False, (10, 16)),
                                                           (3, True, (10, 16)), (2, True, (24,))])
def test_model_stock_matches_reference(n, filter_wise, shape):
    base, xs = _models(n, shape)
    out = get_method("model_stock").merge(base, xs, [{}] * n, {"filter_wise": filter_wise})
    close(out, ref_model_stock(base, xs, filter_wise))


def test_model_stock_opposite_updates_keep_the_base():
    base, (x,) = _models(1)
    out = get_method("model_stock").merge(base, [x, 2 * base - x], [{}, {}], {})  # cos = -1, 1 + cos = 0
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n", "topk"), [(3, 1.0), (3, 0.3), (2, 0.55), (4, 0.0)])
def test_sce_matches_reference(n, topk):
    base, xs = _models(n, seed=n)
    out = get_method("sce").merge(base, xs, [{}] * n, {"select_topk": topk})
    close(out, ref_sce(base, xs, topk))


@pytest.mark.parametrize(("with_base", "flatten", "row_wise", "w"),
                         [(True, True, False, (1.0, 2.0)), (False, True, False, (0.3, 0.7)),
                          (True, False, False, (1.0, 1.0)), (True, False, True, (2.0, 1.0)),
                          (False, True, False, (1.0, -1.0))])
def test_nuslerp_matches_reference(with_base, flatten, row_wise, w):
    base, (a, b) = _models(2, seed=3)
    gp = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    out = get_method("nuslerp").merge(base if with_base else None, [a, b], [{"weight": w[0]}, {"weight": w[1]}], gp)
    close(out, ref_nuslerp(base if with_base else None, a, b, *w, flatten, row_wise))


def test_nuslerp_of_colinear_vectors_is_linear():
    _, (a,) = _models(1)
    out = get_method("nuslerp").merge(None, [a, 3 * a], [{"weight": 1.0}, {"weight": 1.0}], {})
    torch.testing.assert_close(out, 2 * a, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n", "scale"), [(2, 0.1), (3, 0.5), (4, 1.0)])
def test_karcher_matches_reference(n, scale):
    _, xs = _models(n, scale=scale, seed=n)
    out = get_method("karcher").merge(None, xs, [{}] * n, {})
    close(out, ref_karcher(xs))


def test_karcher_of_equal_directions_is_the_mean_norm():
    _, (x,) = _models(1)
    out = get_method("karcher").merge(None, [x, 2 * x, 3 * x], [{}] * 3, {})
    torch.testing.assert_close(out, 2 * x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(10, 16), (40,), (3, 4, 8)])
def test_arcee_fusion_matches_reference(shape):
    base, (x,) = _models(1, shape, scale=0.5)
    out = get_method("arcee_fusion").merge(base, [x], [{}], {})
    ref, scores, thr = ref_arcee_fusion(base, x)
    kept = (scores >= thr).mean()
    assert 0 < kept < 1  # some deltas are kept, some are not
    close(out, ref)


# ------------------------------------------------------------------ DARE / DELLA statistics
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_keeps_the_density_fraction_and_rescales_by_its_inverse(density):
    """mergekit draws from torch's global RNG, umm from a per-tensor seeded generator, so the kept
    entries differ; what must agree is the law: each entry kept with probability ``density``,
    and with ``rescale`` the kept deltas are scaled to preserve the L1 norm (≈ 1/density)."""
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(256, 256)
    delta = torch.rand(256, 256, generator=g) + 0.5  # all positive, |delta| in [0.5, 1.5)
    method = get_method("dare_linear")
    out = method.merge(base, [delta], [{"weight": 1.0, "density": density}], {"rescale": False},
                       generator=tensor_generator(0, "w"))
    kept = out != 0
    frac = kept.float().mean().item()
    assert abs(frac - density) < 4 * (density * (1 - density) / delta.numel()) ** 0.5 + 1e-3
    assert torch.equal(out[kept], delta[kept])  # kept entries unchanged without rescale
    scaled = method.merge(base, [delta], [{"weight": 1.0, "density": density}], {"rescale": True},
                          generator=tensor_generator(0, "w"))
    ratio = (scaled[kept] / delta[kept]).mean().item()
    assert abs(ratio - 1 / density) / (1 / density) < 0.02
    assert abs(scaled.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-4


def test_della_keeps_density_on_average_and_larger_deltas_more_often():
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(128, 512)
    delta = torch.randn(128, 512, generator=g)
    out = get_method("della_linear").merge(
        base, [delta], [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}], {"rescale": False},
        generator=tensor_generator(1, "w"))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    # p runs linearly from 0.3 (smallest) to 0.7 (largest) within each row: halves average 0.4 / 0.6
    assert abs(kept[big].float().mean().item() - 0.6) < 0.01
    assert abs(kept[~big].float().mean().item() - 0.4) < 0.01


# -------------------------------------------------------------------------- evolve refusals
@pytest.mark.parametrize("name", ["passthrough", "model_stock", "sce", "karcher", "arcee_fusion"])
def test_evolve_refuses_methods_it_cannot_search_with_the_reason(name):
    base = "b" if get_method(name).uses_base else None
    with pytest.raises(GenomeError, match=f"evolve cannot search merge_method {name}: .+"):
        Genome.uniform(name, base, ["x", "y"][: get_method(name).max_sources or 2], 4, 2)


def test_evolve_can_search_nuslerp_weights():
    g = Genome.uniform("nuslerp", "b", ["x", "y"], 4, 2)
    assert g.param_names == ("weight",)
    recipe = g.to_recipe()
    recipe.validate_for_merge()
    assert recipe.merge_base() == "b" and recipe.source_models() == ["x", "y"]


@pytest.mark.parametrize(("method", "base", "per_model", "params"), [
    ("nuslerp", True, [{"weight": 0.3}, {"weight": 0.9}], {}),
    ("nuslerp", False, [{"weight": 1.0}, {"weight": 0.5}], {"nuslerp_flatten": False}),
    ("sce", True, [{}, {}], {"select_topk": 0.4}),
])
def test_evolve_in_memory_apply_of_new_methods_equals_the_streamed_merge(tiny_models, method, base, per_model,
                                                                          params):
    """evolve's LiveMerge runs the new methods through their own function: same tensors as umm merge."""
    from umm.checkpoints.loading import load_causal_lm
    from umm.evolve.apply import LiveMerge
    from umm.merge import MergeRecipe
    from umm.merge.run import merge_state_dict

    recipe = MergeRecipe.from_dict({
        "merge_method": method,
        "base_model": str(tiny_models["base"]) if base else None,
        "models": [{"model": str(tiny_models[k]), "parameters": p} for k, p in zip(("math", "code"), per_model)],
        "parameters": params,
        "dtype": "float32",
    })
    expected = merge_state_dict(recipe, threads=1)
    live = LiveMerge(recipe, load_causal_lm(tiny_models["base"], device="cpu", dtype="float32"), threads=1)
    live.apply(recipe)
    for name, p in live.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-6, msg=name)
