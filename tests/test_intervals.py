"""Bootstrap intervals and permutation p-values (ckapipe.analyze.intervals) against float64
references (HSIC₁ from tests/reference.py; the bootstrap written out here)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import hsic1

from ckapipe.analyze.intervals import (
    bootstrap_cka,
    bootstrap_counts,
    nonpositive_self_hsic,
    percentile_interval,
    permutation_p_value,
    ratio_cka,
)

# ---------------------------------------------------------------------- float64 references


def per_batch_terms(xs: list[np.ndarray], ys: list[np.ndarray]):
    """Per-batch HSIC₁ for layers xs (La of (B, m, p)) and ys (Lb of (B, m, q))."""
    ka = [x @ np.swapaxes(x, 1, 2) for x in xs]  # La × (B, m, m)
    kb = [y @ np.swapaxes(y, 1, 2) for y in ys]
    hsic = np.stack([np.stack([hsic1(a, b) for b in kb], -1) for a in ka], -2)
    self_a = np.stack([hsic1(a, a) for a in ka], -1)
    self_b = np.stack([hsic1(b, b) for b in kb], -1)
    return hsic, self_a, self_b  # (B, La, Lb), (B, La), (B, Lb)


def reference_bootstrap(hsic, self_a, self_b, counts, ci_level):
    """Replicate by replicate and layer pair by layer pair, with explicit index lists."""
    n_rep, n_batches = counts.shape
    la, lb = hsic.shape[1:]
    values = np.empty((n_rep, la, lb))
    for r in range(n_rep):
        idx = np.repeat(np.arange(n_batches), counts[r].astype(int))
        for i in range(la):
            for j in range(lb):
                sa, sb = self_a[idx, i].sum(), self_b[idx, j].sum()
                if sa > 0 and sb > 0:
                    values[r, i, j] = hsic[idx, i, j].sum() / np.sqrt(sa * sb)
                else:
                    values[r, i, j] = np.nan
    alpha = (1 - ci_level) / 2
    low = np.nanquantile(values, alpha, axis=0)
    high = np.nanquantile(values, 1 - alpha, axis=0)
    return low, high, np.isnan(values).sum(axis=0)


# ---------------------------------------------------------------------- tests


def test_bootstrap_counts_are_seeded_multinomial_draws():
    counts = bootstrap_counts(7, 50, np.random.default_rng(3))
    assert counts.shape == (50, 7)
    assert np.all(counts.sum(axis=1) == 7)
    assert np.all(counts >= 0) and np.all(counts == np.round(counts))
    assert np.array_equal(counts, bootstrap_counts(7, 50, np.random.default_rng(3)))
    assert not np.array_equal(counts, bootstrap_counts(7, 50, np.random.default_rng(4)))


def test_bootstrap_equals_replicate_by_replicate_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 10, 3))
    xs = [x, np.tanh(x @ rng.normal(size=(3, 4)))]
    ys = [
        x @ rng.normal(size=(3, 2)) + rng.normal(size=(9, 10, 2)),
        rng.normal(size=(9, 10, 6)),
        x[..., :1] ** 2,
    ]
    hsic, self_a, self_b = per_batch_terms(xs, ys)
    counts = bootstrap_counts(9, 200, np.random.default_rng(5))
    got = bootstrap_cka(hsic, self_a, self_b, ci_level=0.9, counts=counts)
    low, high, undefined = reference_bootstrap(hsic, self_a, self_b, counts, 0.9)
    np.testing.assert_allclose(got.low, low, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.high, high, rtol=1e-10, atol=1e-12)
    assert np.array_equal(got.n_undefined, undefined)
    assert got.n_bootstrap == 200
    # a seed gives the same counts as the generator it seeds
    seeded = bootstrap_cka(hsic, self_a, self_b, n_bootstrap=200, ci_level=0.9, rng=5)
    np.testing.assert_array_equal(seeded.low, got.low)


def test_bootstrap_leaves_out_and_counts_replicates_with_negative_self_hsic():
    rng = np.random.default_rng(2)
    n_batches = 6
    hsic = rng.normal(size=(n_batches, 2, 2))
    self_a = np.abs(rng.normal(size=(n_batches, 2))) + 0.5
    self_b = np.abs(rng.normal(size=(n_batches, 2))) + 0.5
    # layer b[1]: strongly negative in one batch, so replicates drawing it twice or more are undefined
    self_b[0, 1] = -4.0
    counts = bootstrap_counts(n_batches, 300, np.random.default_rng(8))
    got = bootstrap_cka(hsic, self_a, self_b, ci_level=0.8, counts=counts)
    low, high, undefined = reference_bootstrap(hsic, self_a, self_b, counts, 0.8)
    assert undefined[:, 1].min() > 0 and undefined[:, 0].max() == 0
    assert np.array_equal(got.n_undefined, undefined)
    np.testing.assert_allclose(got.low, low, rtol=1e-10)
    np.testing.assert_allclose(got.high, high, rtol=1e-10)


def test_bootstrap_interval_covers_population_minibatch_cka_at_nominal_rate():
    """200 repetitions of a Gaussian problem whose population CKA is known in closed form.

    x ~ N(0, I_p), y_j = x W_j + s_j ε: for linear kernels HSIC = ||Cov||_F², so the population
    minibatch CKA (ratio of expected HSIC₁, which is unbiased per batch) is
    ||W||_F² / sqrt(p · ||WᵀW + s² I||_F²).

    The percentile bootstrap over 60 batches covers slightly less than nominal (≈ 0.87–0.91
    over seeds, measured): per-batch HSIC values are skewed and the bootstrap variance is
    (B − 1)/B of the true one. The tolerance is three binomial standard errors at 200 reps.
    """
    rng = np.random.default_rng(20240607)
    p, q, m, n_batches, reps, level = 3, 3, 32, 60, 200, 0.9
    weights = [rng.normal(size=(p, q)), 0.4 * rng.normal(size=(p, q))]
    noise = [1.0, 1.5]
    truth = np.array(
        [
            (w**2).sum() / np.sqrt(p * ((w.T @ w + s**2 * np.eye(q)) ** 2).sum())
            for w, s in zip(weights, noise, strict=True)
        ]
    )
    covered = np.zeros(2)
    widths = []
    for _ in range(reps):
        x = rng.normal(size=(n_batches, m, p))
        ys = [
            x @ w + s * rng.normal(size=(n_batches, m, q))
            for w, s in zip(weights, noise, strict=True)
        ]
        hsic, self_a, self_b = per_batch_terms([x], ys)
        interval = bootstrap_cka(hsic, self_a, self_b, n_bootstrap=400, ci_level=level, rng=rng)
        covered += (interval.low[0] <= truth) & (truth <= interval.high[0])
        widths.append(interval.high[0] - interval.low[0])
    rate = covered / reps
    tolerance = 3 * np.sqrt(level * (1 - level) / reps)  # 3 binomial standard errors
    assert np.all(np.abs(rate - level) <= tolerance), (rate, truth)
    assert np.all(np.mean(widths, axis=0) > 0.02)  # intervals are not degenerate


def test_bootstrap_refuses_a_single_batch_and_bad_shapes():
    hsic, sa, sb = np.ones((1, 2, 3)), np.ones((1, 2)), np.ones((1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_cka(hsic, sa, sb)
    with pytest.raises(ValueError, match="shapes do not fit"):
        bootstrap_cka(np.ones((4, 2, 3)), np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="ci_level"):
        bootstrap_cka(np.ones((4, 2, 3)), np.ones((4, 2)), np.ones((4, 3)), ci_level=95)


def test_percentile_interval_matches_numpy_quantile_and_ignores_nan():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(101, 3))
    values[:10, 1] = np.nan
    values[:, 2] = np.nan
    low, high = percentile_interval(values, 0.9)
    assert low[0] == pytest.approx(np.quantile(values[:, 0], 0.05))
    assert high[0] == pytest.approx(np.quantile(values[:, 0], 0.95))
    assert low[1] == pytest.approx(np.quantile(values[10:, 1], 0.05))
    assert np.isnan(low[2]) and np.isnan(high[2])


def test_ratio_cka_gives_nan_for_nonpositive_self_terms_without_clamping():
    hsic = np.array([[2.0, -1.0], [3.0, 5.0]])
    got = ratio_cka(hsic, np.array([4.0, 0.0]), np.array([1.0, 1.0 / 4]))
    np.testing.assert_array_equal(got[0], [1.0, -1.0])
    assert np.isnan(got[1]).all()
    over = ratio_cka(np.array([[3.0]]), np.array([1.0]), np.array([4.0]))
    assert over[0, 0] == 1.5  # an unbiased ratio above 1 is reported as it is


def test_permutation_p_value_formula():
    observed = np.array([[0.5, 0.1], [np.nan, 0.0]])
    null = np.array(
        [[[0.6, 0.0], [0.0, 0.0]], [[0.1, 0.2], [0.0, -1.0]], [[0.5, 0.05], [0.0, -1.0]]]
    )
    got = permutation_p_value(observed, null)
    np.testing.assert_array_equal(got[0], [(1 + 2) / 4, (1 + 1) / 4])
    assert np.isnan(got[1, 0])
    assert got[1, 1] == (1 + 1) / 4
    with pytest.raises(ValueError, match="null must be"):
        permutation_p_value(observed, np.zeros((3, 2)))


def test_nonpositive_self_hsic_names_model_layer_and_value():
    messages = nonpositive_self_hsic(
        np.array([1.0, 0.0, -0.25, np.nan]), ["l0", "dead", "neg", "bad"], "resnet"
    )
    assert len(messages) == 3
    assert "'resnet'" in messages[0] and "'dead'" in messages[0] and "is 0" in messages[0]
    assert "'neg'" in messages[1] and "-0.25" in messages[1] and "not clamped" in messages[1]
    assert "'bad'" in messages[2] and "NaN" in messages[2]
