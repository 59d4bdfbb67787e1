"""Full mode out of core: tiled full-mode Gram caches, tile jobs and their exact merge, and exact
CKA from streamed tiles, checked against the float64 reference (tests/reference.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from reference import cka_from_grams, hsic0, hsic1, linear_gram, rbf_gram, rbf_sigma2

from ckapipe.analyze.estimators import StreamedMedian
from ckapipe.analyze.gram_cache import GramCache, build_gram_cache, merge_gram_caches
from ckapipe.analyze.gram_format import GramCacheError, GramCacheUsageError, read_full_gram
from ckapipe.analyze.intervals import FullBlockJackknife
from ckapipe.analyze.study import analyze_study
from ckapipe.analyze.study_checks import StudyError
from ckapipe.analyze.tile_grid import TileGrid, parse_tile_job
from ckapipe.cli import main
from ckapipe.errors import IncompleteError, IntegrityError
from ckapipe.store import ActivationStore, LayerRecord

# the synthetic stores record no input fingerprint
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:ckapipe.analyze.study")

N = 300  # with 128-row tiles: tile rows of 128, 128 and 44
TILE = 128
WIDTHS = {"a": {"a.narrow": 6, "a.wide": 90}, "b": {"b.one": 40, "b.two": 3}}


def write_store(path, data: dict[str, np.ndarray], dtype="float32"):
    records = [LayerRecord(name, (x.shape[1],), "flatten", x.shape[1]) for name, x in data.items()]
    n = next(iter(data.values())).shape[0]
    store = ActivationStore.create(
        path, layers=records, sample_ids=np.arange(n), dtype=dtype, row_block=32
    )
    store.write_rows(0, {name: x.astype(np.float32) for name, x in data.items()})
    store.set_rows_complete(n)
    store.mark_complete()
    store.close()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two models over the same N samples; b's layers are noisy functions of a's."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(3)
    a = {name: rng.normal(size=(N, p)) + 5 for name, p in WIDTHS["a"].items()}
    mix = a["a.wide"][:, :40] @ rng.normal(size=(40, 40)) / 6
    b = {"b.one": np.tanh(mix) + 0.5 * rng.normal(size=(N, 40)), "b.two": mix[:, :3] ** 2}
    # the reference sees the values as stored (float32)
    acts = {
        model: {name: x.astype(np.float32).astype(np.float64) for name, x in layers.items()}
        for model, layers in {"a": a, "b": b}.items()
    }
    stores = {name: write_store(root / f"{name}.store", acts[name]) for name in acts}
    return {"root": root, "acts": acts, "stores": stores}


def build(models, name, out, **options):
    settings = {"mode": "full", "device": "cpu", "tile_size": TILE, "storage": "float64"}
    return build_gram_cache(models["stores"][name], out, **{**settings, **options})


def study(models, tmp_path, caches, **options):
    return analyze_study(
        [cache.path for cache in caches],
        tmp_path / "result.zarr",
        names=["a", "b"],
        pairs="a:b",
        device="cpu",
        **options,
    )


def reference_cka(models, hsic, kernel="linear", threshold=1.0):
    def gram(x):
        return linear_gram(x) if kernel == "linear" else rbf_gram(x, threshold)

    grams_a = [gram(x) for x in models["acts"]["a"].values()]
    grams_b = [gram(y) for y in models["acts"]["b"].values()]
    return np.array(
        [
            [cka_from_grams(k, l, unbiased=hsic is hsic1) for l in grams_b]  # noqa: E741
            for k in grams_a
        ]
    )


# --------------------------------------------------------------------------- geometry


def test_tile_grid_numbers_tiles_row_major_over_the_upper_triangle():
    grid = TileGrid(N, TILE)
    assert (grid.count, grid.n_tiles) == (3, 6)
    assert grid.pairs == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert [grid.number(i, j) for i, j in grid.pairs] == list(range(6))
    assert grid.span(2) == (256, 300)
    with pytest.raises(ValueError, match="not stored"):
        grid.number(1, 0)


@pytest.mark.parametrize(("n", "tile", "jobs"), [(300, 128, 2), (1000, 10, 7), (50, 20, 5)])
def test_tile_jobs_cover_every_tile_row_once_with_balanced_work(n, tile, jobs):
    grid = TileGrid(n, tile)
    spans = [grid.job_rows(k, jobs) for k in range(jobs)]
    assert spans[0][0] == 0 and spans[-1][1] == grid.count
    assert all(spans[k][1] == spans[k + 1][0] for k in range(jobs - 1))
    work = [grid.first_tile_of_row(b) - grid.first_tile_of_row(a) for a, b in spans]
    # each job within one tile row (at most `count` tiles) of an equal share
    assert max(work) <= grid.n_tiles / jobs + grid.count


def test_parse_tile_job_is_one_based_and_refuses_bad_text():
    assert parse_tile_job("3/8") == (2, 8)
    for bad in ("0/8", "9/8", "3", "a/b", "1/0"):
        with pytest.raises(ValueError, match="K/J"):
            parse_tile_job(bad)


def test_streamed_median_is_numpys_median_exactly():
    rng = np.random.default_rng(0)
    for count in (1, 2, 7, 1000, 1001):
        values = rng.normal(size=count) * rng.choice([1e-4, 1.0, 3e5], size=count)
        values[: count // 4] = values[0]  # ties
        values[count // 2 :: 7] *= -1
        median = StreamedMedian(count)
        while not median.done:
            for chunk in np.array_split(values, 3):
                median.add(chunk)
            median.next_pass()
        assert median.value == np.median(values)
    doubled = StreamedMedian(2 * 11)
    values = rng.normal(size=11)
    while not doubled.done:
        doubled.add(torch.from_numpy(values), weight=2)
        doubled.next_pass()
    assert doubled.value == np.median(np.concatenate([values, values]))


# --------------------------------------------------------------------------- the cache


def test_tiled_cache_holds_the_exact_gram(models, tmp_path):
    cache = build(models, "a", tmp_path / "a.grams", max_slab_bytes=TILE * 8 * 16)
    assert cache.attrs["format_version"] == 3 and cache.tile_rows == (0, 3)
    for name, x in models["acts"]["a"].items():
        reference = linear_gram(x)
        gram = read_full_gram(cache, name)
        assert np.abs(gram - reference).max() <= 1e-12 * np.abs(reference).max()
        # below the diagonal: the transpose of the stored tile
        np.testing.assert_array_equal(cache.read_tile(name, 2, 0), cache.read_tile(name, 0, 2).T)
    with pytest.raises(GramCacheUsageError, match=r"layer 'a.wide'.*read_tile"):
        read_full_gram(cache, "a.wide", max_bytes=1000)


def test_float32_tiles_are_the_float64_gram_rounded_once(models, tmp_path):
    exact = build(models, "a", tmp_path / "64.grams")
    rounded = build(models, "a", tmp_path / "32.grams", storage="float32")
    assert rounded.stored_tiles("a.wide").dtype == np.float32
    for name in WIDTHS["a"]:
        np.testing.assert_array_equal(
            read_full_gram(rounded, name),
            read_full_gram(exact, name).astype(np.float32).astype(np.float64),
        )


def test_old_format_version_is_refused_with_a_rebuild_message(models, tmp_path):
    cache = build(models, "b", tmp_path / "old.grams")
    meta = json.loads((cache.path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 2
    (cache.path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(GramCacheError, match=r"format version 2.*rebuild it"):
        GramCache.open(cache.path)


def test_deleted_tile_is_an_integrity_error_naming_it(models, tmp_path):
    cache = build(models, "b", tmp_path / "b.grams")
    (cache.path / "grams" / "b.one" / "c" / "4" / "0" / "0").unlink()
    with pytest.raises(IntegrityError, match=r"grams/b.one/c/4/0/0"):
        GramCache.open(cache.path)


# --------------------------------------------------------------------------- tile jobs


def test_tile_jobs_merge_bit_for_bit_into_the_one_pass_cache(models, tmp_path):
    one = build(models, "a", tmp_path / "one.grams", tile_size=64, storage="float32")
    # 5 tile rows, 15 tiles in 4 jobs
    parts = [
        build(
            models,
            "a",
            tmp_path / f"part{k}.grams",
            tile_size=64,
            storage="float32",
            tile_job=(k, 4),
        )
        for k in range(4)
    ]
    assert [part.tile_rows for part in parts] == [(0, 1), (1, 2), (2, 3), (3, 5)]
    merged = merge_gram_caches(parts[::-1], tmp_path / "merged.grams")
    assert not merged.is_partial
    for name in WIDTHS["a"]:
        np.testing.assert_array_equal(merged.stored_tiles(name)[...], one.stored_tiles(name)[...])


def test_a_missing_tile_job_is_named(models, tmp_path):
    parts = [build(models, "a", tmp_path / f"p{k}.grams", tile_job=(k, 3)) for k in range(3)]
    assert [part.tile_rows for part in parts] == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(IncompleteError, match=r"tile rows 1:2 of 3 \(tiles of samples 128:256\)"):
        merge_gram_caches([parts[0], parts[2]], tmp_path / "m.grams")
    with pytest.raises(IncompleteError, match=r"tile rows 2:3 of 3 \(samples 256:300\)"):
        merge_gram_caches(parts[:2], tmp_path / "m.grams")
    assert not (tmp_path / "m.grams").exists()
    other = build(models, "b", tmp_path / "b.grams")
    with pytest.raises(StudyError, match=r"partial full-mode cache \(tile rows 0:1 of 3\)"):
        study(models, tmp_path, [parts[0], other], estimator="debiased")


def test_cli_tile_jobs_and_merge(models, tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    store = str(models["stores"]["b"])
    for k in (1, 2):
        args = ["gram", store, "--mode", "full", "--tile-size", "100", "--tiles", f"{k}/2"]
        result = runner.invoke(main, [*args, "--out", str(tmp_path / f"p{k}"), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    assert "tile rows 0:1 of 3 (a partial cache" in runner.invoke(
        main, ["gram", store, "--mode", "full", "--tile-size", "100", "--tiles", "1/2",
               "--out", str(tmp_path / "again"), "--device", "cpu"]
    ).output  # fmt: skip
    result = runner.invoke(
        main,
        ["merge-grams", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")],
    )
    assert result.exit_code == 0 and "6 Gram tiles per layer from 2 parts" in result.output
    bad = runner.invoke(main, ["gram", store, "--mode", "full", "--tiles", "3/2", "--out", "x"])
    assert bad.exit_code == 2 and "1 <= K <= J" in bad.output


# --------------------------------------------------------------------------- exact CKA


@pytest.mark.parametrize(("estimator", "hsic"), [("debiased", hsic1), ("biased", hsic0)])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_tiled_cka_equals_the_float64_reference(models, tmp_path, estimator, hsic, kernel):
    caches = [build(models, name, tmp_path / f"{name}.grams") for name in ("a", "b")]
    options = {"kernel": kernel, "threshold": 0.7} if kernel == "rbf" else {}
    result = study(models, tmp_path, caches, estimator=estimator, **options)
    pair = result.pair("a", "b")
    expected = reference_cka(models, hsic, kernel, 0.7)
    np.testing.assert_allclose(pair.cka, expected, rtol=1e-9)
    if kernel == "rbf":  # the streamed median: the reference's bandwidth
        sigma2 = result.provenance["models"]["a"]["rbf_sigma2"]
        for name, x in models["acts"]["a"].items():
            assert sigma2[name] == pytest.approx(rbf_sigma2(x, 0.7), rel=1e-12)


def test_float32_tiles_and_products_stay_within_float32_rounding(models, tmp_path):
    """float32 storage rounds each Gram entry once (relative 2⁻²⁴ ≈ 6e-8); float32 products add
    a rounding of the same order per entry: CKA moves by a few 1e-7 at most, not more."""
    expected = reference_cka(models, hsic1)
    for precision in ("float64", "float32"):
        caches = [
            build(
                models,
                name,
                tmp_path / f"{name}-{precision}.grams",
                storage="float32",
                precision=precision,
            )
            for name in ("a", "b")
        ]
        pair = study(models, tmp_path / precision, caches, estimator="debiased").pair("a", "b")
        error = np.abs(pair.cka - expected).max()
        assert 0 < error < 1e-6, (precision, error)


def test_tiled_jackknife_equals_the_row_streamed_jackknife(models, tmp_path):
    """update_tile over upper-triangle tiles (off-diagonal ones standing for their transpose)
    gives the same delete-one-block values as update over whole rows of the U-centered Grams."""
    from reference import u_centered

    grams = [u_centered(linear_gram(x)) for x in models["acts"]["a"].values()]
    grams += [u_centered(linear_gram(y)) for y in models["acts"]["b"].values()]
    stacked = np.stack(grams)  # (L, N, N)
    rows = FullBlockJackknife(N, len(grams), n_blocks=6)
    rows.update(stacked, 0)
    tiles = FullBlockJackknife(N, len(grams), n_blocks=6)
    grid = TileGrid(N, 70)
    for i, j in grid.pairs:
        (a, b), (c, d) = grid.span(i), grid.span(j)
        tiles.update_tile(torch.from_numpy(stacked[:, a:b, c:d].copy()), a, c, mirrored=i != j)
    np.testing.assert_allclose(tiles.inner(), rows.inner(), rtol=1e-12)
    np.testing.assert_allclose(tiles.deleted_hsic(), rows.deleted_hsic(), rtol=1e-10)


def test_tiled_interval_equals_one_tile_interval(models, tmp_path, monkeypatch):
    import ckapipe.analyze.full_pairs as full_pairs_module

    monkeypatch.setattr(
        full_pairs_module,
        "FullBlockJackknife",
        lambda n, n_layers: FullBlockJackknife(n, n_layers, n_blocks=8),
    )
    results = []
    for tile in (TILE, N):
        caches = [
            build(models, name, tmp_path / f"{name}{tile}.grams", tile_size=tile) for name in "ab"
        ]
        out = tmp_path / str(tile)
        results.append(
            study(models, out, caches, estimator="debiased", ci_level=0.9).pair("a", "b")
        )
    tiled, whole = results
    assert np.isfinite(tiled.ci_low).all()
    np.testing.assert_allclose(tiled.ci_low, whole.ci_low, rtol=1e-10)
    np.testing.assert_allclose(tiled.ci_high, whole.ci_high, rtol=1e-10)


# --------------------------------------------------------------------------- memory


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, numpy as np, torch
    from ckapipe.analyze.gram_cache import build_gram_cache
    from ckapipe.analyze.study import analyze_study
    from ckapipe.store import ActivationStore, LayerRecord
    torch.set_num_threads(1)
    n, root = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        s = ActivationStore.create(f"{root}/{name}.store", layers=[LayerRecord("l", (8,), "flatten", 8)],
                                   sample_ids=np.arange(n), dtype="float32", row_block=256)
        s.write_rows(0, {"l": x}); s.set_rows_complete(n); s.mark_complete(); s.close()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    caches = [build_gram_cache(f"{root}/{name}.store", f"{root}/{name}.grams", mode="full",
                               device="cpu", tile_size=256) for name in ("a", "b")]
    analyze_study([c.path for c in caches], f"{root}/r.zarr", names=["a", "b"], device="cpu",
                  estimator="debiased", ci_level=0.9)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_memory_does_not_grow_as_n_squared(tmp_path):
    """Gram pass and analysis (with the jackknife) at n = 4000 with 256-row tiles: the peak RSS
    grows by far less than one n×n float64 matrix (128 MB), which the in-memory path held
    several of."""
    n = 4000
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(n), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.strip().splitlines()[-1])
    assert growth < 8 * n * n / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB"
