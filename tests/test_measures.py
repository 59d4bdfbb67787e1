"""The similarity measures of :mod:`ckapipe.analyze.measures` against independent float64
feature-space implementations written here (scipy / numpy on the features, never the Gram)."""

# ruff: noqa: E741 - k and l are the papers' names for the two Gram matrices
from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference
import scipy.linalg
import scipy.stats
from scipy.spatial.distance import pdist

import ckapipe
from ckapipe.analyze import measures as ms
from ckapipe.analyze.estimators import DegenerateLayerWarning
from ckapipe.errors import DataError

TOL = 1e-9  # the issue asks for 1e-6; float64 on these sizes does far better

# ------------------------------------------------------------------ feature-space references


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x - x.mean(axis=0)


def _basis(x: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis of the centered column space by pivoted QR (rank from |R_ii|)."""
    q, r, _ = scipy.linalg.qr(_centered(x), mode="economic", pivoting=True)
    d = np.abs(np.diag(r))
    rank = int(np.sum(d > np.sqrt(rtol) * d[0]))
    return q[:, :rank]


def ref_rsa(x, y, method):
    # raw features: distances do not depend on centering, and integer data keep exact ties
    dx, dy = pdist(np.asarray(x, float), "sqeuclidean"), pdist(np.asarray(y, float), "sqeuclidean")
    if method == "pearson":
        return scipy.stats.pearsonr(dx, dy)[0]
    return scipy.stats.spearmanr(dx, dy)[0]


def ref_procrustes(x, y):
    """⟨X R, Y⟩ / (‖X‖‖Y‖) with R from scipy's orthogonal Procrustes on zero-padded features."""
    xc, yc = _centered(x), _centered(y)
    width = max(xc.shape[1], yc.shape[1])
    xp = np.pad(xc, ((0, 0), (0, width - xc.shape[1])))
    yp = np.pad(yc, ((0, 0), (0, width - yc.shape[1])))
    rotation, _ = scipy.linalg.orthogonal_procrustes(xp, yp)
    return np.sum((xp @ rotation) * yp) / (np.linalg.norm(xc) * np.linalg.norm(yc))


def ref_rho(x, y):
    """Canonical correlations from the QR bases of both centered feature matrices."""
    qx, qy = _basis(x), _basis(y)
    return np.linalg.svd(qx.T @ qy, compute_uv=False)[: min(qx.shape[1], qy.shape[1])]


def ref_rho_whitened(x, y):
    """Classical CCA of full-rank features: singular values of Σxx^{-1/2} Σxy Σyy^{-1/2}."""
    xc, yc = _centered(x), _centered(y)
    wx = scipy.linalg.inv(scipy.linalg.sqrtm(xc.T @ xc)).real
    wy = scipy.linalg.inv(scipy.linalg.sqrtm(yc.T @ yc)).real
    return np.linalg.svd(wx @ (xc.T @ yc) @ wy, compute_uv=False)


def ref_pwcca(x, y):
    """ℓ2-weighted PWCCA on full-rank features: canonical variates h_i = X a_i (unit norm),
    α_i = ‖Xᵀh_i‖, Σα ρ / Σα."""
    xc, yc = _centered(x), _centered(y)
    wx = scipy.linalg.inv(scipy.linalg.sqrtm(xc.T @ xc)).real
    wy = scipy.linalg.inv(scipy.linalg.sqrtm(yc.T @ yc)).real
    u, rho, _ = np.linalg.svd(wx @ (xc.T @ yc) @ wy, full_matrices=False)
    count = min(xc.shape[1], yc.shape[1])
    h = xc @ wx @ u[:, :count]
    h /= np.linalg.norm(h, axis=0)
    alpha = np.linalg.norm(xc.T @ h, axis=0)
    return np.sum(alpha * rho[:count]) / np.sum(alpha)


def ref_svcca(x, y, keep):
    """Top principal components of each layer (by variance kept), then CCA of the scores."""

    def reduce(z):
        u, s, _ = np.linalg.svd(_centered(z), full_matrices=False)
        s = s[s > 1e-5 * s[0]]
        kept = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(kept >= keep - 1e-12)) + 1
        return u[:, :k] * s[:k]

    return np.mean(ref_rho(reduce(x), reduce(y)))


def ref_regression(x, y):
    xc, yc = _centered(x), _centered(y)
    coef, *_ = np.linalg.lstsq(xc, yc, rcond=1e-10)
    return 1.0 - np.sum((yc - xc @ coef) ** 2) / np.sum(yc**2)


def ref_knn(x, y, k):
    """Brute force: every sample's k most cosine-similar other samples, ties to the lower index."""

    def neighbours(z):
        zc = _centered(z)
        unit = zc / np.linalg.norm(zc, axis=1, keepdims=True)
        sim = unit @ unit.T
        out = []
        for i in range(len(z)):
            others = [j for j in range(len(z)) if j != i]
            ranked = sorted(others, key=lambda j: (-sim[i, j], j))
            out.append(set(ranked[:k]))
        return out

    nx, ny = neighbours(x), neighbours(y)
    return np.mean([len(a & b) / k for a, b in zip(nx, ny, strict=True)])


# ------------------------------------------------------------------ data


def _pair(n, p, q, seed, rank_x=None):
    """Related features (y partly a linear map of x); x of rank ``rank_x`` if given."""
    rng = np.random.default_rng(seed)
    if rank_x is None:
        x = rng.normal(size=(n, p))
    else:
        x = rng.normal(size=(n, rank_x)) @ rng.normal(size=(rank_x, p))
    x += 3.0  # an offset: every measure is of centered features
    y = x @ rng.normal(size=(p, q)) + 0.7 * rng.normal(size=(n, q))
    return x, y


SHAPES = {
    "p<n": (40, 6, 9, None),
    "p>n": (18, 50, 30, None),
    "rank-deficient": (35, 12, 7, 4),
}


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def features(request):
    n, p, q, rank = SHAPES[request.param]
    return (*_pair(n, p, q, seed=len(request.param), rank_x=rank), request.param)


def grams(x, y):
    return ms.features_gram(x), ms.features_gram(y)


# ------------------------------------------------------------------ agreement


def test_rsa_pearson_and_spearman_match_scipy(features):
    x, y, _ = features
    k, l = grams(x, y)
    assert ms.rsa(k, l) == pytest.approx(ref_rsa(x, y, "pearson"), abs=TOL)
    assert ms.rsa(k, l, method="spearman") == pytest.approx(ref_rsa(x, y, "spearman"), abs=TOL)


def test_rsa_spearman_average_ranks_for_ties():
    """Integer features on a small grid give many equal distances: average ranks, as scipy."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(30, 2)).astype(float)
    y = rng.integers(0, 3, size=(30, 3)).astype(float)
    assert len(np.unique(pdist(x, "sqeuclidean"))) < 10  # the test really has ties
    k, l = grams(x, y)
    assert ms.rsa(k, l, method="spearman") == pytest.approx(ref_rsa(x, y, "spearman"), abs=TOL)


def test_procrustes_matches_scipy_orthogonal_procrustes(features):
    x, y, _ = features
    k, l = grams(x, y)
    expected = ref_procrustes(x, y)
    assert ms.procrustes(k, l) == pytest.approx(expected, abs=TOL)
    assert ms.procrustes_distance(k, l) == pytest.approx(np.arccos(expected), abs=1e-7)
    xc, yc = _centered(x), _centered(y)
    xn, yn = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    width = max(x.shape[1], y.shape[1])
    xn = np.pad(xn, ((0, 0), (0, width - xn.shape[1])))
    yn = np.pad(yn, ((0, 0), (0, width - yn.shape[1])))
    rotation, _ = scipy.linalg.orthogonal_procrustes(xn, yn)
    residual = np.sum((xn @ rotation - yn) ** 2)  # Ding et al.'s squared Procrustes distance
    assert ms.procrustes_distance(k, l, kind="euclidean") == pytest.approx(residual, abs=TOL)


def test_cca_family_matches_qr_canonical_correlations(features):
    x, y, _ = features
    k, l = grams(x, y)
    rho = ref_rho(x, y)
    np.testing.assert_allclose(ms.canonical_correlations(k, l), rho, atol=TOL, rtol=0)
    assert ms.cca(k, l) == pytest.approx(np.mean(rho**2), abs=TOL)
    assert ms.cca(k, l, summary="pillai") == pytest.approx(np.sum(rho**2), abs=TOL)
    assert ms.cca(k, l, summary="mean_rho") == pytest.approx(np.mean(rho), abs=TOL)


def test_canonical_correlations_match_classical_whitened_cca():
    x, y = _pair(50, 5, 8, seed=11)
    rho = ms.canonical_correlations(*grams(x, y))
    np.testing.assert_allclose(rho, ref_rho_whitened(x, y)[:5], atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [(50, 5, 8), (60, 9, 4)])
def test_pwcca_matches_feature_space_weights(shape):
    x, y = _pair(*shape, seed=5)
    assert ms.pwcca(*grams(x, y)) == pytest.approx(ref_pwcca(x, y), abs=TOL)
    assert ms.pwcca(*grams(y, x)) == pytest.approx(ref_pwcca(y, x), abs=TOL)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_svcca_matches_pca_then_cca(features, keep):
    x, y, _ = features
    assert ms.svcca(*grams(x, y), keep=keep) == pytest.approx(ref_svcca(x, y, keep), abs=TOL)


def test_svcca_fixed_number_of_directions():
    x, y = _pair(40, 10, 8, seed=2)

    def top(z, k):
        u, s, _ = np.linalg.svd(_centered(z), full_matrices=False)
        return u[:, :k] * s[:k]

    expected = np.mean(ref_rho(top(x, 3), top(y, 3)))
    assert ms.svcca(*grams(x, y), n_directions=3) == pytest.approx(expected, abs=TOL)


def test_regression_r2_matches_lstsq_both_ways(features):
    x, y, _ = features
    k, l = grams(x, y)
    assert ms.regression_r2(k, l) == pytest.approx(ref_regression(x, y), abs=TOL)
    assert ms.regression_r2(l, k) == pytest.approx(ref_regression(y, x), abs=TOL)


@pytest.mark.parametrize("k_neighbours", [1, 4, 10])
def test_mutual_knn_matches_brute_force(features, k_neighbours):
    x, y, _ = features
    expected = ref_knn(x, y, k_neighbours)
    assert ms.mutual_knn(*grams(x, y), n_neighbors=k_neighbours) == pytest.approx(expected, abs=0)


def test_mutual_knn_ties_go_to_the_lower_index():
    """Duplicated samples tie exactly; both sides must break the tie the same way."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(10, 4))
    x = np.vstack([base, base[:5]])  # samples 10..14 duplicate 0..4
    y = np.vstack([base @ rng.normal(size=(4, 4)), base[:5] @ rng.normal(size=(4, 4))])
    for k in (1, 2, 3):
        assert ms.mutual_knn(*grams(x, y), n_neighbors=k) == pytest.approx(ref_knn(x, y, k), abs=0)


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_from_grams_matches_reference(biased, kernel):
    x, y = _pair(30, 6, 9, seed=4)
    expected = reference.cka(x, y, kernel=kernel, unbiased=not biased)
    k, l = grams(x, y)
    assert ms.cka(k, l, biased=biased, kernel=kernel) == pytest.approx(expected, abs=TOL)


# ------------------------------------------------------------------ invariances and identities


@pytest.mark.parametrize("measure", ms.GRAM_MEASURES)
def test_invariant_to_rotation_scale_and_translation(measure):
    x, y = _pair(30, 6, 9, seed=9)
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    moved = 2.5 * (y @ rotation) + rng.normal(size=9)
    options = ms.MeasureOptions(knn_k=5)
    build = {"spearman": measure == "rsa_spearman", "knn": measure == "knn"}
    a = ms.LayerGeometry.from_gram(ms.features_gram(x), "x", options=options, **build)
    b = ms.LayerGeometry.from_gram(ms.features_gram(y), "y", options=options, **build)
    c = ms.LayerGeometry.from_gram(ms.features_gram(moved), "moved", options=options, **build)
    values = ms.pairwise_measures([a], [b, c], [measure], options)[measure]
    assert np.isfinite(values).all()
    assert values[0, 0] == pytest.approx(values[0, 1], abs=TOL)


@pytest.mark.parametrize("measure", [m for m in ms.GRAM_MEASURES if m != "cca_pillai"])
def test_a_layer_with_itself_scores_one(measure):
    x, _ = _pair(30, 6, 9, seed=10)
    options = ms.MeasureOptions(knn_k=5)
    build = {"spearman": measure == "rsa_spearman", "knn": measure == "knn"}
    a = ms.LayerGeometry.from_gram(ms.features_gram(x), "x", options=options, **build)
    assert ms.pairwise_measures([a], [a], [measure], options)[measure][0, 0] == pytest.approx(
        1.0, abs=TOL
    )


def test_pairwise_measures_equal_the_pure_functions_for_every_layer_pair():
    rng = np.random.default_rng(12)
    layers_a = [rng.normal(size=(25, w)) for w in (3, 8)]
    layers_b = [
        layers_a[0] @ rng.normal(size=(3, 5)) + rng.normal(size=(25, 5)),
        rng.normal(size=(25, 30)),
    ]
    options = ms.MeasureOptions(knn_k=3)
    build = {"spearman": True, "knn": True, "options": options}
    ga = [
        ms.LayerGeometry.from_gram(ms.features_gram(z), f"a{i}", **build)
        for i, z in enumerate(layers_a)
    ]
    gb = [
        ms.LayerGeometry.from_gram(ms.features_gram(z), f"b{i}", **build)
        for i, z in enumerate(layers_b)
    ]
    values = ms.pairwise_measures(ga, gb, ms.GRAM_MEASURES, options)
    pure = {
        "rsa": lambda k, l: ms.rsa(k, l),
        "rsa_spearman": lambda k, l: ms.rsa(k, l, method="spearman"),
        "procrustes": ms.procrustes,
        "cca": ms.cca,
        "cca_pillai": lambda k, l: ms.cca(k, l, summary="pillai"),
        "cca_mean_rho": lambda k, l: ms.cca(k, l, summary="mean_rho"),
        "svcca": ms.svcca,
        "pwcca": ms.pwcca,
        "regression": ms.regression_r2,
        "regression_reverse": lambda k, l: ms.regression_r2(l, k),
        "knn": lambda k, l: ms.mutual_knn(k, l, n_neighbors=3),
    }
    assert set(pure) == set(ms.GRAM_MEASURES)
    for i, x in enumerate(layers_a):
        for j, y in enumerate(layers_b):
            k, l = grams(x, y)
            for name, function in pure.items():
                assert values[name][i, j] == pytest.approx(function(k, l), abs=TOL), (name, i, j)


def test_cca_pillai_of_a_layer_with_itself_is_its_rank():
    x, _ = _pair(30, 9, 2, seed=1, rank_x=4)
    k = ms.features_gram(x)
    assert ms.cca(k, k, summary="pillai") == pytest.approx(4.0, abs=TOL)


# ------------------------------------------------------------------ degenerate input


def test_zero_gram_gives_nan_with_a_warning_naming_the_layer():
    x, _ = _pair(20, 4, 3, seed=0)
    with pytest.warns(DegenerateLayerWarning, match="'dead'"):
        dead = ms.LayerGeometry.from_gram(np.zeros((20, 20)), "dead")
    live = ms.LayerGeometry.from_gram(ms.features_gram(x), "live")
    values = ms.pairwise_measures([dead], [live], ["rsa", "procrustes", "cca", "regression"])
    assert all(np.isnan(v).all() for v in values.values())


def test_nan_in_a_gram_is_refused_naming_the_sample():
    k = ms.features_gram(np.random.default_rng(0).normal(size=(10, 3)))
    k[6, 2] = np.nan
    with pytest.raises(DataError, match="sample 6"):
        ms.procrustes(k, k)


def test_knn_needs_fewer_neighbours_than_samples():
    k = ms.features_gram(np.random.default_rng(0).normal(size=(6, 3)))
    with pytest.raises(ValueError, match="knn_k = 6 .* layer 'k' has 6"):
        ms.mutual_knn(k, k, n_neighbors=6)


def test_knn_of_a_sample_at_the_mean_is_nan_with_a_warning():
    x = np.random.default_rng(0).normal(size=(9, 3))
    x[4] = x[np.arange(9) != 4].mean(axis=0)  # sample 4 is the mean: zero centered vector
    k = ms.features_gram(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert np.isnan(ms.mutual_knn(k, k, n_neighbors=2))
    assert any("sample 4" in str(w.message) for w in caught)


def test_unknown_measure_names_the_known_ones():
    assert ms.parse_measures("cka, rsa,cka") == ["cka", "rsa"]
    with pytest.raises(ValueError, match="'rsaa'.*known measures: cka, rsa"):
        ms.parse_measures(["rsaa"])


def test_public_import_names():
    import ckapipe.measures as public

    assert public.procrustes is ms.procrustes
    assert ckapipe.measures is public
