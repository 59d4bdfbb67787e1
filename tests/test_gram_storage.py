"""Minibatch Gram caches stored in float32 (``storage_dtype``): each finished float64 Ũ Gram is
rounded once when written, readers widen it to float64 exactly, and the study's CKA stays within
1e-6 of an independent float64 feature-space reference (tests/reference.py). Old caches without
the attribute are float64 and give the same numbers as before; merging parts of different
storage is refused; float32 caches take half the disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import float32_store, small_cnn_relus
from reference import batch_slices, minibatch_cka

from ckapipe.analyze.gram_cache import (
    GramCache,
    GramCacheDataError,
    IncompatibleGramCachesError,
    build_gram_cache,
    merge_gram_caches,
)
from ckapipe.analyze.study import analyze_study, load_result
from ckapipe.cli import main

N = 500  # 7 batches of 64 and a short last batch of 52
M = 64


def _offset_relu(n: int, widths: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Post-ReLU features over per-feature means spread 100x (10 to 1000): the case where the
    Grams' entries are large next to the signal, so rounding matters most."""
    rng = np.random.default_rng(seed)
    shared = np.random.default_rng(99).normal(size=(n, 16))  # what the two "models" share
    return {
        name: (
            np.maximum(rng.normal(size=(n, w)) + shared @ rng.normal(size=(16, w)) / 4, 0)
            + np.geomspace(10, 1000, w)
        ).astype(np.float32)
        for name, w in widths.items()
    }


def _raw(cache: GramCache, group: str, layer: str) -> np.ndarray:
    return zarr.open_group(str(cache.path), mode="r")[f"{group}/{layer}"][...]


def _study(caches: list[GramCache], out: Path, permutations: int = 0):
    result = analyze_study(
        caches,
        out,
        names=["a", "b"],
        n_bootstrap=0,
        n_permutations=permutations,
        device="cpu",
        include_self=False,
    )
    return result.pair("a", "b")


# --------------------------------------------------------------------------- rounding, reading


def test_float32_storage_is_the_float64_gram_rounded_once_and_read_back_as_float64(tmp_path):
    store = float32_store(tmp_path / "s", _offset_relu(N, {"x": 40, "y": 90}, seed=0))
    settings = {"batch_size": M, "epochs": 2, "seed": 1, "device": "cpu"}
    f64 = build_gram_cache(store, tmp_path / "f64", storage="float64", **settings)
    f32 = build_gram_cache(store, tmp_path / "f32", **settings)  # the default
    assert (f32.storage_dtype, f64.storage_dtype) == ("float32", "float64")
    assert f32.attrs["storage_dtype"] == "float32" and f32.attrs["precision"] == "float32"
    assert sorted(set(f32.batch_sizes.tolist())) == [52, M]
    for group in ("grams", "grams_last"):
        for layer in f32.layer_names:
            wide, narrow = _raw(f64, group, layer), _raw(f32, group, layer)
            assert (wide.dtype, narrow.dtype) == (np.float64, np.float32)
            # rounded to nearest once from the very float64 values float64 storage keeps
            assert narrow.tobytes() == wide.astype(np.float32).tobytes(), (group, layer)
            assert not np.array_equal(narrow.astype(np.float64), wide)  # it did round
    # every reader gives float64, the stored float32 values widened exactly
    full = [int(b) for b, size in zip(f32.batches, f32.batch_sizes, strict=True) if size == M]
    out = np.full((len(full), 2, M, M), np.nan)
    f32.read_batches_into(full, out)  # the direct chunk reader the study uses
    batches = dict(f32.iter_batches())
    for g, number in enumerate(full):
        for i, layer in enumerate(f32.layer_names):
            gram = f32.batch_gram(layer, number)
            assert gram.dtype == np.float64
            _, index = f32._where[number]  # noqa: SLF001 - position in the stored array
            widened = _raw(f32, "grams", layer)[index].astype(np.float64)
            assert np.array_equal(gram, widened)
            assert np.array_equal(out[g, i], widened)
            assert batches[number].dtype == torch.float64
            assert np.array_equal(batches[number][i].numpy(), widened)


# --------------------------------------------------------------------------- the 1e-6 bar


@pytest.mark.parametrize("features", ["offset_relu", "cnn"])
def test_float32_stored_cka_is_within_1e_6_of_a_float64_feature_reference(tmp_path, features):
    """Two "models" (two draws of offset post-ReLU features; two seeds of a small CNN), each
    cached with the defaults (float32 products, float32 storage): the study's minibatch CKA of
    every layer pair against tests/reference.py's float64 minibatch CKA of the float64 features
    over the same batches. Also the permutation null: the same p-values, thresholds within 1e-6.
    """
    if features == "offset_relu":
        data = [_offset_relu(N, {"x": 300, "y": 700}, seed=s) for s in (0, 1)]
    else:
        data = [small_cnn_relus(N, seed=s) for s in (0, 1)]
    stores = [float32_store(tmp_path / f"s{i}", d) for i, d in enumerate(data)]
    f32 = [build_gram_cache(s, tmp_path / f"f32_{i}", batch_size=M) for i, s in enumerate(stores)]
    f64 = [
        build_gram_cache(
            s, tmp_path / f"f64_{i}", batch_size=M, precision="float64", storage="float64"
        )
        for i, s in enumerate(stores)
    ]
    # float64 products, float32 storage: the rounding on storage alone
    stored_only = [
        build_gram_cache(s, tmp_path / f"s32_{i}", batch_size=M, precision="float64")
        for i, s in enumerate(stores)
    ]
    blocks = batch_slices(N, M)
    assert len(blocks) == 8 and blocks[-1].stop - blocks[-1].start == 52
    features_of = [[[x.astype(np.float64)[b] for x in d.values()] for b in blocks] for d in data]
    reference = minibatch_cka(*features_of)  # (La, Lb), float64 throughout
    rounded = _study(f32, tmp_path / "r32.ckapipe", permutations=50)
    recorded = load_result(tmp_path / "r32.ckapipe").provenance["models"]["a"]["gram_cache_attrs"]
    assert (recorded["storage_dtype"], recorded["precision"]) == ("float32", "float32")
    exact = _study(f64, tmp_path / "r64.ckapipe", permutations=50)
    storage_only = _study(stored_only, tmp_path / "s32.ckapipe").cka
    error_exact = np.abs(exact.cka - reference).max()
    error_rounded = np.abs(rounded.cka - reference).max()
    error_storage = np.abs(storage_only - reference).max()
    print(
        f"{features}: max |dCKA| vs float64 reference: defaults {error_rounded:.2e}, "
        f"float32 storage alone {error_storage:.2e}, float64 path {error_exact:.2e}"
    )
    assert error_exact <= 1e-10  # the reference describes these very batches
    assert error_rounded <= 1e-6 and error_storage <= 1e-6
    np.testing.assert_array_equal(rounded.p_value, exact.p_value)
    assert np.abs(rounded.null_threshold - exact.null_threshold).max() <= 1e-6


# --------------------------------------------------------------------------- old caches, merging


def test_old_float64_caches_without_the_attribute_open_and_give_the_same_numbers(tmp_path):
    data = [_offset_relu(N, {"x": 40, "y": 90}, seed=s) for s in (0, 1)]
    stores = [float32_store(tmp_path / f"s{i}", d) for i, d in enumerate(data)]
    caches = [
        build_gram_cache(s, tmp_path / f"g{i}", batch_size=M, storage="float64")
        for i, s in enumerate(stores)
    ]
    before = _study(caches, tmp_path / "before.ckapipe").cka
    for cache in caches:  # as a cache written before storage_dtype existed
        del zarr.open_group(str(cache.path), mode="r+").attrs["storage_dtype"]
    old = [GramCache.open(cache.path) for cache in caches]
    assert "storage_dtype" not in old[0].attrs and old[0].storage_dtype == "float64"
    after = _study(old, tmp_path / "after.ckapipe").cka
    np.testing.assert_array_equal(after, before)
    # old parts still merge (into an old-style float64 cache), and never with float32 parts
    parts = [
        build_gram_cache(stores[0], tmp_path / f"p{i}", batch_size=M, rows=rows, storage=storage)
        for i, (rows, storage) in enumerate([((0, 256), "float64"), ((256, N), "float64")])
    ]
    for part in parts:
        del zarr.open_group(str(part.path), mode="r+").attrs["storage_dtype"]
    merged = merge_gram_caches(parts, tmp_path / "merged")
    assert merged.storage_dtype == "float64"
    for group in ("grams", "grams_last"):
        for layer in merged.layer_names:
            assert _raw(merged, group, layer).tobytes() == _raw(old[0], group, layer).tobytes()
    rounded = build_gram_cache(stores[0], tmp_path / "p32", batch_size=M, rows=(256, N))
    with pytest.raises(
        IncompatibleGramCachesError,
        match=r"differ in storage dtype \(--storage\) \('float32' vs 'float64'\)",
    ):
        merge_gram_caches([parts[0], rounded], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_float32_parts_merge_bit_for_bit_into_one_float32_pass(tmp_path):
    store = float32_store(tmp_path / "s", _offset_relu(N, {"x": 40}, seed=0))
    settings = {"batch_size": M, "epochs": 2, "device": "cpu"}
    whole = build_gram_cache(store, tmp_path / "whole", **settings)
    parts = [
        build_gram_cache(store, tmp_path / f"p{i}", rows=rows, **settings)
        for i, rows in enumerate([(0, 192), (192, N)])
    ]
    merged = merge_gram_caches(parts, tmp_path / "merged")
    assert merged.storage_dtype == "float32"
    for group in ("grams", "grams_last"):
        a, b = _raw(whole, group, "x"), _raw(merged, group, "x")
        assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- disk, CLI


def _gram_bytes(cache: GramCache) -> int:
    return sum(
        f.stat().st_size
        for group in ("grams", "grams_last")
        for f in (cache.path / group).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    )


def test_float32_storage_halves_the_cache_on_disk(tmp_path):
    store = float32_store(tmp_path / "s", _offset_relu(N, {"x": 40, "y": 90}, seed=0))
    f64 = build_gram_cache(store, tmp_path / "f64", batch_size=M, storage="float64")
    f32 = build_gram_cache(store, tmp_path / "f32", batch_size=M)
    wide, narrow = _gram_bytes(f64), _gram_bytes(f32)
    # per chunk m_b^2 values plus a 4-byte CRC-32C: 8 m^2 + 4 against 4 m^2 + 4
    chunks = 2 * 8
    values = 2 * (7 * M * M + 52 * 52)
    assert (wide, narrow) == (8 * values + 4 * chunks, 4 * values + 4 * chunks)
    assert narrow / wide < 0.5005


def test_cli_gram_storage_option(tmp_path):
    store = float32_store(tmp_path / "s", _offset_relu(100, {"x": 8}, seed=0))
    runner = CliRunner()
    for storage in ("float32", "float64"):
        out = tmp_path / storage
        result = runner.invoke(
            main,
            ["gram", str(store), "-m", "25", "--device", "cpu", "--storage", storage]
            + ["--out", str(out)],
        )
        assert result.exit_code == 0, result.output
        assert GramCache.open(out).storage_dtype == storage
    result = runner.invoke(main, ["gram", str(store), "-m", "25", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0 and GramCache.open(tmp_path / "x").storage_dtype == "float32"
    bad = runner.invoke(main, ["gram", str(store), "--storage", "float16", "--out", "y"])
    assert bad.exit_code == 2 and "'float16' is not one of" in bad.output


def test_a_gram_beyond_float32_range_is_refused_not_stored_as_inf(tmp_path):
    # features of size ~1e19: the float64 Gram (~1e40) is finite, its float32 rounding is not
    data = {"huge": (np.random.default_rng(0).normal(size=(64, 4)) * 1e19).astype(np.float32)}
    store = float32_store(tmp_path / "s", data)
    with pytest.raises(GramCacheDataError, match=r"layer 'huge', batch 0: .*--storage float64"):
        build_gram_cache(store, tmp_path / "f32", batch_size=32, precision="float64")
    assert not (tmp_path / "f32").exists()
    exact = build_gram_cache(
        store, tmp_path / "f64", batch_size=32, precision="float64", storage="float64"
    )
    assert np.isfinite(exact.batch_gram("huge", 0)).all()
    assert np.abs(exact.batch_gram("huge", 0)).max() > np.finfo(np.float32).max
