"""The yardstick itself: tests/reference.py's independent formulations agree with each other."""

from __future__ import annotations

import numpy as np
import pytest
import reference


def _pair(rng, n, p=5, q=7, offset=0.0):
    x = rng.standard_normal((n, p)) + offset
    y = np.tanh(x @ rng.standard_normal((p, q))) + rng.standard_normal((n, q)) + offset
    return x, y


@pytest.mark.parametrize("n", [4, 5, 12, 31])
def test_hsic1_u_centered_form_equals_song_formula(n):
    rng = np.random.default_rng(n)
    x, y = _pair(rng, n)
    grams = {
        "raw": (x @ x.T, y @ y.T),  # uncentered Grams
        "linear": (reference.linear_gram(x), reference.linear_gram(y)),
        "rbf": (reference.rbf_gram(x, 0.7), reference.rbf_gram(y)),
        "asym-diag": (x @ x.T + np.diag(rng.random(n)), y @ y.T),  # diagonal is ignored
    }
    for k, l in grams.values():  # noqa: E741
        for a, b in ((k, l), (k, k), (l, l)):
            assert reference.hsic1(a, b) == pytest.approx(reference.hsic1_song(a, b), rel=1e-10)


def test_hsic1_forms_agree_to_1e12_on_uncentered_linear_grams():
    """(Formerly in test_intervals.py.)"""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 5))
    k, l = x @ x.T, y @ y.T  # noqa: E741
    assert reference.hsic1(k, l) == pytest.approx(reference.hsic1_song(k, l), rel=1e-12)


def test_u_centering_vectorised_equals_elementwise_and_is_idempotent():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 9, 4)) + 1.0
    grams = x @ np.swapaxes(x, 1, 2)
    stacked = reference.u_centered(grams)
    for g, u in zip(grams, stacked, strict=True):
        np.testing.assert_allclose(u, reference.u_centered_elementwise(g), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(u.sum(axis=0), 0.0, atol=1e-9)
        np.testing.assert_allclose(u.sum(axis=1), 0.0, atol=1e-9)
        np.testing.assert_allclose(reference.u_centered(u), u, atol=1e-9)
    # batched HSIC₁ equals one pair at a time, and hsic1_u on pre-centered Grams
    values = reference.hsic1(grams, grams[::-1])
    for b in range(3):
        assert values[b] == pytest.approx(reference.hsic1_song(grams[b], grams[2 - b]), rel=1e-10)
    np.testing.assert_allclose(reference.hsic1_u(stacked, stacked[::-1]), values, rtol=1e-12)


def test_u_centering_leaves_the_input_alone():
    k = np.arange(16.0).reshape(4, 4)
    before = k.copy()
    reference.u_centered(k)
    reference.hsic1_song(k, k)
    np.testing.assert_array_equal(k, before)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_biased_linear_cka_equals_feature_space_form(offset):
    rng = np.random.default_rng(3)
    for n, p, q in ((20, 5, 7), (8, 30, 12)):  # p < n and p > n
        x, y = _pair(rng, n, p, q, offset)
        assert reference.cka(x, y) == pytest.approx(reference.cka_features(x, y), rel=1e-10)
        # HSIC₀ with explicit H on uncentered Grams is the same number
        k, l = x @ x.T, y @ y.T  # noqa: E741
        expected = reference.hsic0(k, l) / np.sqrt(reference.hsic0(k, k) * reference.hsic0(l, l))
        assert expected == pytest.approx(reference.cka_features(x, y), rel=1e-8)


def test_linear_gram_centers_and_flattens():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 2, 3)) + 5.0
    xf = x.reshape(6, -1)
    h = reference.centering_matrix(6)
    np.testing.assert_allclose(reference.linear_gram(x), h @ xf @ xf.T @ h, atol=1e-10)


def test_rbf_bandwidth_is_the_median_of_the_full_distance_matrix():
    x = np.array([[0.0], [1.0], [3.0]])
    # D = [[0,1,9],[1,0,4],[9,4,0]]: nine entries, three zeros; median = 1 (off-diagonal alone: 4)
    assert reference.rbf_sigma2(x) == 1.0
    assert reference.rbf_sigma2(x, 2.0) == 4.0
    np.testing.assert_allclose(reference.rbf_gram(x)[0, 2], np.exp(-9 / 2))
    np.testing.assert_allclose(np.diag(reference.rbf_gram(x)), 1.0)


def test_debiased_cka_of_an_invariant_pair_is_one():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((15, 4))
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    for unbiased in (False, True):
        assert reference.cka(x, 3 * x @ q + 1, unbiased=unbiased) == pytest.approx(1.0, rel=1e-12)


def test_batch_slices_keep_a_short_last_batch_of_four_or_more():
    assert [(s.start, s.stop) for s in reference.batch_slices(20, 8)] == [(0, 8), (8, 16), (16, 20)]
    assert [(s.start, s.stop) for s in reference.batch_slices(19, 8)] == [(0, 8), (8, 16)]
    assert [(s.start, s.stop) for s in reference.batch_slices(17, 8)] == [(0, 8), (8, 16)]
    assert [(s.start, s.stop) for s in reference.batch_slices(16, 8)] == [(0, 8), (8, 16)]


def test_minibatch_cka_sums_per_batch_hsic1_with_each_batch_scale():
    rng = np.random.default_rng(6)
    x, y = _pair(rng, 21)  # batches of 8, 8, 5
    blocks = reference.batch_slices(21, 8)
    xy = xx = yy = 0.0
    for b in blocks:
        k, l = x[b] @ x[b].T, y[b] @ y[b].T  # noqa: E741
        xy += reference.hsic1_song(k, l)
        xx += reference.hsic1_song(k, k)
        yy += reference.hsic1_song(l, l)
    expected = xy / np.sqrt(xx * yy)
    assert reference.minibatch_linear_cka(x, y, 8) == pytest.approx(expected, rel=1e-10)
    # the matrix form, two layers a side; one batch of everything is the full debiased CKA
    matrix = reference.minibatch_cka([[x[b], y[b]] for b in blocks], [[y[b]] for b in blocks])
    assert matrix.shape == (2, 1) and matrix[1, 0] == pytest.approx(1.0, rel=1e-12)
    assert matrix[0, 0] == pytest.approx(expected, rel=1e-10)
    full = reference.minibatch_cka([[x]], [[y]])[0, 0]
    assert full == pytest.approx(reference.cka(x, y, unbiased=True), rel=1e-12)
    # 1–3 leftover rows are dropped
    assert reference.minibatch_linear_cka(x[:19], y[:19], 8) == pytest.approx(
        reference.minibatch_linear_cka(x[:16], y[:16], 8), rel=1e-15
    )


def test_reference_does_not_import_ckapipe():
    with open(reference.__file__, encoding="utf-8") as handle:
        source = handle.read()
    assert "import ckapipe" not in source and "from ckapipe" not in source
