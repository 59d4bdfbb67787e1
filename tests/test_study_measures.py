"""``analyze_study(measures=...)`` / ``ckapipe analyze --measure``: every similarity measure of
every pair from full Gram caches, stored, reloaded, in the CSV and the summary."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from click.testing import CliRunner
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr

from ckapipe.analyze import measures as ms
from ckapipe.analyze.cli_study import analyze
from ckapipe.analyze.gram_cache import build_gram_cache
from ckapipe.analyze.study import StudyError, analyze_study, csv_path_for, load_result
from ckapipe.store import ActivationStore, LayerRecord

N = 40
ALL = list(ms.MEASURES)


def _store(path: Path, data: dict[str, np.ndarray], sample_ids: np.ndarray) -> Path:
    layers = [
        LayerRecord(name=name, shape=(x.shape[1],), reduction="flatten", n_features=x.shape[1])
        for name, x in data.items()
    ]
    store = ActivationStore.create(path, layers=layers, sample_ids=sample_ids, dtype="float32")
    digest = hashlib.sha256(b"measure inputs" + sample_ids.tobytes()).hexdigest()
    with store:
        store.write_rows(0, data)
        store.set_rows_complete(len(sample_ids))
        store.mark_complete(input_sha256=digest)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two models over the same 40 samples, full and minibatch caches, the features kept.

    Every layer is well conditioned (no direction near float32 rounding of the stored values),
    so the feature-space references need no rank tolerance (tests/test_measures.py covers
    rank-deficient features)."""
    root = tmp_path_factory.mktemp("measures")
    rng = np.random.default_rng(21)
    x = rng.normal(size=(N, 5))
    sample_ids = np.arange(N)
    features = {
        "a": {
            "a.l0": x @ rng.normal(size=(5, 8)) + 0.1 * rng.normal(size=(N, 8)),
            "a.l1": np.tanh(x @ rng.normal(size=(5, 12))),
        },
        "b": {
            "b.h0": x[:, :3] + 0.3 * rng.normal(size=(N, 3)),
            "b.h1": rng.normal(size=(N, 6)),
            "b.h2": np.maximum(x @ rng.normal(size=(5, 50)), 0),
        },
    }
    features = {m: {k: v.astype(np.float32) for k, v in d.items()} for m, d in features.items()}
    full, minibatch = [], []
    for name, data in features.items():
        store = _store(root / f"{name}.store", data, sample_ids)
        full.append(
            build_gram_cache(
                store,
                root / f"{name}.grams",
                mode="full",
                device="cpu",
                precision="float64",
                storage="float64",
            )
        )
        minibatch.append(build_gram_cache(store, root / f"{name}-mb.grams", batch_size=10))
    rounded = build_gram_cache(store, root / "b-float32.grams", mode="full", device="cpu")
    return {
        "root": root,
        "features": features,
        "full": full,
        "minibatch": minibatch,
        "float32_full": [full[0], rounded],
    }


def _features(study, model, layer):
    return study["features"][model][layer].astype(np.float64)


def test_every_measure_of_every_pair_matches_the_pure_functions(study, tmp_path):
    options = ms.MeasureOptions(knn_k=4)
    result = analyze_study(
        study["full"],
        tmp_path / "r.zarr",
        names=["a", "b"],
        estimator="debiased",
        measures=ALL,
        measure_options=options,
        n_bootstrap=0,
    )
    assert result.provenance["measures"] == ALL
    for (a, b), pair in result.pairs.items():
        assert list(pair.measures) == ALL
        np.testing.assert_array_equal(pair.measures["cka"], pair.cka)
        for i, la in enumerate(pair.layers_a):
            for j, lb in enumerate(pair.layers_b):
                x, y = _features(study, a, la), _features(study, b, lb)
                k, l = ms.features_gram(x), ms.features_gram(y)  # noqa: E741
                got = {name: pair.measures[name][i, j] for name in ALL}
                assert got["rsa"] == pytest.approx(
                    pearsonr(pdist(x, "sqeuclidean"), pdist(y, "sqeuclidean"))[0], abs=1e-9
                )
                xc, yc = x - x.mean(0), y - y.mean(0)
                nuclear = np.linalg.svd(xc.T @ yc, compute_uv=False).sum()
                assert got["procrustes"] == pytest.approx(
                    nuclear / np.linalg.norm(xc) / np.linalg.norm(yc), abs=1e-9
                )
                coef, *_ = scipy.linalg.lstsq(xc, yc)
                r2 = 1 - np.sum((yc - xc @ coef) ** 2) / np.sum(yc**2)
                assert got["regression"] == pytest.approx(r2, abs=1e-9)
                assert got["cca"] == pytest.approx(ms.cca(k, l), abs=1e-12)
                assert got["rsa_spearman"] == pytest.approx(
                    ms.rsa(k, l, method="spearman"), abs=1e-12
                )
                assert got["pwcca"] == pytest.approx(ms.pwcca(k, l), abs=1e-12)
                assert got["svcca"] == pytest.approx(ms.svcca(k, l), abs=1e-12)
                assert got["knn"] == pytest.approx(ms.mutual_knn(k, l, n_neighbors=4), abs=0)
                assert got["regression_reverse"] == pytest.approx(ms.regression_r2(l, k), abs=1e-12)


def test_measures_survive_the_round_trip_csv_and_transpose(study, tmp_path):
    out = tmp_path / "r.zarr"
    written = analyze_study(
        study["full"],
        out,
        names=["a", "b"],
        estimator="biased",
        measures="cka,procrustes,regression,pwcca",
        n_bootstrap=0,
    )
    loaded = load_result(out)
    for key, pair in written.pairs.items():
        assert set(loaded.pairs[key].measures) == {"cka", "procrustes", "regression", "pwcca"}
        for name, values in pair.measures.items():
            np.testing.assert_array_equal(loaded.pairs[key].measures[name], values)
    with csv_path_for(out).open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"procrustes", "regression", "pwcca"} <= set(rows[0])
    row = next(
        r for r in rows if (r["model_a"], r["layer_a"], r["layer_b"]) == ("a", "a.l1", "b.h2")
    )
    pair = loaded.pair("a", "b")
    i, j = pair.layers_a.index("a.l1"), pair.layers_b.index("b.h2")
    assert float(row["procrustes"]) == pair.measures["procrustes"][i, j]
    # seen from b, a regression of b on a is a's regression on b; pwcca (weights of a) is dropped
    flipped = loaded.pair("b", "a")
    np.testing.assert_array_equal(
        flipped.measures["regression_reverse"], pair.measures["regression"].T
    )
    assert "pwcca" not in flipped.measures
    assert loaded.measure_names == ["cka", "procrustes", "regression", "pwcca"]
    np.testing.assert_array_equal(
        loaded.measure("regression_reverse", "b", "a"), pair.measures["regression"].T
    )
    with pytest.raises(KeyError, match="no measure 'pwcca' for b:a"):
        loaded.measure("pwcca", "b", "a")
    # labelled without ckapipe: xarray sees the measure dimension and its names
    xarray = pytest.importorskip("xarray")
    opened = xarray.open_zarr(out, consolidated=False)
    values = opened["measure_values"].sel(measure="procrustes").values
    index = [key for key in loaded.pairs].index(("a", "b"))
    np.testing.assert_array_equal(values[index, :2, :3], pair.measures["procrustes"])


def test_a_cka_only_study_writes_no_measure_arrays(study, tmp_path):
    out = tmp_path / "r.zarr"
    analyze_study(study["full"], out, names=["a", "b"], estimator="debiased", n_bootstrap=0)
    assert not (out / "measure_values").exists()
    assert all(not p.measures for p in load_result(out).pairs.values())


def test_minibatch_caches_refuse_other_measures(study, tmp_path):
    with pytest.raises(StudyError, match="rsa need the exact n x n Grams of full-mode caches"):
        analyze_study(study["minibatch"], tmp_path / "r.zarr", measures=["cka", "rsa"])
    with pytest.raises(StudyError, match="unknown similarity measure 'cca2'"):
        analyze_study(study["full"], tmp_path / "r.zarr", estimator="debiased", measures=["cca2"])


def test_float32_tiles_refuse_spectral_measures(study, tmp_path):
    """float32 tiles round each Gram entry by ~1e-7 of the largest, which the spectrum of a
    low-rank layer reads as extra dimensions (CCA of these features moves by ~0.1): refused."""
    with pytest.raises(StudyError, match=r"caches of b hold float32 tiles.*--storage float64"):
        analyze_study(
            study["float32_full"],
            tmp_path / "r.zarr",
            names=["a", "b"],
            estimator="debiased",
            measures=["cka", "cca"],
        )
    assert not (tmp_path / "r.zarr").exists()
    # CKA alone is fine from float32 tiles
    analyze_study(
        study["float32_full"], tmp_path / "r.zarr", names=["a", "b"], estimator="debiased"
    )


def test_cli_measure_option_prints_each_measure(study, tmp_path):
    grams = [str(p) for p in (study["root"] / "a.grams", study["root"] / "b.grams")]
    out = tmp_path / "cli.zarr"
    run = CliRunner().invoke(
        analyze,
        [*grams, "--out", str(out), "--estimator", "debiased", "--bootstrap", "0"]
        + ["--measure", "cka,rsa,procrustes,cca,knn", "--knn-k", "3"],
    )
    assert run.exit_code == 0, run.output
    assert "similarity measures" in run.output
    lines = run.output.splitlines()
    header = lines[lines.index(next(x for x in lines if x.startswith("similarity measures"))) + 1]
    assert header.split()[1:] == ["cka", "rsa", "procrustes", "cca", "knn"]
    assert load_result(out).provenance["measure_options"]["knn_k"] == 3
    bad = CliRunner().invoke(analyze, [*grams, "--out", str(out), "--measure", "cka,nope"])
    assert bad.exit_code == 2 and "unknown similarity measure 'nope'" in bad.output


def test_agreement_grid_and_report_section(study, tmp_path):
    from scipy.stats import kendalltau, spearmanr

    from ckapipe.analyze.measure_agreement import measure_agreement
    from ckapipe.analyze.plots import plot_measure_grid
    from ckapipe.workflow.html_report import measures_section

    names = ["cka", "rsa", "procrustes", "cca"]
    result = analyze_study(
        study["full"],
        tmp_path / "r.zarr",
        names=["a", "b"],
        estimator="debiased",
        measures=names,
        n_bootstrap=0,
    )
    # the entries by hand: a--b whole, a--a and b--b above the diagonal only
    entries = {name: [] for name in names}
    for pair in result.pairs.values():
        la, lb = len(pair.layers_a), len(pair.layers_b)
        for i in range(la):
            for j in range(lb):
                if pair.model_a == pair.model_b and j <= i:
                    continue
                for name in names:
                    entries[name].append(pair.measures[name][i, j])
    assert len(entries["cka"]) == 2 * 3 + 1 + 3
    agreement = measure_agreement(result)
    assert agreement.names == names and agreement.n_values == 10
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert agreement.spearman[i, j] == pytest.approx(
                spearmanr(entries[a], entries[b])[0], abs=1e-12
            )
            assert agreement.kendall[i, j] == pytest.approx(
                kendalltau(entries[a], entries[b])[0], abs=1e-12
            )
    figure = plot_measure_grid(result)
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == len(names) * len(result.pairs)
    html = measures_section(result)
    assert "<h3>Similarity measures</h3>" in html and 'alt="measure grid"' in html
    assert all(f"<th>{name}</th>" in html for name in names)
    only_cka = analyze_study(
        study["full"], tmp_path / "c.zarr", names=["a", "b"], estimator="debiased", n_bootstrap=0
    )
    assert measures_section(only_cka) == ""


def test_config_measures_need_full_mode_and_known_names():
    import yaml

    from ckapipe.run import DEFAULT_CONFIG
    from ckapipe.workflow.config_check import config_errors

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert config["analysis"]["measures"] == ["cka"] and not config_errors(config)
    config["analysis"]["measures"] = ["cka", "rsa"]
    assert any(e.startswith("analysis.measures: rsa need mode full") for e in config_errors(config))
    config["analysis"].update(mode="full", estimator="debiased")
    assert not config_errors(config)
    config["analysis"]["measures"] = ["cka", "rsaa"]
    assert any("analysis.measures" in e and "rsaa" in e for e in config_errors(config))
