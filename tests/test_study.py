"""The pairs step (ckapipe.analyze.study, ckapipe analyze): every number against the float64 numpy
references of tests/reference.py, computed here from the stored activations (read with zarr), on
real stores and Gram caches in tmp_path."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from reference import (
    cka_from_terms,
    hsic0,
    hsic1,
    linear_gram,
    minibatch_terms,
    rbf_gram,
    rbf_sigma2,
)

from ckapipe.analyze.cli_study import analyze
from ckapipe.analyze.estimators import DegenerateLayerWarning, MinibatchCKA
from ckapipe.analyze.gram_cache import (
    UnverifiedDatasetWarning,
    merge_gram_caches,
)
from ckapipe.analyze.gram_cache import build_gram_cache as _build_gram_cache
from ckapipe.analyze.study import (
    CSV_COLUMNS,
    StudyError,
    analyze_study,
    csv_path_for,
    load_result,
)
from ckapipe.errors import FormatError, IncompatibleInputsError, IncompleteError, IntegrityError
from ckapipe.formats import WriterLock
from ckapipe.store import ActivationStore, LayerRecord


def build_gram_cache(*args, **kwargs):
    """Caches with exact float64 products and float64 storage: these tests hold the study to the
    float64 reference at 1e-10 and better; the float32 defaults (products and storage) meet
    their own bar (1e-6), tested in test_gram_cache and test_gram_storage."""
    kwargs.setdefault("storage", "float64")
    return _build_gram_cache(*args, precision="float64", **kwargs)


N = 60  # samples
M = 12  # minibatch size: 5 batches


# ---------------------------------------------------------------------- float64 references


def stored(store_path: Path) -> dict[str, np.ndarray]:
    """Every layer of a store as float64, read directly with zarr."""
    group = zarr.open_group(str(store_path), mode="r")
    return {
        name: np.asarray(array[...], dtype=np.float64) for name, array in group["layers"].arrays()
    }


def layer_order(store_path: Path) -> list[str]:
    return [layer["name"] for layer in zarr.open_group(str(store_path), mode="r").attrs["layers"]]


def reference_minibatch(xa: list[np.ndarray], xb: list[np.ndarray], m: int, gram=linear_gram):
    """Per-batch HSIC₁ over contiguous batches of m rows (the epoch-0 partition), and the CKA."""
    blocks = [slice(k * m, (k + 1) * m) for k in range(xa[0].shape[0] // m)]
    hsic, self_a, self_b = minibatch_terms(
        [[x[rows] for x in xa] for rows in blocks], [[y[rows] for y in xb] for rows in blocks], gram
    )
    return cka_from_terms(hsic, self_a, self_b), hsic, self_a, self_b


def reference_full(grams_a: list[np.ndarray], grams_b: list[np.ndarray], hsic) -> np.ndarray:
    out = np.zeros((len(grams_a), len(grams_b)))
    for i, k in enumerate(grams_a):
        for j, l in enumerate(grams_b):  # noqa: E741
            out[i, j] = hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))
    return out


def reference_interval(hsic, self_a, self_b, t_quantile):
    """Delete-one-batch jackknife: CKA ± t · sqrt((B − 1)/B · Σ_b (CKA_(b) − mean)²)."""
    n_batches = hsic.shape[0]
    cka = hsic.sum(0) / np.sqrt(np.outer(self_a.sum(0), self_b.sum(0)))
    deleted = np.empty((n_batches, *hsic.shape[1:]))
    for b in range(n_batches):
        keep = np.delete(np.arange(n_batches), b)
        deleted[b] = hsic[keep].sum(0) / np.sqrt(np.outer(self_a[keep].sum(0), self_b[keep].sum(0)))
    se = np.sqrt((n_batches - 1) / n_batches * ((deleted - deleted.mean(0)) ** 2).sum(0))
    return cka - t_quantile * se, cka + t_quantile * se


# ---------------------------------------------------------------------- fixtures


def write_store(path: Path, data: dict[str, np.ndarray], sample_ids, dtype: str) -> Path:
    layers = [
        LayerRecord(name=name, shape=(x.shape[1],), reduction="flatten", n_features=x.shape[1])
        for name, x in data.items()
    ]
    store = ActivationStore.create(
        path, layers=layers, sample_ids=sample_ids, dtype=dtype, attrs={"model": path.stem}
    )
    # every store here holds the same inputs (row i is dataset item sample_ids[i]): a stand-in
    # for the input fingerprint `ckapipe extract` records, which follows the inputs and their order
    fingerprint = hashlib.sha256(b"study inputs" + np.asarray(sample_ids).tobytes()).hexdigest()
    with store:
        store.write_rows(0, data)
        store.set_rows_complete(len(sample_ids))
        store.mark_complete(input_sha256=fingerprint)
    return path


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """Stores of four models over the same 60 samples (d: same samples, another row order),
    and their Gram caches."""
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, 5))
    sample_ids = rng.permutation(500)[:N]
    models = {
        "a": (
            {
                "a.l0": x @ rng.normal(size=(5, 8)),
                "a.l1": np.maximum(x @ rng.normal(size=(5, 6)), 0),
            },
            "float16",
        ),
        "b": (
            {
                "b.h0": x[:, :3] + 0.3 * rng.normal(size=(N, 3)),
                "b.h1": np.tanh(x @ rng.normal(size=(5, 7))),
                "b.h2": x[:, :1] ** 2 + 2.0,
            },
            "float32",
        ),
        "c": ({"c.z0": rng.normal(size=(N, 4)), "c.z1": rng.normal(size=(N, 9))}, "float32"),
    }
    stores = {
        name: write_store(root / f"{name}.store", data, sample_ids, dtype)
        for name, (data, dtype) in models.items()
    }
    shuffled = rng.permutation(N)
    stores["d"] = write_store(
        root / "d.store",
        {name: values[shuffled] for name, values in models["c"][0].items()},
        sample_ids[shuffled],
        "float32",
    )
    caches = {}
    for name in ("a", "b", "c", "d"):
        caches[name] = build_gram_cache(
            stores[name], root / f"{name}.grams", batch_size=M, device="cpu"
        )
    for name in ("a", "b"):
        caches[f"{name}-one"] = build_gram_cache(
            stores[name], root / f"{name}-one.grams", batch_size=N, device="cpu"
        )
        # float64 tiles: the exact path, checked to 1e-9; 16-row tiles, the last one shorter
        caches[f"{name}-full"] = build_gram_cache(
            stores[name],
            root / f"{name}-full.grams",
            mode="full",
            device="cpu",
            storage="float64",
            tile_size=16,
        )
        caches[f"{name}-rbf"] = build_gram_cache(
            stores[name],
            root / f"{name}-rbf.grams",
            mode="full",
            kernel="rbf",
            threshold=0.8,
            device="cpu",
            storage="float64",
            tile_size=16,
        )
    caches["a-m10"] = build_gram_cache(
        stores["a"], root / "a-m10.grams", batch_size=10, device="cpu"
    )
    for name in ("a", "b"):
        caches[f"{name}-rbfm"] = build_gram_cache(
            stores[name],
            root / f"{name}-rbfm.grams",
            batch_size=M,
            kernel="rbf",
            threshold=1.3,
            device="cpu",
        )
        caches[f"{name}-e2"] = build_gram_cache(
            stores[name], root / f"{name}-e2.grams", batch_size=M, epochs=2, seed=4, device="cpu"
        )
    acts = {name: stored(path) for name, path in stores.items()}
    order = {name: layer_order(path) for name, path in stores.items()}
    return {"root": root, "stores": stores, "caches": caches, "acts": acts, "order": order}


def layers_of(study_dir, model: str) -> list[np.ndarray]:
    return [study_dir["acts"][model][name] for name in study_dir["order"][model]]


def cache_path(study_dir, name: str) -> Path:
    return study_dir["root"] / f"{name}.grams"


# ---------------------------------------------------------------------- minibatch estimator


def test_minibatch_study_matches_per_batch_reference_with_jackknife_interval(study_dir, tmp_path):
    out = tmp_path / "res.zarr"
    study = analyze_study(
        [cache_path(study_dir, n) for n in ("a", "b", "c")],
        out,
        n_bootstrap=300,
        ci_level=0.9,
        seed=3,
        device="cpu",
    )
    assert study.models == ["a", "b", "c"]
    assert list(study.pairs) == [
        ("a", "a"),
        ("a", "b"),
        ("a", "c"),
        ("b", "b"),
        ("b", "c"),
        ("c", "c"),
    ]
    t_quantile = 2.1318467863266495  # scipy.stats.t.ppf(0.95, 4): 5 batches, 90 %
    for (a, b), pair in study.pairs.items():
        cka, hsic, self_a, self_b = reference_minibatch(
            layers_of(study_dir, a), layers_of(study_dir, b), M
        )
        assert pair.layers_a == study_dir["order"][a] and pair.layers_b == study_dir["order"][b]
        np.testing.assert_allclose(pair.cka, cka, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(pair.hsic_per_batch, hsic, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(pair.self_a_per_batch, self_a, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(pair.self_b_per_batch, self_b, rtol=1e-9, atol=1e-12)
        low, high = reference_interval(hsic, self_a, self_b, t_quantile)
        np.testing.assert_allclose(pair.ci_low, low, rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(pair.ci_high, high, rtol=1e-8, atol=1e-11)
        assert not any("interval withheld" in d for d in pair.diagnostics)
        assert pair.p_value is None
    self_pair = study.pair("a", "a")
    assert self_pair.is_self_comparison
    np.testing.assert_allclose(np.diagonal(self_pair.cka), 1.0, rtol=1e-12)
    # (b, a) is served transposed
    np.testing.assert_array_equal(study.pair("b", "a").cka, study.pairs[("a", "b")].cka.T)


def test_minibatch_rbf_matches_per_batch_reference(study_dir, tmp_path):
    study = analyze_study(
        [cache_path(study_dir, "a-rbfm"), cache_path(study_dir, "b-rbfm")],
        tmp_path / "rbfm.zarr",
        names=["a", "b"],
        pairs="a:b",
        n_bootstrap=0,
        device="cpu",
    )
    xa, xb = layers_of(study_dir, "a"), layers_of(study_dir, "b")
    # bandwidth per batch
    expected = reference_minibatch(xa, xb, M, gram=lambda x: rbf_gram(x, 1.3))[0]
    np.testing.assert_allclose(study.pair("a", "b").cka, expected, rtol=1e-9)
    assert study.provenance["kernel"] == "rbf" and study.provenance["threshold"] == 1.3
    assert "bandwidth_rule" in study.provenance


def test_two_epochs_use_the_recorded_permutation_and_warn_about_intervals(study_dir, tmp_path):
    study = analyze_study(
        [cache_path(study_dir, "a-e2"), cache_path(study_dir, "b-e2")],
        tmp_path / "e2.zarr",
        names=["a", "b"],
        pairs="a:b",
        n_bootstrap=20,
        device="cpu",
    )
    # documented partition: epoch 1 orders the rows by default_rng(epoch_seeds[1]).permutation(n)
    seeds = zarr.open_group(str(cache_path(study_dir, "a-e2")), mode="r").attrs["epoch_seeds"]
    order = np.random.default_rng(seeds[1]).permutation(N)
    xa, xb = layers_of(study_dir, "a"), layers_of(study_dir, "b")
    first = reference_minibatch(xa, xb, M)
    second = reference_minibatch([x[order] for x in xa], [y[order] for y in xb], M)
    hsic = np.concatenate([first[1], second[1]])
    self_a = np.concatenate([first[2], second[2]])
    self_b = np.concatenate([first[3], second[3]])
    pair = study.pair("a", "b")
    np.testing.assert_allclose(pair.hsic_per_batch, hsic, rtol=1e-9, atol=1e-12)
    expected = hsic.sum(0) / np.sqrt(np.outer(self_a.sum(0), self_b.sum(0)))
    np.testing.assert_allclose(pair.cka, expected, rtol=1e-9)
    assert any("2 epochs" in d and "too narrow" in d for d in pair.diagnostics)


def test_one_batch_of_all_samples_equals_exact_hsic1_cka(study_dir, tmp_path):
    study = analyze_study(
        [cache_path(study_dir, "a-one"), cache_path(study_dir, "b-one")],
        tmp_path / "one.zarr",
        pairs=[("a-one", "b-one")],
        device="cpu",
    )
    grams_a = [x @ x.T for x in layers_of(study_dir, "a")]
    grams_b = [y @ y.T for y in layers_of(study_dir, "b")]
    pair = study.pair("a-one", "b-one")
    np.testing.assert_allclose(pair.cka, reference_full(grams_a, grams_b, hsic1), rtol=1e-9)
    assert np.isnan(pair.ci_low).all() and np.isnan(pair.ci_high).all()
    assert any(d.startswith("interval withheld: 1 batches < 4") for d in pair.diagnostics)


def test_permutation_p_values_match_reference_and_separate_dependence(study_dir, tmp_path):
    n_perm, seed = 39, 11
    study = analyze_study(
        [cache_path(study_dir, n) for n in ("a", "b", "c")],
        tmp_path / "perm.zarr",
        pairs=[("a", "b"), ("a", "c")],
        n_bootstrap=0,
        n_permutations=n_perm,
        seed=seed,
        device="cpu",
    )
    for a, b in (("a", "b"), ("a", "c")):
        xa, xb = layers_of(study_dir, a), layers_of(study_dir, b)
        observed = reference_minibatch(xa, xb, M)[0]
        null_cross = np.zeros((n_perm, len(xa), len(xb)))
        self_a = np.zeros(len(xa))
        self_b = np.zeros(len(xb))
        for k in range(N // M):
            rows = np.arange(k * M, (k + 1) * M)
            # documented: batch k permutes model b's samples with default_rng([seed, k])
            perms = np.argsort(np.random.default_rng([seed, k]).random((n_perm, M)), axis=1)
            ka = [x[rows] @ x[rows].T for x in xa]
            for i, gi in enumerate(ka):
                self_a[i] += hsic1(gi, gi)
            for j, y in enumerate(xb):
                yk = y[rows]
                self_b[j] += hsic1(yk @ yk.T, yk @ yk.T)
                for r in range(n_perm):
                    yp = yk[perms[r]]
                    for i, gi in enumerate(ka):
                        null_cross[r, i, j] += hsic1(gi, yp @ yp.T)
        null = null_cross / np.sqrt(np.outer(self_a, self_b))
        expected = (1 + (null >= observed).sum(0)) / (1 + n_perm)
        pair = study.pair(a, b)
        np.testing.assert_allclose(pair.p_value, expected, rtol=0, atol=0)
        assert np.isnan(pair.ci_low).all()
    dependent = study.pair("a", "b").p_value
    assert dependent[0, 0] == 1 / (n_perm + 1)  # a.l0 and b.h0 share the same 3 directions


def test_permutation_p_values_are_not_small_for_independent_layers(study_dir, tmp_path):
    """40 layer pairs that are independent by construction: the p-values spread over (0, 1]."""
    rng = np.random.default_rng(5)
    sample_ids = zarr.open_group(str(study_dir["stores"]["a"]), mode="r")["sample_ids"][...]
    noise = {f"noise.{i}": rng.normal(size=(N, 2)) for i in range(20)}
    store = write_store(tmp_path / "noise.store", noise, sample_ids, "float32")
    build_gram_cache(store, tmp_path / "noise.grams", batch_size=M, device="cpu")
    n_perm = 99
    study = analyze_study(
        [cache_path(study_dir, "a"), tmp_path / "noise.grams"],
        tmp_path / "noise.zarr",
        pairs=[("a", "noise")],
        n_bootstrap=0,
        n_permutations=n_perm,
        device="cpu",
    )
    p = study.pair("a", "noise").p_value.ravel()
    assert p.size == 40
    assert 0.35 < p.mean() < 0.65
    # under independence P(p <= 0.1) <= 0.1: allow three binomial standard errors
    assert (p <= 0.1).mean() <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / p.size)
    assert (p == 1 / (n_perm + 1)).sum() <= 2


def test_degenerate_layer_is_a_named_diagnostic_with_nan_not_clamped(study_dir, tmp_path):
    store = write_store(
        tmp_path / "dead.store",
        {"dead.const": np.full((N, 3), 2.5), "dead.live": study_dir["acts"]["a"]["a.l0"][:, :4]},
        zarr.open_group(str(study_dir["stores"]["a"]), mode="r")["sample_ids"][...],
        "float32",
    )
    build_gram_cache(store, tmp_path / "dead.grams", batch_size=M, device="cpu")
    with pytest.warns(DegenerateLayerWarning, match="dead.const"):
        study = analyze_study(
            [cache_path(study_dir, "a"), tmp_path / "dead.grams"],
            tmp_path / "dead.zarr",
            pairs=[("a", "dead")],
            n_bootstrap=50,
            device="cpu",
        )
    pair = study.pair("a", "dead")
    assert np.isnan(pair.cka[:, 0]).all() and np.isnan(pair.ci_low[:, 0]).all()
    assert np.isfinite(pair.cka[:, 1]).all()
    assert any("'dead.const'" in d and "self-HSIC is 0" in d for d in pair.diagnostics)
    assert load_result(tmp_path / "dead.zarr").pair("a", "dead").diagnostics == pair.diagnostics


# ---------------------------------------------------------------------- full mode


@pytest.mark.parametrize(("estimator", "hsic"), [("debiased", hsic1), ("biased", hsic0)])
def test_full_mode_matches_exact_reference(study_dir, tmp_path, estimator, hsic):
    study = analyze_study(
        [cache_path(study_dir, "a-full"), cache_path(study_dir, "b-full")],
        tmp_path / f"{estimator}.zarr",
        names=["a", "b"],
        estimator=estimator,
        device="cpu",
    )
    for a, b in (("a", "a"), ("a", "b"), ("b", "b")):
        grams_a = [x @ x.T for x in layers_of(study_dir, a)]
        grams_b = [y @ y.T for y in layers_of(study_dir, b)]
        pair = study.pair(a, b)
        np.testing.assert_allclose(pair.cka, reference_full(grams_a, grams_b, hsic), rtol=1e-9)
        exact = np.array([[hsic(k, l) for l in grams_b] for k in grams_a])  # noqa: E741
        np.testing.assert_allclose(pair.hsic_per_batch, exact[None], rtol=1e-9)
        np.testing.assert_allclose(
            pair.self_a_per_batch[0], [hsic(k, k) for k in grams_a], rtol=1e-9
        )
        assert np.isnan(pair.ci_low).all()
        assert any("full mode" in d for d in pair.diagnostics)
    assert study.provenance["estimator"] == estimator and study.provenance["kernel"] == "linear"


def test_full_mode_debiased_interval_is_the_block_jackknife(study_dir, tmp_path, monkeypatch):
    """The study's full-mode interval equals a delete-one-block jackknife recomputed here from
    the stored activations (5 blocks: the 60 samples are too few for the default 16)."""
    import ckapipe.analyze.full_pairs as full_pairs_module
    from ckapipe.analyze.intervals import FullBlockJackknife, sample_blocks, student_t_quantile

    monkeypatch.setattr(
        full_pairs_module,
        "FullBlockJackknife",
        lambda n, n_layers: FullBlockJackknife(n, n_layers, n_blocks=5),
    )
    study = analyze_study(
        [cache_path(study_dir, "a-full"), cache_path(study_dir, "b-full")],
        tmp_path / "jack.zarr",
        names=["a", "b"],
        pairs="a:b",
        estimator="debiased",
        ci_level=0.9,
        device="cpu",
    )
    pair = study.pair("a", "b")
    labels = sample_blocks(N, 5, seed=0)
    xa, xb = layers_of(study_dir, "a"), layers_of(study_dir, "b")
    half = student_t_quantile(0.95, 4)
    for i, x in enumerate(xa):
        for j, y in enumerate(xb):
            deleted = []
            for g in range(5):
                keep = labels != g
                k, l = x[keep] @ x[keep].T, y[keep] @ y[keep].T  # noqa: E741
                deleted.append(hsic1(k, l) / math.sqrt(hsic1(k, k) * hsic1(l, l)))
            deleted = np.array(deleted)
            se = math.sqrt(4 / 5 * ((deleted - deleted.mean()) ** 2).sum())
            assert pair.ci_low[i, j] == pytest.approx(pair.cka[i, j] - half * se, rel=1e-8)
            assert pair.ci_high[i, j] == pytest.approx(pair.cka[i, j] + half * se, rel=1e-8)
    assert not any("interval withheld" in d for d in pair.diagnostics)


@pytest.mark.parametrize(("estimator", "hsic"), [("debiased", hsic1), ("biased", hsic0)])
def test_full_mode_rbf_matches_reference_and_records_bandwidth(
    study_dir, tmp_path, estimator, hsic
):
    study = analyze_study(
        [cache_path(study_dir, "a-rbf"), cache_path(study_dir, "b-rbf")],
        tmp_path / "rbf.zarr",
        names=["a", "b"],
        estimator=estimator,
        pairs="a:b",
        device="cpu",
    )
    assert study.provenance["kernel"] == "rbf" and study.provenance["threshold"] == 0.8
    # RBF Grams are not centered (unlike the cached linear ones): this exercises the centering
    grams_a = [rbf_gram(x, 0.8) for x in layers_of(study_dir, "a")]
    grams_b = [rbf_gram(y, 0.8) for y in layers_of(study_dir, "b")]
    pair = study.pair("a", "b")
    np.testing.assert_allclose(pair.cka, reference_full(grams_a, grams_b, hsic), rtol=1e-9)
    exact = np.array([[hsic(k, l) for l in grams_b] for k in grams_a])  # noqa: E741
    np.testing.assert_allclose(pair.hsic_per_batch[0], exact, rtol=1e-9)
    sigma2 = study.provenance["models"]["a"]["rbf_sigma2"]
    for name, x in zip(study_dir["order"]["a"], layers_of(study_dir, "a"), strict=True):
        assert sigma2[name] == pytest.approx(rbf_sigma2(x, 0.8), rel=1e-9)
    assert "median" in study.provenance["bandwidth_rule"]


@pytest.mark.parametrize("tile_size", [7, N])
def test_full_mode_tile_size_does_not_change_the_result(
    study_dir, tmp_path, monkeypatch, tile_size
):
    """Tiles of 7 rows (9 tile rows, the last one of 4) and one tile of all 60 rows give the
    fixture's 16-row result, with its jackknife interval (5 blocks), up to summation order."""
    import ckapipe.analyze.full_pairs as full_pairs_module
    from ckapipe.analyze.intervals import FullBlockJackknife

    monkeypatch.setattr(
        full_pairs_module,
        "FullBlockJackknife",
        lambda n, n_layers: FullBlockJackknife(n, n_layers, n_blocks=5),
    )
    stores = {name: study_dir["root"] / f"{name}.store" for name in ("a", "b")}
    tiled = [
        build_gram_cache(
            stores[name],
            tmp_path / f"{name}.grams",
            mode="full",
            device="cpu",
            storage="float64",
            tile_size=tile_size,
        ).path
        for name in ("a", "b")
    ]
    caches = [cache_path(study_dir, "a-full"), cache_path(study_dir, "b-full")]
    options = {"estimator": "debiased", "device": "cpu", "ci_level": 0.9, "names": ["a", "b"]}
    whole = analyze_study(caches, tmp_path / "whole.zarr", **options)
    other = analyze_study(tiled, tmp_path / "tiled.zarr", **options)
    for key, pair in whole.pairs.items():
        np.testing.assert_allclose(other.pairs[key].cka, pair.cka, rtol=1e-12)
        np.testing.assert_allclose(other.pairs[key].ci_low, pair.ci_low, rtol=1e-10)
        np.testing.assert_allclose(other.pairs[key].ci_high, pair.ci_high, rtol=1e-10)
        assert np.isfinite(pair.ci_low).all()


# ---------------------------------------------------------------------- refusals


def test_different_sample_order_is_refused_naming_the_models(study_dir, tmp_path):
    with pytest.raises(StudyError, match=r"model 'd': sample order differs from model 'c'.*--seed"):
        analyze_study(
            [cache_path(study_dir, "c"), cache_path(study_dir, "d")],
            tmp_path / "x.zarr",
            device="cpu",
        )
    assert not (tmp_path / "x.zarr").exists()


def test_other_mismatches_are_refused(study_dir, tmp_path):
    with pytest.raises(
        StudyError, match=r"model 'a-m10': minibatch partition differs.*batch size 10 vs 12"
    ):
        analyze_study(
            [cache_path(study_dir, "b"), cache_path(study_dir, "a-m10")], tmp_path / "1.zarr"
        )
    with pytest.raises(StudyError, match="mode 'full' differs"):
        analyze_study(
            [cache_path(study_dir, "b"), cache_path(study_dir, "a-full")], tmp_path / "2.zarr"
        )
    with pytest.raises(StudyError, match=r"model 'b-rbf': kernel 'rbf' \(threshold 0.8\) differs"):
        analyze_study(
            [cache_path(study_dir, "a-full"), cache_path(study_dir, "b-rbf")], tmp_path / "0.zarr"
        )
    with pytest.raises(StudyError, match="needs full-mode Gram caches"):
        analyze_study([cache_path(study_dir, "a")], tmp_path / "3.zarr", estimator="debiased")
    with pytest.raises(StudyError, match="permutation p-values need minibatch"):
        analyze_study(
            [cache_path(study_dir, "a-full")],
            tmp_path / "4.zarr",
            estimator="biased",
            n_permutations=10,
        )
    with pytest.raises(StudyError, match="kernel 'rbf' needs caches built"):
        analyze_study([cache_path(study_dir, "a")], tmp_path / "5.zarr", kernel="rbf")
    with pytest.raises(StudyError, match=r"unique.*\['x'\]"):
        analyze_study(
            [cache_path(study_dir, "a"), cache_path(study_dir, "b")],
            tmp_path / "6.zarr",
            names=["x", "x"],
        )
    with pytest.raises(StudyError, match="unknown model 'z'"):
        analyze_study(
            [cache_path(study_dir, "a"), cache_path(study_dir, "b")],
            tmp_path / "7.zarr",
            pairs=[("a", "z")],
        )
    with pytest.raises(StudyError, match="requested twice"):
        analyze_study(
            [cache_path(study_dir, "a"), cache_path(study_dir, "b")],
            tmp_path / "8.zarr",
            pairs="a:b,b:a",
        )
    # nothing written; only the writers' lock files stay (see ckapipe.formats.WriterLock)
    assert all(p.name.startswith(".") and p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_pairs_all_without_self_comparisons(study_dir, tmp_path):
    caches = [cache_path(study_dir, n) for n in ("a", "b", "c")]
    study = analyze_study(caches, tmp_path / "x.zarr", include_self=False, n_bootstrap=0)
    assert list(study.pairs) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert load_result(tmp_path / "x.zarr").provenance["pairs"] == [
        ["a", "b"],
        ["a", "c"],
        ["b", "c"],
    ]
    with pytest.raises(StudyError, match="no pairs to compare"):
        analyze_study(caches[:1], tmp_path / "y.zarr", include_self=False)


def test_existing_output_is_refused_unless_overwrite(study_dir, tmp_path):
    out = tmp_path / "res.zarr"
    caches = [cache_path(study_dir, "a"), cache_path(study_dir, "b")]
    analyze_study(caches, out, n_bootstrap=10, device="cpu")
    with pytest.raises(StudyError, match="already exists"):
        analyze_study(caches, out, n_bootstrap=10, device="cpu")
    again = analyze_study(caches, out, n_bootstrap=10, seed=1, device="cpu", overwrite=True)
    assert load_result(out).provenance["seed"] == 1 == again.provenance["seed"]
    other = tmp_path / "notmine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(StudyError, match="not a ckapipe CKA result"):
        analyze_study(caches, other, device="cpu", overwrite=True)
    assert (other / "keep.txt").exists()


# ---------------------------------------------------------------------- result format


def test_result_round_trip_csv_and_format(study_dir, tmp_path):
    out = tmp_path / "study.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no degenerate layers here: nothing may warn
        study = analyze_study(
            [cache_path(study_dir, n) for n in ("a", "b")],
            out,
            n_bootstrap=100,
            n_permutations=9,
            device="cpu",
        )
    loaded = load_result(out)
    assert loaded.models == study.models == ["a", "b"]
    assert list(loaded.pairs) == list(study.pairs)
    for key, pair in study.pairs.items():
        got = loaded.pairs[key]
        for field in (
            "cka",
            "ci_low",
            "ci_high",
            "p_value",
            "hsic_per_batch",
            "self_a_per_batch",
            "self_b_per_batch",
        ):
            np.testing.assert_array_equal(getattr(got, field), getattr(pair, field))
        assert (got.model_a, got.model_b, got.layers_a, got.layers_b, got.diagnostics) == (
            pair.model_a,
            pair.model_b,
            pair.layers_a,
            pair.layers_b,
            pair.diagnostics,
        )

    root = zarr.open_group(str(out), mode="r")
    attrs = dict(root.attrs)
    assert attrs["format"] == "ckapipe.cka-result" and attrs["format_version"] == 2
    assert attrs["complete"] is True and list(attrs)[-1] == "complete"
    for key in (
        "estimator",
        "kernel",
        "ci_level",
        "n_bootstrap",
        "n_permutations",
        "seed",
        "partition",
        "versions",
        "created",
    ):
        assert key in attrs, key
    model_a = attrs["models"]["a"]
    assert model_a["store"] == str(study_dir["stores"]["a"])
    assert model_a["gram_cache"] == str(cache_path(study_dir, "a"))
    assert model_a["identity"]["sample_ids_sha256"] and model_a["layers"] == ["a.l0", "a.l1"]
    assert attrs["partition"]["batch_size"] == M
    # one padded array per quantity over all pairs, with named dimensions
    assert attrs["pairs"] == [["a", "a"], ["a", "b"], ["b", "b"]]
    assert [info["n_layers_b"] for info in attrs["pair_info"]] == [2, 3, 3]
    assert root["cka"].shape == (3, 3, 3)
    for name in ("cka", "ci_low", "ci_high", "p_value"):
        assert root[name].metadata.dimension_names == ("pair", "layer_a", "layer_b")
    assert root["hsic_per_batch"].metadata.dimension_names == (
        "pair",
        "batch",
        "layer_a",
        "layer_b",
    )
    assert root["self_a_per_batch"].metadata.dimension_names == ("pair", "batch", "layer_a")
    assert root["layer_name_b"][1].tolist() == ["b.h0", "b.h1", "b.h2"]
    assert root["layer_name_b"][0].tolist() == ["a.l0", "a.l1", ""]  # padding
    assert np.isnan(root["cka"][0, :, 2]).all()
    assert root["batch"][:].tolist() == attrs["batches"]

    with csv_path_for(out).open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 2 * 2 + 2 * 3 + 3 * 3
    assert hashlib.sha256(csv_path_for(out).read_bytes()).hexdigest() == attrs["csv"]["sha256"]
    for row in rows:
        pair = loaded.pair(row["model_a"], row["model_b"])
        i = pair.layers_a.index(row["layer_a"])
        j = pair.layers_b.index(row["layer_b"])
        for column in ("cka", "ci_low", "ci_high", "p_value"):
            assert float(row[column]) == getattr(pair, column)[i, j], (row, column)
        assert (row["estimator"], row["kernel"]) == ("minibatch", "linear")
        # too few permutations for p <= 0.05 give an infinite threshold, not a made-up one
        assert float(row["null_threshold"]) == pair.null_threshold[i, j]
        assert (row["n_samples"], row["batch_size"], row["samples_used"]) == (
            str(N),
            str(M),
            str(N),
        )
        assert (row["n_batches"], row["interval_method"]) == (
            str(N // M),
            f"jackknife over {N // M} batches, t quantile on {N // M - 1} df",
        )
        assert row["interval_note"] == ""


def test_xarray_reads_a_result_with_labels_and_no_ckapipe(study_dir, tmp_path):
    out = tmp_path / "x.zarr"
    study = analyze_study(
        [cache_path(study_dir, n) for n in ("a", "b")], out, n_bootstrap=20, device="cpu"
    )
    script = f"""
import sys, xarray
ds = xarray.open_zarr({str(out)!r}, consolidated=False)
assert "ckapipe" not in sys.modules
cka = ds["cka"].sel(pair="a--b")
print(ds["cka"].dims, ds["hsic_per_batch"].dims)
print(str(cka["model_a"].values), str(cka["model_b"].values))
print(",".join(str(v) for v in cka["layer_name_b"].values))
print(repr(float(cka.values[1, 2])))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "('pair', 'layer_a', 'layer_b') ('pair', 'batch', 'layer_a', 'layer_b')"
    assert lines[1] == "a b"
    assert lines[2] == "b.h0,b.h1,b.h2"
    assert float(lines[3]) == study.pair("a", "b").cka[1, 2]


def test_load_result_refuses_incomplete_foreign_old_and_damaged(study_dir, tmp_path):
    out = tmp_path / "r.zarr"
    analyze_study([cache_path(study_dir, "a")], out, n_bootstrap=10, device="cpu")
    load_result(out)
    (out / "cka" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(
        IntegrityError, match=r"array 'cka' is missing 1 chunk file.*ckapipe verify"
    ):
        load_result(out)
    zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    with pytest.raises(IncompleteError, match="incomplete"):
        load_result(out)
    zarr.open_group(str(out), mode="r+").attrs["format_version"] = 1
    with pytest.raises(FormatError, match=r"version 1.*re-run `ckapipe analyze`"):
        load_result(out)
    with pytest.raises(FormatError, match="not a ckapipe CKA result"):
        load_result(cache_path(study_dir, "a"))
    with pytest.raises(FormatError, match="no zarr.json"):
        load_result(tmp_path / "missing.zarr")


def test_a_csv_that_does_not_belong_to_the_result_is_rewritten(study_dir, tmp_path):
    caches = [cache_path(study_dir, n) for n in ("a", "b")]
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    analyze_study(caches, old, n_bootstrap=10, seed=1, ci_level=0.9, device="cpu")
    analyze_study(caches, new, n_bootstrap=10, seed=2, ci_level=0.95, device="cpu")
    good = csv_path_for(new).read_bytes()
    # the state a writer killed between placing the CSV and the group would leave
    shutil.copyfile(csv_path_for(old), csv_path_for(new))
    with pytest.warns(UserWarning, match="did not belong to"):
        load_result(new)
    assert csv_path_for(new).read_bytes() == good
    csv_path_for(new).unlink()
    with pytest.warns(UserWarning, match="did not belong to"):
        load_result(new)
    assert csv_path_for(new).read_bytes() == good
    # a group changed after writing no longer gives back its recorded CSV: damage, not repair
    group = zarr.open_group(str(new), mode="r+")
    group["cka"][0, 0, 0] = 0.5
    csv_path_for(new).write_text("x\n")
    with pytest.raises(IntegrityError, match="modified after writing"):
        load_result(new)


# ---------------------------------------------------------------------- CLI


def test_cli_analyze_writes_result_and_prints_summary(study_dir, tmp_path):
    out = tmp_path / "cli.zarr"
    runner = CliRunner()
    result = runner.invoke(
        analyze,
        [
            str(cache_path(study_dir, "a")),
            str(cache_path(study_dir, "c")),
            "--out",
            str(out),
            "--names",
            "first,second",
            "--pairs",
            "first:second,second:second",
            "--bootstrap",
            "50",
            "--seed",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "first : second" in result.output and "second : second" in result.output
    assert str(csv_path_for(out)) in result.output
    loaded = load_result(out)
    assert list(loaded.pairs) == [("first", "second"), ("second", "second")]
    with csv_path_for(out).open() as handle:
        assert {row["p_value"] for row in csv.DictReader(handle)} == {""}  # none computed
    cka = reference_minibatch(layers_of(study_dir, "a"), layers_of(study_dir, "c"), M)[0]
    np.testing.assert_allclose(loaded.pair("first", "second").cka, cka, rtol=1e-9)

    refused = runner.invoke(
        analyze,
        [
            str(cache_path(study_dir, "c")),
            str(cache_path(study_dir, "d")),
            "--out",
            str(tmp_path / "bad.zarr"),
        ],
    )
    assert refused.exit_code == 1
    assert "sample order differs" in refused.output
    bad_pairs = runner.invoke(
        analyze,
        [str(cache_path(study_dir, "a")), "--out", str(tmp_path / "p.zarr"), "--pairs", "a-b"],
    )
    assert bad_pairs.exit_code == 2 and "model_a:model_b" in bad_pairs.output


def test_cli_analyze_summary_shows_intervals_null_thresholds_and_batch_advice(study_dir, tmp_path):
    runner = CliRunner()
    reported = runner.invoke(
        analyze,
        [str(cache_path(study_dir, "a")), str(cache_path(study_dir, "b")), "--names", "a,b",
         "--permutations", "20", "--device", "cpu", "--out", str(tmp_path / "r.zarr")],
    )  # fmt: skip
    assert reported.exit_code == 0, reported.output
    assert "95% CI half-width" in reported.output and "jackknife over 5 batches" in reported.output
    assert "null" in reported.output.splitlines()[0]  # the null threshold column
    assert "Warning" not in reported.output
    one_batch = [str(cache_path(study_dir, "a-one")), "--device", "cpu"]
    withheld = runner.invoke(analyze, [*one_batch, "--out", str(tmp_path / "w.zarr")])
    assert withheld.exit_code == 0, withheld.output
    assert "interval withheld: 1 batches < 4 needed" in withheld.output
    # the largest m that splits n = 60 into 4 whole batches
    assert "Warning:" in withheld.output and "--batch-size 15 or smaller" in withheld.output
    bad = runner.invoke(
        analyze, [*one_batch, "--out", str(tmp_path / "x"), "--interval-method", "x"]
    )
    assert bad.exit_code == 2 and "--interval-method" in bad.output


def test_declared_architectures_travel_with_the_result_to_plot(study_dir, tmp_path):
    from ckapipe.analyze.cli_plot import plot as plot_command
    from ckapipe.analyze.plots import correspondence_groups

    runner = CliRunner()
    # one cache twice: two models of one factory and one layer list, which only their declared
    # architectures set apart
    caches = [str(cache_path(study_dir, n)) for n in ("a", "a", "b")]
    out = tmp_path / "r.zarr"
    run = runner.invoke(
        analyze,
        [*caches, "--names", "a1,a2,b", "--architecture", "a1=x", "--architecture", "a2=y",
         "--device", "cpu", "--out", str(out)],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    result = load_result(out)
    assert result.provenance["architectures"] == {"a1": "x", "a2": "y"}
    # a bare `plot` reads the recorded names: a1 and a2 are not one architecture, no curves
    assert correspondence_groups(result) == {}
    bare = runner.invoke(plot_command, [str(out), "--out", str(tmp_path / "bare"), "--dpi", "30"])
    assert bare.exit_code == 0, bare.output
    assert not (tmp_path / "bare" / "correspondence.png").exists()
    # an explicit --architecture on plot still wins over the recorded one
    joined = runner.invoke(
        plot_command,
        [str(out), "--out", str(tmp_path / "joined"), "--dpi", "30", "--architecture", "a2=x"],
    )
    assert joined.exit_code == 0, joined.output
    assert (tmp_path / "joined" / "correspondence.png").is_file()
    groups = correspondence_groups(result, {"a2": "x"})
    assert [(p.model_a, p.model_b) for p in groups["x"]] == [("a1", "a2")]
    # an unknown model is refused before anything is computed or written
    unknown = runner.invoke(
        analyze,
        [*caches, "--names", "a1,a2,b", "--architecture", "zz=x", "--device", "cpu",
         "--out", str(tmp_path / "u.zarr")],
    )  # fmt: skip
    assert unknown.exit_code != 0
    assert "model(s) zz that the study does not have" in unknown.output
    assert not (tmp_path / "u.zarr").exists()


def test_results_without_recorded_architectures_still_load_and_plot(study_dir, tmp_path):
    from ckapipe.analyze.architecture_summary import (
        architectures_from_provenance,
        recorded_architectures,
    )

    out = tmp_path / "old.zarr"
    caches = [cache_path(study_dir, n) for n in ("c", "a")]
    analyze_study(caches, out, names=["c", "d"], device="cpu", architectures={"c": "x"})
    # a result written before architectures were recorded: the attribute is absent
    root = zarr.open_group(str(out), mode="r+")
    attrs = dict(root.attrs)
    del attrs["architectures"]
    root.attrs.clear()
    root.attrs.update(attrs)
    result = load_result(out)
    assert "architectures" not in result.provenance
    assert recorded_architectures(result) == {}
    # the factory (not recorded in these hand-made stores) is the fallback
    assert architectures_from_provenance(result) == {"c": None, "d": None}
    assert architectures_from_provenance(result, {"d": "y"}) == {"c": None, "d": "y"}
    with pytest.raises(StudyError, match="architecture of model 'c' must be a non-empty name"):
        analyze_study(caches, tmp_path / "e.zarr", names=["c", "d"], architectures={"c": " "})


# ---------------------------------------------------------------------- one writer, killed writers


def _analyze_process(study_dir, out: Path, seed: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "ckapipe.cli", "analyze"]
    command += [str(cache_path(study_dir, n)) for n in ("a", "b", "c")]
    command += ["--out", str(out), "--overwrite", "--seed", str(seed), "--device", "cpu"]
    command += ["--bootstrap", "2000", "--permutations", "50"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(process: subprocess.Popen, lock: Path) -> bool:
    """Poll until ``process`` holds the writer lock; False if it ended first."""
    while not WriterLock.is_held(lock):
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.slow
def test_a_second_writer_of_the_same_result_is_refused_at_once(study_dir, tmp_path):
    out = tmp_path / "shared.zarr"
    lock = tmp_path / ".shared.zarr.lock"
    for _ in range(5):
        first = _analyze_process(study_dir, out, seed=1)
        if _wait_for_lock(first, lock):
            break
        first.communicate()
    else:
        pytest.fail("the first writer never held the lock long enough to be seen")
    # frozen while it holds the lock: the second writer meets a live writer, deterministically
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _analyze_process(study_dir, out, seed=2)
        _, err = second.communicate(timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"being written by another process (pid {first.pid})" in lines[0]
    assert first.wait(timeout=120) == 0, first.communicate()[1]
    assert load_result(out).provenance["seed"] == 1


@pytest.mark.slow
def test_a_killed_overwrite_leaves_the_old_or_the_new_result_with_its_csv(study_dir, tmp_path):
    out = tmp_path / "killed.zarr"
    lock = tmp_path / ".killed.zarr.lock"
    analyze_study([cache_path(study_dir, n) for n in "abc"], out, n_bootstrap=10, device="cpu")
    # how long a writer holds the lock, so the kills below fall all over that time
    whole = _analyze_process(study_dir, out, seed=1)
    assert _wait_for_lock(whole, lock)
    start = time.perf_counter()
    assert whole.wait(timeout=120) == 0
    held = time.perf_counter() - start
    seeds = {1}
    rng = np.random.default_rng(0)
    outcomes = []
    for seed in range(2, 7):
        writer = _analyze_process(study_dir, out, seed=seed)
        if _wait_for_lock(writer, lock):
            time.sleep(rng.uniform(0, held))
            writer.kill()
        writer.communicate()
        outcomes.append(writer.returncode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a CSV rewritten from its group warns
            result = load_result(out)
        assert result.provenance["seed"] in seeds | {seed}, (seed, result.provenance["seed"])
        seeds.add(result.provenance["seed"])
        recorded = result.provenance["csv"]["sha256"]
        assert hashlib.sha256(csv_path_for(out).read_bytes()).hexdigest() == recorded
    assert -signal.SIGKILL in outcomes, outcomes  # at least one run was killed mid-way


# ---------------------------------------------------------------------- every sample, one rule


@pytest.mark.parametrize(("m", "epochs"), [(100, 2), (200, 1)])
def test_analyze_equals_minibatch_cka_over_every_row_short_last_batch_included(tmp_path, m, epochs):
    # 512 rows: m = 100 leaves a last batch of 12 rows, m = 200 one of 112 (22 % of the samples)
    n = 512
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, 6))
    data = {
        "p": {"p0": x @ rng.normal(size=(6, 9)), "p1": np.tanh(x @ rng.normal(size=(6, 5)))},
        "q": {"q0": x[:, :2] + 0.5 * rng.normal(size=(n, 2)), "q1": rng.normal(size=(n, 7))},
    }
    ids = np.arange(n)
    caches = [
        build_gram_cache(
            write_store(tmp_path / f"{name}.store", layers, ids, "float32"),
            tmp_path / f"{name}.grams",
            batch_size=m,
            epochs=epochs,
            seed=5,
            device="cpu",
        )
        for name, layers in data.items()
    ]
    study = analyze_study(caches, tmp_path / "r.zarr", n_bootstrap=0, device="cpu")
    # the float64 reference: MinibatchCKA fed the same rows, batch by batch, in float64
    values = {
        name: {k: np.asarray(v.astype(np.float32), dtype=np.float64) for k, v in layers.items()}
        for name, layers in data.items()
    }
    reference = MinibatchCKA(["p0", "p1"], ["q0", "q1"])
    whole_batches_only = MinibatchCKA(["p0", "p1"], ["q0", "q1"])
    seeds = caches[0].partition["epoch_seeds"]
    for epoch in range(epochs):
        order = np.arange(n) if epoch == 0 else np.random.default_rng(seeds[epoch]).permutation(n)
        for start in range(0, n, m):
            rows = order[start : start + m]
            batch_a = {k: v[rows] for k, v in values["p"].items()}
            batch_b = {k: v[rows] for k, v in values["q"].items()}
            reference.update(batch_a, batch_b)
            if len(rows) == m:
                whole_batches_only.update(batch_a, batch_b)
    pair = study.pair("p", "q")
    assert np.abs(pair.cka - reference.compute()).max() <= 1e-12
    assert pair.hsic_per_batch.shape[0] == reference.n_batches == epochs * -(-n // m)
    assert caches[0].samples_used == n
    # what leaving the short batch out (the old rule) would have changed
    assert np.abs(whole_batches_only.compute() - reference.compute()).max() > 1e-4


# ---------------------------------------------------------------------- same dataset, really


def _extract(tmp_path, name, model, dataset_seed, n=64):
    from ckapipe.extract.extraction import extract_activations

    return extract_activations(
        model,
        {"factory": "models:vector_dataset", "kwargs": {"n": n, "seed": dataset_seed}},
        layers=["1", "3"],
        out=tmp_path / f"{name}.store",
        batch_size=16,
        dtype="float32",
        progress=False,
    ).path


def test_caches_of_different_datasets_with_equal_sample_ids_are_refused(tmp_path):
    # two datasets of the same size, extracted with the same seed: equal sample ids, other data
    mlp = "models:make_mlp"
    other_mlp = {"factory": "models:make_mlp", "kwargs": {"seed": 1}}
    stores = {
        "a": _extract(tmp_path, "a", mlp, 0),
        "b": _extract(tmp_path, "b", other_mlp, 0),
        "c": _extract(tmp_path, "c", other_mlp, 1),
    }
    caches = {
        name: build_gram_cache(store, tmp_path / f"{name}.grams", batch_size=16, device="cpu")
        for name, store in stores.items()
    }
    assert caches["a"].identity["sample_ids_sha256"] == caches["c"].identity["sample_ids_sha256"]
    with pytest.raises(IncompatibleInputsError) as refused:
        analyze_study([caches["a"], caches["c"]], tmp_path / "x.zarr", device="cpu")
    message = str(refused.value)
    assert "model 'c' and model 'a' were extracted from different inputs" in message
    assert '"seed": 1' in message and '"seed": 0' in message  # both dataset specs
    fingerprints = [caches[n].identity["input_fingerprint"][:12] for n in ("a", "c")]
    assert all(f in message for f in fingerprints) and "same dataset" in message
    assert isinstance(refused.value, StudyError)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(IncompatibleInputsError, match="cannot merge: .*different inputs"):
        merge_gram_caches([caches["a"], caches["c"]], tmp_path / "merged")
    # the same dataset through two models is fine, with no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study = analyze_study([caches["a"], caches["b"]], tmp_path / "ok.zarr", device="cpu")
    assert study.pair("a", "b").cka.shape == (2, 2)


def test_a_store_without_input_fingerprint_is_compared_by_sample_ids_with_a_warning(tmp_path):
    fingerprinted = _extract(tmp_path, "a", "models:make_mlp", 0)
    values = ActivationStore.open(fingerprinted)
    imported = tmp_path / "h5.store"  # as an HDF5 import: same rows, no fingerprint
    write_store(imported, {"x": values.read("1")}, values.sample_ids, "float32")
    attrs = zarr.open_group(str(imported), mode="r+").attrs
    del attrs["input_sha256"]
    caches = [
        build_gram_cache(path, tmp_path / f"{path.stem}.grams", batch_size=16, device="cpu")
        for path in (fingerprinted, imported)
    ]
    with pytest.warns(UnverifiedDatasetWarning, match="model 'h5': no input fingerprint"):
        study = analyze_study(caches, tmp_path / "r.zarr", n_bootstrap=0, device="cpu")
    np.testing.assert_allclose(study.pair("a", "h5").cka[0, 0], 1.0, rtol=1e-12)
    assert caches[1].identity["input_fingerprint"] is None
    assert "no input fingerprint" in caches[1].identity["input_fingerprint_note"]


def test_permutation_null_per_batch_hsic_is_the_estimators_hsic1():
    """The null's stacked product equals estimators.hsic1 of Ũ(K) against the permuted Ũ(L)."""
    import torch

    from ckapipe.analyze.estimators import hsic1, u_centered_gram
    from ckapipe.analyze.minibatch_pairs import PermutationNull

    rng = np.random.default_rng(3)
    m, n_perm, seed, batch = 9, 4, 7, 2
    grams = {
        name: torch.stack([u_centered_gram(rng.normal(size=(m, 5))) for _ in range(layers)])
        for name, layers in (("a", 2), ("b", 3))
    }
    layers = {"a": ["a0", "a1"], "b": ["b0", "b1", "b2"]}
    null = PermutationNull([("a", "b")], layers, n_perm, seed, torch.device("cpu"))
    null.update(batch, grams)
    perms = np.argsort(np.random.default_rng([seed, batch]).random((n_perm, m)), axis=1)
    for k, perm in enumerate(perms):
        for i in range(2):
            for j in range(3):
                permuted = grams["b"][j][perm][:, perm]
                expected = hsic1(grams["a"][i], permuted)
                assert float(null.cross[("a", "b")][k, i, j]) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_interval_method_is_withheld_below_its_validated_batch_count(study_dir, tmp_path):
    caches = [cache_path(study_dir, n) for n in ("a", "b")]
    study = analyze_study(
        caches, tmp_path / "boot.zarr", interval_method="bootstrap", n_bootstrap=50, device="cpu"
    )
    pair = study.pair("a", "b")
    assert np.isnan(pair.ci_low).all() and np.isnan(pair.ci_high).all()
    assert "bootstrap" in pair.interval_note and "withheld" in pair.interval_note
    assert study.provenance["interval_method"] == "bootstrap"
    jackknife = analyze_study(caches, tmp_path / "jack.zarr", n_bootstrap=50, device="cpu")
    assert np.isfinite(jackknife.pair("a", "b").ci_low).all()
    np.testing.assert_array_equal(pair.cka, jackknife.pair("a", "b").cka)
