"""Tests of the estimator core against the float64 numpy references of tests/reference.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference
import torch
from reference import hsic1_song

import ckapipe
from ckapipe.analyze.estimators import (
    DegenerateLayerWarning,
    MinibatchCKA,
    center_gram,
    cka,
    cka_from_hsic,
    gram_linear,
    gram_rbf,
    hsic0,
    hsic1,
    u_center,
    u_centered_gram,
)

# --------------------------------------------------------------------------- numpy references
# From tests/reference.py, deliberately not mirroring the implementation (which U-centers): explicit
# H matrices, Song et al.'s three-term HSIC₁ (reference.hsic1_song), numpy's median, and
# uncentered Grams as inputs to the HSIC estimators.


def ref_cka(x, y, *, kernel="linear", unbiased=False, threshold=1.0) -> float:
    return reference.cka(
        x, y, kernel=kernel, unbiased=unbiased, threshold=threshold, unbiased_hsic=hsic1_song
    )


def related_pair(rng: np.random.Generator, n: int, p: int, q: int, noise: float = 1.0):
    x = rng.standard_normal((n, p))
    y = np.tanh(x @ rng.standard_normal((p, q)) / np.sqrt(p)) + noise * rng.standard_normal((n, q))
    return x, y


def random_orthogonal(rng: np.random.Generator, p: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((p, p)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------- public names


def test_public_names_resolve_to_the_estimator_module():
    for name in ("cka", "MinibatchCKA", "gram_linear", "gram_rbf", "hsic0", "hsic1", "u_center"):
        assert getattr(ckapipe, name).__module__ == "ckapipe.analyze.estimators"


# --------------------------------------------------------------------------- Grams, centering


def test_gram_linear_is_centered_gram_and_flattens():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3, 2, 2)) + 5.0
    xf = x.reshape(9, -1)
    xc = xf - xf.mean(axis=0)
    out = gram_linear(x)
    assert out.dtype == torch.float64 and out.shape == (9, 9)
    np.testing.assert_allclose(out.numpy(), xc @ xc.T, rtol=1e-12, atol=1e-12)


def test_gram_linear_column_blocks_match_single_block(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 50))
    xc = x - x.mean(axis=0)
    monkeypatch.setattr("ckapipe.analyze.estimators._BLOCK_ELEMENTS", 6 * 7)  # 8 blocks
    np.testing.assert_allclose(gram_linear(x).numpy(), xc @ xc.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [10, 9])  # n² even (two middle values) and odd
@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_gram_rbf_uses_numpy_median_convention(n, threshold):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 4)) * 3
    expected = reference.rbf_gram(x, threshold)
    np.testing.assert_allclose(gram_rbf(x, threshold=threshold).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(
        gram_rbf(gram=gram_linear(x), threshold=threshold).numpy(), expected, rtol=1e-10
    )
    if n % 2 == 0:  # the test has power: torch's lower-middle median gives another kernel
        sq = ((x[:, None] - x[None]) ** 2).sum(-1)
        lower = float(torch.from_numpy(sq).flatten().median())
        assert not np.isclose(lower, np.median(sq))


def test_center_gram_and_u_center_match_references():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((7, 7))
    k = a + a.T  # symmetric, not PSD: the formulas must not assume a Gram of features
    h = reference.centering_matrix(7)
    np.testing.assert_allclose(center_gram(k).numpy(), h @ k @ h, atol=1e-12)
    u = u_center(k).numpy()
    np.testing.assert_allclose(u, reference.u_centered_elementwise(k), atol=1e-12)
    np.testing.assert_allclose(u.sum(axis=1), 0, atol=1e-12)


def test_hsic_estimators_match_references():
    rng = np.random.default_rng(3)
    x, y = related_pair(rng, 12, 5, 7)
    k, l = x @ x.T, reference.rbf_gram(y)  # noqa: E741
    assert hsic0(k, l) == pytest.approx(reference.hsic0(k, l), rel=1e-12)
    assert hsic1(k, l) == pytest.approx(hsic1_song(k, l), rel=1e-12)
    assert hsic1(torch.from_numpy(k), torch.from_numpy(l)) == pytest.approx(
        hsic1_song(k, l), rel=1e-12
    )


# --------------------------------------------------------------------------- full-data CKA


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("p", [5, 40])  # p < n: feature form for linear; p > n: Gram form
def test_cka_matches_reference(kernel, unbiased, p):
    rng = np.random.default_rng(4)
    x, y = related_pair(rng, 30, p, 6)
    expected = ref_cka(x, y, kernel=kernel, unbiased=unbiased)
    assert cka(x, y, kernel=kernel, unbiased=unbiased) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_form_equals_gram_form(unbiased):
    rng = np.random.default_rng(5)
    x, y = related_pair(rng, 40, 6, 9)  # p, q < n: cka() takes the feature form
    kx, ky = gram_linear(x), gram_linear(y)
    h = hsic1 if unbiased else hsic0
    gram_form = h(kx, ky) / np.sqrt(h(kx, kx) * h(ky, ky))
    assert cka(x, y, unbiased=unbiased) == pytest.approx(gram_form, abs=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("p", [6, 60])
def test_cka_invariances(kernel, unbiased, p):
    rng = np.random.default_rng(6)
    x, y = related_pair(rng, 40, p, 8)
    base = cka(x, y, kernel=kernel, unbiased=unbiased)
    q = random_orthogonal(rng, p)
    shift = rng.standard_normal(p) * 50
    for transformed in (x @ q, 7.3 * x, x + shift):
        assert cka(transformed, y, kernel=kernel, unbiased=unbiased) == pytest.approx(
            base, abs=1e-6
        )


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(kernel, unbiased):
    x = np.random.default_rng(7).standard_normal((25, 10))
    assert cka(x, x, kernel=kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)


def test_hsic1_is_unbiased_and_hsic0_is_not():
    """Y = XA + E with X ~ N(μ, Σ): population HSIC (linear kernel) = ||Cov(X, Y)||_F² =
    ||Σ A||_F². The mean of HSIC₁ over independent draws must lie within 3 standard errors."""
    rng = np.random.default_rng(8)
    p, q, n, draws = 3, 2, 10, 3000
    b = rng.standard_normal((p, p))
    sigma = b @ b.T / p + 0.5 * np.eye(p)
    a = rng.standard_normal((p, q))
    mu = np.array([3.0, -1.0, 2.0])
    population = float(np.sum((sigma @ a) ** 2))
    chol = np.linalg.cholesky(sigma)
    h1, h0 = np.empty(draws), np.empty(draws)
    for r in range(draws):
        x = mu + rng.standard_normal((n, p)) @ chol.T
        y = x @ a + rng.standard_normal((n, q))
        k, l = gram_linear(x), gram_linear(y)  # noqa: E741
        h1[r], h0[r] = hsic1(k, l), hsic0(k, l)
    se1, se0 = h1.std(ddof=1) / np.sqrt(draws), h0.std(ddof=1) / np.sqrt(draws)
    assert abs(h1.mean() - population) < 3 * se1
    # power: the biased estimator, at this n, is detectably off by the same criterion
    assert abs(h0.mean() - population) > 3 * se0


def test_biased_cka_inflated_at_small_n_unbiased_near_zero():
    rng = np.random.default_rng(9)
    biased, unbiased = [], []
    for _ in range(50):
        x, y = rng.standard_normal((32, 20)), rng.standard_normal((32, 20))
        biased.append(cka(x, y))
        unbiased.append(cka(x, y, unbiased=True))
    assert np.mean(biased) > 0.3  # true value 0; measured ≈ 0.38 for p = 20
    assert abs(np.mean(unbiased)) < 0.02  # ≈ 3 standard errors of the mean


# --------------------------------------------------------------------------- minibatch CKA


def _layers(rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    base = rng.standard_normal((n, 12))
    acts_a = {
        "a0": base[:, :8] + 0.1 * rng.standard_normal((n, 8)),
        "a1": np.maximum(base @ rng.standard_normal((12, 30)), 0),
        "a2": rng.standard_normal((n, 2, 3, 3)),  # 4-D, flattened
    }
    acts_b = {
        "b0": np.tanh(base @ rng.standard_normal((12, 5))),
        "b1": rng.standard_normal((n, 15)),
    }
    return acts_a, acts_b


def _batched(acts: dict, sizes: list[int]) -> list[dict]:
    edges = np.cumsum([0, *sizes])
    return [
        {k: v[s:e] for k, v in acts.items()} for s, e in zip(edges[:-1], edges[1:], strict=True)
    ]


def ref_minibatch(acts_a: dict, acts_b: dict, sizes: list[int]) -> np.ndarray:
    """Per-pair loop over layers and batches with Song et al.'s HSIC₁ per batch."""
    batches_a, batches_b = _batched(acts_a, sizes), _batched(acts_b, sizes)
    return reference.minibatch_cka(
        [list(batch.values()) for batch in batches_a],
        [list(batch.values()) for batch in batches_b],
        hsic=hsic1_song,
    )


def test_minibatch_all_pairs_equals_per_pair_loop_with_mixed_batch_sizes():
    rng = np.random.default_rng(10)
    sizes = [16, 16, 5, 11]  # a short batch: each carries its own 1/(m(m-3))
    acts_a, acts_b = _layers(rng, sum(sizes))
    acc = MinibatchCKA(list(acts_a), list(acts_b))
    for ba, bb in zip(_batched(acts_a, sizes), _batched(acts_b, sizes), strict=True):
        acc.update(ba, bb)
    np.testing.assert_allclose(acc.compute(), ref_minibatch(acts_a, acts_b, sizes), atol=1e-12)
    assert acc.n_batches == 4 and acc.n_samples == sum(sizes)
    hsic, self_a, self_b, batch_sizes = acc.per_batch()
    assert hsic.shape == (4, 3, 2) and self_a.shape == (4, 3) and self_b.shape == (4, 2)
    assert batch_sizes.tolist() == sizes
    np.testing.assert_allclose(hsic.sum(0), acc.hsic, rtol=1e-15)


def test_minibatch_one_batch_equals_full_data_unbiased_cka():
    rng = np.random.default_rng(11)
    acts_a, acts_b = _layers(rng, 24)
    acc = MinibatchCKA(list(acts_a), list(acts_b))
    acc.update(list(acts_a.values()), list(acts_b.values()))  # sequence in layer order
    for i, xa in enumerate(acts_a.values()):
        for j, xb in enumerate(acts_b.values()):
            expected = ref_cka(xa.reshape(24, -1), xb, unbiased=True)
            assert acc.compute()[i, j] == pytest.approx(expected, abs=1e-12)


def test_minibatch_merge_equals_single_pass_and_state_round_trips():
    rng = np.random.default_rng(12)
    sizes = [8, 8, 8, 6]
    acts_a, acts_b = _layers(rng, sum(sizes))
    batches = list(zip(_batched(acts_a, sizes), _batched(acts_b, sizes), strict=True))
    single = MinibatchCKA(list(acts_a), list(acts_b))
    first, second = (
        MinibatchCKA(list(acts_a), list(acts_b)),
        MinibatchCKA(list(acts_a), list(acts_b)),
    )
    for idx, (ba, bb) in enumerate(batches):
        single.update(ba, bb)
        (first if idx < 2 else second).update(ba, bb)
    merged = first.merge(second)
    np.testing.assert_allclose(merged.compute(), single.compute(), atol=1e-14)
    assert merged.n_samples == single.n_samples
    restored = MinibatchCKA.from_state_dict(single.state_dict())
    np.testing.assert_array_equal(restored.compute(), single.compute())
    restored.reset()
    assert restored.n_batches == 0


def test_minibatch_self_comparison_and_update_grams():
    rng = np.random.default_rng(13)
    acts_a, _ = _layers(rng, 20)
    names = list(acts_a)
    self_acc = MinibatchCKA(names)
    cross_acc = MinibatchCKA(names, names)
    gram_acc = MinibatchCKA(names)
    for batch in _batched(acts_a, [10, 10]):
        self_acc.update(batch)
        cross_acc.update(batch, batch)
        grams = torch.stack([u_centered_gram(batch[n]) for n in names]).to(torch.float32)
        gram_acc.update_grams(grams)
    expected = ref_minibatch(acts_a, acts_a, [10, 10])
    np.testing.assert_allclose(self_acc.compute(), expected, atol=1e-12)
    np.testing.assert_allclose(cross_acc.compute(), expected, atol=1e-12)
    np.testing.assert_allclose(gram_acc.compute(), expected, atol=1e-6)  # float32 Grams
    np.testing.assert_allclose(np.diag(self_acc.compute()), 1.0, atol=1e-12)


def test_minibatch_rbf_matches_reference():
    rng = np.random.default_rng(14)
    x, y = related_pair(rng, 12, 5, 6)
    acc = MinibatchCKA(["x"], ["y"], kernel="rbf", threshold=0.8)
    acc.update({"x": x}, {"y": y})
    expected = ref_cka(x, y, kernel="rbf", unbiased=True, threshold=0.8)
    assert acc.compute()[0, 0] == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- numerics


def offset_relu_pair(n: int, p: int, seed: int, offset: float = 60.0):
    """Post-ReLU-like features of two unrelated layers: spread ≈ 0.58, so an offset of 60 is a
    mean of ≈ 100 × the spread. Float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    z, w = (torch.randn(n, 16, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.relu(z @ torch.randn(16, p, generator=g, dtype=torch.float64) / 4) + offset
    y = torch.relu(w @ torch.randn(16, p, generator=g, dtype=torch.float64) / 4) + offset
    return x, y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("offset", [60.0, 600.0])
def test_low_precision_inputs_with_large_offset_within_1e4(dtype, unbiased, offset):
    x, y = offset_relu_pair(64, 4000, seed=15, offset=offset)
    x, y = x.to(dtype), y.to(dtype)
    # the reference sees exactly the values the estimator sees, in float64
    expected = ref_cka(x.double().numpy(), y.double().numpy(), unbiased=unbiased)
    assert abs(cka(x, y, unbiased=unbiased) - expected) < 1e-4
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        assert abs(cka(x.numpy(), y.numpy(), unbiased=unbiased) - expected) < 1e-4
    acc = MinibatchCKA(["x"], ["y"])
    acc.update([x], [y])
    assert abs(acc.compute()[0, 0] - ref_cka(x.double(), y.double(), unbiased=True)) < 1e-4


def test_offset_case_defeats_an_uncentered_float32_gram():
    """Power check: the pytorch-cka-style computation (uncentered float32 Gram) misses 1e-4."""
    x, y = offset_relu_pair(64, 4000, seed=15)
    x16, y16 = x.half(), y.half()  # as stored; the reference sees the same values
    expected = ref_cka(x16.double().numpy(), y16.double().numpy())
    x32, y32 = x16.float(), y16.float()
    h = torch.eye(64) - 1 / 64
    kc, lc = h @ (x32 @ x32.T) @ h, h @ (y32 @ y32.T) @ h
    naive = float((kc * lc).sum() / torch.sqrt((kc * kc).sum() * (lc * lc).sum()))
    assert abs(naive - expected) > 5e-4
    assert abs(cka(x32, y32) - expected) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_inputs_stay_on_device_and_meet_the_bar(dtype):
    x, y = offset_relu_pair(64, 4000, seed=16)
    xd, yd = x.to("cuda", dtype), y.to("cuda", dtype)
    assert gram_linear(xd).device.type == "cuda"
    for unbiased in (False, True):
        expected = ref_cka(xd.double().cpu().numpy(), yd.double().cpu().numpy(), unbiased=unbiased)
        assert abs(cka(xd, yd, unbiased=unbiased) - expected) < 1e-4
    acc = MinibatchCKA(["x"], ["y"])
    for s in (0, 32):
        acc.update([xd[s : s + 32]], [yd[s : s + 32]])
    ref = ref_minibatch(
        {"x": xd.double().cpu().numpy()}, {"y": yd.double().cpu().numpy()}, [32, 32]
    )
    assert abs(acc.compute()[0, 0] - ref[0, 0]) < 1e-4


# --------------------------------------------------------------------------- degenerate input


def test_fewer_than_four_samples_raise_for_hsic1():
    x = np.random.default_rng(17).standard_normal((3, 5))
    k = x @ x.T
    with pytest.raises(ValueError, match="at least 4 samples"):
        hsic1(k, k)
    with pytest.raises(ValueError, match="at least 4 samples"):
        cka(x, x, unbiased=True)
    acc = MinibatchCKA(["x"])
    with pytest.raises(ValueError, match=r"at least 4 samples.*n = 3"):
        acc.update({"x": x})
    with pytest.raises(ValueError, match="at least 4 samples"):
        acc.update_grams(np.zeros((1, 3, 3)))


@pytest.mark.parametrize("layer", ["constant", "zeros"])
def test_constant_or_zero_layer_gives_nan_and_names_it(layer):
    rng = np.random.default_rng(18)
    x = rng.standard_normal((16, 7))
    bad = np.full((16, 7), 0.1) if layer == "constant" else np.zeros((16, 7))
    with pytest.warns(DegenerateLayerWarning, match=r"'y'.*is 0"):
        assert np.isnan(cka(x, bad))
    with pytest.warns(DegenerateLayerWarning, match=r"'y'.*is 0"):
        assert np.isnan(cka(x, np.tile(bad, (1, 5)), unbiased=True))  # Gram form (p > n)
    acc = MinibatchCKA(["good", "dead.relu"], ["other"])
    acc.update({"good": x, "dead.relu": bad}, {"other": x[:, :3]})
    with pytest.warns(DegenerateLayerWarning, match=r"'dead\.relu'.*is 0"):
        result = acc.compute()
    assert np.isnan(result[1, 0]) and np.isfinite(result[0, 0])


def test_constant_float16_layer_is_exactly_degenerate():
    """A constant float16 column must center to exactly 0, not to rounding noise."""
    x = torch.full((32, 100), 37.1, dtype=torch.float16)
    assert float(gram_linear(x).abs().max()) == 0.0


def test_rbf_with_zero_median_distance_raises():
    with pytest.raises(ValueError, match="median squared distance.*kernel='linear'"):
        gram_rbf(np.ones((8, 3)))


def test_negative_self_hsic_is_reported_not_clamped():
    with pytest.warns(DegenerateLayerWarning, match=r"'conv1'.*negative \(-0\.002"):
        out = cka_from_hsic(
            np.array([[0.1, 0.2]]), np.array([-0.002]), np.array([1.0, 4.0]), layers_a=["conv1"]
        )
    assert np.isnan(out).all()
    state = MinibatchCKA(["a"], ["b"]).state_dict()
    state.update(
        hsic_per_batch=np.array([[[0.1]]]),
        self_a_per_batch=np.array([[-0.5]]),
        self_b_per_batch=np.array([[1.0]]),
        batch_sizes=np.array([8]),
    )
    with pytest.warns(DegenerateLayerWarning, match=r"'a'.*negative \(-0\.5\)"):
        assert np.isnan(MinibatchCKA.from_state_dict(state).compute()[0, 0])


def test_cka_from_hsic_divides_with_broadcast_replicates():
    hsic = np.array([[[1.0, 2.0]], [[3.0, 0.5]]])  # (R=2, La=1, Lb=2)
    self_a = np.array([[4.0], [1.0]])
    self_b = np.array([[1.0, 16.0], [9.0, 1.0]])
    expected = np.array([[[0.5, 0.25]], [[1.0, 0.5]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(cka_from_hsic(hsic, self_a, self_b), expected, rtol=1e-15)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_input_names_argument_and_first_sample(bad):
    x = np.random.default_rng(19).standard_normal((10, 4))
    y = x.copy()
    y[6, 2] = bad
    y[8, 0] = bad
    with pytest.raises(ValueError, match=r"y contains NaN or Inf \(first at sample 6"):
        cka(x, y)
    acc = MinibatchCKA(["l1"], ["l2"])
    with pytest.raises(ValueError, match=r"acts_b\['l2'\] contains NaN or Inf \(first at sample 6"):
        acc.update({"l1": x}, {"l2": y})
    assert acc.n_batches == 0


def test_mismatched_sample_counts_show_both_shapes():
    rng = np.random.default_rng(20)
    with pytest.raises(ValueError, match=r"\(10, 4\) and \(9, 4\)"):
        cka(rng.standard_normal((10, 4)), rng.standard_normal((9, 4)))
    acc = MinibatchCKA(["a", "b"])
    with pytest.raises(ValueError, match=r"acts_a\['b'\] has 9 samples"):
        acc.update({"a": rng.standard_normal((10, 4)), "b": rng.standard_normal((9, 4))})


def test_bad_shapes_and_arguments_are_explained():
    rng = np.random.default_rng(21)
    with pytest.raises(ValueError, match=r"shape \(n_samples, \.\.\.\).*x\[:, None\]"):
        cka(rng.standard_normal(10), rng.standard_normal((10, 2)))
    with pytest.raises(ValueError, match="unknown kernel 'poly'"):
        cka(rng.standard_normal((10, 20)), rng.standard_normal((10, 20)), kernel="poly")
    with pytest.raises(ValueError, match="square"):
        hsic1(np.zeros((5, 4)), np.zeros((5, 4)))
    acc = MinibatchCKA(["a"], ["b"])
    with pytest.raises(ValueError, match=r"missing \['a'\], unexpected \['c'\]"):
        acc.update({"c": rng.standard_normal((8, 2))}, {"b": rng.standard_normal((8, 2))})
    with pytest.raises(ValueError, match="acts_b is required"):
        acc.update({"a": rng.standard_normal((8, 2))})
    with pytest.raises(ValueError, match="not U-centered"):
        acc.update_grams(np.eye(8)[None], np.eye(8)[None])
    nan_gram = np.zeros((1, 8, 8))
    nan_gram[0, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"grams_b: the Gram of layer 'b' contains NaN"):
        acc.update_grams(np.zeros((1, 8, 8)), nan_gram)
    with pytest.raises(RuntimeError, match="no batches"):
        acc.compute()
    with pytest.raises(ValueError, match="different comparisons"):
        acc.merge(MinibatchCKA(["a"], ["x"]))
    with pytest.raises(TypeError, match="can only merge"):
        acc.merge(object())  # type: ignore[arg-type]


def test_too_few_samples_are_a_data_error_not_a_crash():
    from ckapipe.errors import DataError

    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="at least 2 samples"):
        cka(rng.normal(size=(1, 3)), rng.normal(size=(1, 4)))  # biased: (n-1)² would be 0
    with pytest.raises(DataError, match="at least 4 samples"):
        cka(rng.normal(size=(3, 3)), rng.normal(size=(3, 4)), unbiased=True)
