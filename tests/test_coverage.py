"""Validated intervals (ckapipe.analyze.intervals): the jackknife over batches, its withholding
rule, the full-mode block jackknife and the permutation-null threshold, against the float64
references of tests/reference.py and small seeded coverage simulations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import hsic1_u as hsic1
from reference import u_centered

from ckapipe.analyze.intervals import (
    MIN_BATCHES_FOR_INTERVAL,
    FullBlockJackknife,
    batch_interval,
    jackknife_cka,
    null_threshold,
    permutation_p_value,
    sample_blocks,
    student_t_quantile,
)

# ---------------------------------------------------------------------- float64 references


def per_batch_linear(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """(B,) cross, self x, self y HSIC₁ of batches xs (B, m, p), ys (B, m, q), one by one."""
    out = np.zeros((3, xs.shape[0]))
    for b, (x, y) in enumerate(zip(xs, ys, strict=True)):
        u, v = u_centered(x @ x.T), u_centered(y @ y.T)
        out[:, b] = hsic1(u, v), hsic1(u, u), hsic1(v, v)
    return out[0], out[1], out[2]


def gaussian_batches(rng, n_batches, m, p, sigma):
    """x ~ N(0, I_p), y = x + σ ε: population linear CKA 1 / (1 + σ²)."""
    x = rng.standard_normal((n_batches, m, p))
    return x, x + sigma * rng.standard_normal((n_batches, m, p))


# ---------------------------------------------------------------------- t quantile


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [  # scipy.stats.t.ppf values
        (0.975, 1, 12.706204736174694),
        (0.975, 3, 3.1824463052837078),
        (0.975, 7, 2.364624251592784),
        (0.95, 4, 2.1318467863266495),
        (0.95, 30, 1.697260886593957),
        (0.995, 15, 2.946712883475238),
    ],
)
def test_student_t_quantile_matches_scipy_values(q, df, expected):
    assert student_t_quantile(q, df) == pytest.approx(expected, abs=1e-8)
    assert student_t_quantile(1 - q, df) == pytest.approx(-expected, abs=1e-8)


# ---------------------------------------------------------------------- minibatch jackknife


def test_jackknife_equals_direct_delete_one_recomputation():
    rng = np.random.default_rng(11)
    n_batches, m = 6, 10
    x = rng.standard_normal((n_batches, m, 3))
    layers_a = [x, np.tanh(x @ rng.standard_normal((3, 4)))]
    layers_b = [x @ rng.standard_normal((3, 2)) + rng.standard_normal((n_batches, m, 2))]
    layers_b.append(rng.standard_normal((n_batches, m, 5)))
    hsic = np.zeros((n_batches, 2, 2))
    self_a, self_b = np.zeros((n_batches, 2)), np.zeros((n_batches, 2))
    for i, xa in enumerate(layers_a):
        for j, yb in enumerate(layers_b):
            hsic[:, i, j], self_a[:, i], self_b[:, j] = per_batch_linear(xa, yb)
    estimate, se, undefined = jackknife_cka(hsic, self_a, self_b)
    for i in range(2):
        for j in range(2):
            keep_all = np.arange(n_batches)
            theta = hsic[keep_all, i, j].sum() / np.sqrt(
                self_a[keep_all, i].sum() * self_b[keep_all, j].sum()
            )
            deleted = []
            for b in range(n_batches):
                keep = np.delete(keep_all, b)
                deleted.append(
                    hsic[keep, i, j].sum() / np.sqrt(self_a[keep, i].sum() * self_b[keep, j].sum())
                )
            deleted = np.array(deleted)
            reference = np.sqrt(
                (n_batches - 1) / n_batches * ((deleted - deleted.mean()) ** 2).sum()
            )
            assert estimate[i, j] == pytest.approx(theta, rel=1e-12)
            assert se[i, j] == pytest.approx(reference, rel=1e-10)
    assert not undefined.any()
    interval = batch_interval(hsic, self_a, self_b, 0.9, min_batches=2)
    half = student_t_quantile(0.95, n_batches - 1) * se
    np.testing.assert_allclose(interval.low, estimate - half, rtol=1e-12)
    np.testing.assert_allclose(interval.high, estimate + half, rtol=1e-12)
    assert interval.reason is None and interval.method == "jackknife"
    assert interval.n_batches == n_batches


def test_jackknife_leaves_out_and_counts_undefined_delete_one_values():
    rng = np.random.default_rng(3)
    hsic = rng.normal(size=(5, 1, 2))
    self_a = np.abs(rng.normal(size=(5, 1))) + 1.0
    self_b = np.abs(rng.normal(size=(5, 2))) + 1.0
    # batch 0 carries all of layer b[1]'s positive self-HSIC: deleting it leaves a negative sum
    self_b[:, 1] = [10.0, -1.0, -1.0, -1.0, -1.0]
    _, se, undefined = jackknife_cka(hsic, self_a, self_b)
    assert undefined.tolist() == [[0, 1]]
    keep = np.arange(1, 5)
    left_b = self_b[:, 1].sum() - self_b[keep, 1]
    deleted = (hsic[:, 0, 1].sum() - hsic[keep, 0, 1]) / np.sqrt(
        (self_a[:, 0].sum() - self_a[keep, 0]) * left_b
    )
    assert se[0, 1] == pytest.approx(np.sqrt(3 / 4 * ((deleted - deleted.mean()) ** 2).sum()))


def test_interval_is_withheld_below_the_validated_batch_count_with_a_reason():
    need = MIN_BATCHES_FOR_INTERVAL["jackknife"]
    rng = np.random.default_rng(5)
    x, y = gaussian_batches(rng, need, 8, 4, 1.0)
    h, a, b = per_batch_linear(x, y)
    terms = (h[:, None, None], a[:, None], b[:, None])
    few = batch_interval(*(t[: need - 1] for t in terms), 0.95) if need > 1 else None
    if few is not None:
        assert np.isnan(few.low).all() and np.isnan(few.high).all()
        assert few.reason.startswith("interval withheld:")
        assert f"{need - 1} batches < {need} needed" in few.reason
        assert few.withheld and few.n_batches == need - 1
    enough = batch_interval(*terms, 0.95)
    assert enough.reason is None and np.isfinite(enough.low).all()
    assert enough.low[0, 0] < enough.high[0, 0]
    # one batch is always withheld, whatever the threshold
    one = batch_interval(*(t[:1] for t in terms), 0.95, min_batches=2)
    assert np.isnan(one.low).all() and "1 batches < 2 needed" in one.reason
    # batches of several epochs share samples: withheld at any batch count
    epochs = batch_interval(*terms, 0.95, epochs=2)
    assert np.isnan(epochs.low).all() and "2 epochs" in epochs.reason
    assert "too narrow" in epochs.reason
    # the bootstrap is available and has its own, higher threshold
    boot = batch_interval(*terms, 0.95, method="bootstrap")
    assert boot.method == "bootstrap"
    assert boot.withheld == (need < MIN_BATCHES_FOR_INTERVAL["bootstrap"])
    with pytest.raises(ValueError, match="unknown interval method"):
        batch_interval(*terms, 0.95, method="bca")


def test_jackknife_t_interval_covers_population_cka_at_nominal_rate():
    """1500 seeded replicates of 8 batches of m = 16 Gaussian samples (population CKA 0.5).

    The delete-one jackknife with t quantiles covers within three binomial standard errors of
    95 %; the same standard error with normal quantiles covers 0.91 and the percentile
    bootstrap 0.87 on these data (checked), so a lost t quantile or a wrong standard error
    fails this test.
    """
    rng = np.random.default_rng(20261201)
    n_batches, m, p, reps, level = 8, 16, 6, 1500, 0.95
    truth = 1.0 / (1.0 + 1.0)
    x, y = gaussian_batches(rng, n_batches * reps, m, p, 1.0)
    # per-batch HSIC₁ of all replicates at once (U-centering is per batch)
    u, v = u_centered(x @ np.swapaxes(x, 1, 2)), u_centered(y @ np.swapaxes(y, 1, 2))
    h = hsic1(u, v).reshape(reps, n_batches)
    a = hsic1(u, u).reshape(reps, n_batches)
    b = hsic1(v, v).reshape(reps, n_batches)
    covered = 0
    for r in range(reps):
        interval = batch_interval(h[r][:, None, None], a[r][:, None], b[r][:, None], level)
        assert interval.reason is None
        covered += bool(interval.low[0, 0] <= truth <= interval.high[0, 0])
    rate = covered / reps
    tolerance = 3 * np.sqrt(level * (1 - level) / reps)
    assert abs(rate - level) <= tolerance, rate


# ---------------------------------------------------------------------- full mode


def test_full_block_jackknife_equals_direct_delete_block_recomputation():
    rng = np.random.default_rng(7)
    n = 41
    x = rng.standard_normal((n, 4))
    layers = [x, x @ rng.standard_normal((4, 3)) + rng.standard_normal((n, 3))]
    layers.append(rng.standard_normal((n, 6)) ** 2)  # skewed, non-zero mean
    grams = [z @ z.T for z in layers]
    centered = np.stack([u_centered(k) for k in grams])  # (3, n, n)
    jack = FullBlockJackknife(n, 3, n_blocks=5, seed=2)
    # uneven row blocks, alternately numpy and torch (the study streams torch rows)
    for start, stop in ((0, 7), (7, 20), (20, 21), (21, n)):
        rows = centered[:, start:stop, :]
        jack.update(torch.from_numpy(rows.copy()) if start % 2 else rows, start)
    inner = np.einsum("aij,bij->ab", centered, centered)
    np.testing.assert_allclose(jack.inner(), inner, rtol=1e-12)
    deleted = jack.deleted_hsic()
    assert deleted.shape == (5, 3, 3)
    for g in range(5):
        keep = jack.labels != g
        kept = [u_centered(k[np.ix_(keep, keep)]) for k in grams]  # re-centered from scratch
        reference = np.array([[hsic1(u, v) for v in kept] for u in kept])
        np.testing.assert_allclose(deleted[g], reference, rtol=1e-10, atol=1e-12)
    # the interval: exact CKA ± t_{G−1} · jackknife se of the delete-one-block CKA
    interval = jack.interval(np.array([0, 2]), np.array([1]), 0.95)
    for row, i in enumerate((0, 2)):
        cka = inner[i, 1] / np.sqrt(inner[i, i] * inner[1, 1])
        values = deleted[:, i, 1] / np.sqrt(deleted[:, i, i] * deleted[:, 1, 1])
        se = np.sqrt(4 / 5 * ((values - values.mean()) ** 2).sum())
        half = student_t_quantile(0.975, 4) * se
        assert interval.low[row, 0] == pytest.approx(cka - half, rel=1e-10)
        assert interval.high[row, 0] == pytest.approx(cka + half, rel=1e-10)
    assert interval.reason is None and interval.method == "block-jackknife"


def test_full_block_jackknife_withholds_when_blocks_are_too_small():
    jack = FullBlockJackknife(20, 1, n_blocks=8)
    jack.update(np.zeros((1, 20, 20)), 0)
    interval = jack.interval(np.array([0]), np.array([0]))
    assert np.isnan(interval.low).all() and interval.reason.startswith("interval withheld:")


def test_sample_blocks_are_balanced_random_and_seeded():
    labels = sample_blocks(50, 8, seed=1)
    assert np.bincount(labels).min() >= 6 and np.bincount(labels).max() <= 7
    assert np.array_equal(labels, sample_blocks(50, 8, seed=1))
    assert not np.array_equal(labels, np.arange(50) % 8)  # not contiguous or striped


def test_full_block_jackknife_covers_population_cka():
    """300 seeded data sets of n = 128 Gaussian samples, 16 blocks, population CKA 0.5."""
    rng = np.random.default_rng(99)
    n, p, reps, level = 128, 6, 300, 0.9
    covered = 0
    for rep in range(reps):
        x = rng.standard_normal((n, p))
        y = x + rng.standard_normal((n, p))
        centered = np.stack([u_centered(x @ x.T), u_centered(y @ y.T)])
        jack = FullBlockJackknife(n, 2, n_blocks=16, seed=rep)
        jack.update(centered, 0)
        interval = jack.interval(np.array([0]), np.array([1]), level)
        covered += bool(interval.low[0, 0] <= 0.5 <= interval.high[0, 0])
    rate = covered / reps
    assert abs(rate - level) <= 3 * np.sqrt(level * (1 - level) / reps), rate


# ---------------------------------------------------------------------- permutation null


def test_null_threshold_agrees_with_the_permutation_p_value():
    rng = np.random.default_rng(4)
    for n_perm in (19, 99, 200):
        null = rng.normal(size=(n_perm, 3, 4))
        threshold = null_threshold(null, 0.05)
        # observed values at, just below and just above every null value
        for value in np.concatenate([null, null + 1e-9, null - 1e-9]):
            p = permutation_p_value(value, null)
            np.testing.assert_array_equal(value > threshold, p <= 0.05)
    assert np.isinf(null_threshold(rng.normal(size=(10, 2)), 0.05)).all()  # P too small
    null = rng.normal(size=(99, 2))
    null[3, 1] = np.nan
    assert np.isnan(null_threshold(null)[1]) and np.isfinite(null_threshold(null)[0])
