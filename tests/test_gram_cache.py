"""Gram caches, checked against an independent float64 numpy reference of the stored rows.

The reference reads the layers straight from zarr (decoding bfloat16 bits here), centers each
batch's features, forms the Gram and U-centers it with tests/reference.py's formulas; it does not
use ckapipe's estimator module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import float32_store, small_cnn_relus
from reference import linear_gram, rbf_gram, u_centered

import ckapipe.store as store_module
from ckapipe.analyze.estimators import MinibatchCKA, centered_batch_gram, u_centered_gram
from ckapipe.analyze.gram_cache import (
    GramCache,
    GramCacheError,
    IncompatibleGramCachesError,
    RemainderDroppedWarning,
    build_gram_cache,
    check_compatible,
    merge_gram_caches,
)
from ckapipe.cli import main
from ckapipe.errors import FormatError, IncompleteError, IntegrityError
from ckapipe.store import ActivationStore, IncompleteStoreError, LayerRecord

N = 203  # not a multiple of the batch size
M = 24
FEATURES = {"narrow": 7, "wide": 300}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 4 KiB chunks: tiny stores get many chunks along both axes (row chunks 16, 48 or 144 rows)
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 4096)


def make_store(
    path, *, n=N, dtype="float16", seed=0, sample_ids=None, features=None, complete=True
):
    rng = np.random.default_rng(seed)
    features = features or FEATURES
    records = [LayerRecord(name, (p,), "flatten", p) for name, p in features.items()]
    # a large mean offset, as in post-ReLU layers: centering must happen before the products
    data = {name: (rng.normal(size=(n, p)) + 20).astype(np.float32) for name, p in features.items()}
    ids = np.arange(n) if sample_ids is None else sample_ids
    store = ActivationStore.create(path, layers=records, sample_ids=ids, dtype=dtype, row_block=16)
    store.write_rows(0, data)
    store.set_rows_complete(n)
    if complete:
        store.mark_complete()
    store.close()
    return path


# --------------------------------------------------------------------------- numpy reference


def stored(path, name) -> np.ndarray:
    raw = zarr.open_group(str(path), mode="r")["layers"][name][...]
    if raw.dtype == np.uint16:  # bfloat16 bit patterns
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float64)


def expected_batch_rows(n, m, epochs, epoch_seeds):
    """Global batch number -> store rows, from the documented partition rule: batches of m in
    each epoch's order, the last one holding the n mod m remaining rows if there are >= 4."""
    rows = {}
    used = n if n % m >= 4 else n - n % m
    per_epoch = -(-used // m)
    for epoch in range(epochs):
        order = (
            np.arange(n) if epoch == 0 else np.random.default_rng(epoch_seeds[epoch]).permutation(n)
        )
        for k in range(per_epoch):
            rows[epoch * per_epoch + k] = order[k * m : min((k + 1) * m, used)]
    return rows


def assert_close(actual, expected, what):
    scale = np.abs(expected).max()
    error = np.abs(np.asarray(actual) - expected).max()
    assert error <= 1e-10 * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------- minibatch mode


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_minibatch_grams_equal_numpy_reference(tmp_path, dtype):
    store = make_store(tmp_path / "store", dtype=dtype)
    # float64 products and storage: the exact path, checked to 1e-10
    cache = build_gram_cache(
        store,
        tmp_path / "grams",
        batch_size=M,
        epochs=2,
        seed=7,
        device="cpu",
        precision="float64",
        storage="float64",
    )
    per_epoch = N // M + 1  # 8 batches of 24 and a short last batch of the 11 remaining rows
    assert cache.mode == "minibatch" and cache.kernel == "linear" and cache.batch_size == M
    assert cache.layer_names == ["narrow", "wide"]
    assert list(cache.batches) == list(range(2 * per_epoch))
    assert cache.batch_sizes.tolist() == [M] * 8 + [11] + [M] * 8 + [11]
    partition = cache.partition
    assert partition["dropped_rows"] == 0 and partition["last_batch_size"] == 11
    assert cache.samples_used == cache.n_samples == N
    assert partition["n_batches_total"] == 2 * per_epoch
    assert (
        cache.identity["sample_ids_sha256"]
        == ActivationStore.open(store).identity()["sample_ids_sha256"]
    )
    rows = expected_batch_rows(N, M, 2, partition["epoch_seeds"])
    values = {name: stored(store, name) for name in FEATURES}
    seen = []
    for number, grams in cache.iter_batches():
        seen.append(number)
        assert grams.shape == (2, len(rows[number]), len(rows[number]))
        for i, name in enumerate(cache.layer_names):
            reference = u_centered(linear_gram(values[name][rows[number]]))
            assert_close(grams[i].numpy(), reference, f"{dtype} layer {name} batch {number}")
    assert seen == list(range(2 * per_epoch))


def test_float32_products_stay_within_float32_accuracy(tmp_path):
    # float32 data: (bfloat16 data is short enough that float32 products are nearly exact)
    store = make_store(tmp_path / "store", dtype="float32")
    cache = build_gram_cache(
        store, tmp_path / "grams", batch_size=M, epochs=2, precision="float32", device="cpu"
    )
    assert cache.attrs["precision"] == "float32"
    rows = expected_batch_rows(N, M, 2, cache.partition["epoch_seeds"])
    values = stored(store, "wide")
    worst = 0.0
    for number, grams in cache.iter_batches(layers=["wide"]):
        reference = u_centered(linear_gram(values[rows[number]]))
        worst = max(worst, np.abs(grams[0].numpy() - reference).max() / np.abs(reference).max())
    # float32 products of 300 shifted features: float32 rounding, not float64's, and small
    assert 1e-10 < worst < 1e-5


def test_rbf_minibatch_grams_use_the_batch_median(tmp_path):
    store = make_store(tmp_path / "store", dtype="float32")
    cache = build_gram_cache(
        store,
        tmp_path / "grams",
        batch_size=M,
        kernel="rbf",
        threshold=0.7,
        device="cpu",
        precision="float64",
        storage="float64",
    )
    assert cache.kernel == "rbf" and "median" in cache.attrs["rbf_bandwidth_rule"]
    values = stored(store, "wide")
    for number, grams in cache.iter_batches(layers=["wide"]):
        reference = u_centered(rbf_gram(values[number * M : (number + 1) * M], 0.7))
        assert_close(grams[0].numpy(), reference, f"rbf batch {number}")


def test_constant_layer_gives_exact_zero_linear_grams_and_a_named_rbf_error(tmp_path):
    path = tmp_path / "store"
    records = [LayerRecord("flat", (5,), "flatten", 5)]
    store = ActivationStore.create(path, layers=records, sample_ids=np.arange(64), row_block=16)
    store.write_rows(0, {"flat": np.full((64, 5), 3.5, dtype=np.float32)})
    store.set_rows_complete(64)
    store.mark_complete()
    store.close()
    cache = build_gram_cache(path, tmp_path / "linear", batch_size=16, device="cpu")
    for _, grams in cache.iter_batches():
        assert not grams.any()
    with pytest.raises(GramCacheError, match=r"layer 'flat', batch 0: .*median"):
        build_gram_cache(path, tmp_path / "rbf", batch_size=16, kernel="rbf", device="cpu")


# --------------------------------------------------------------------------- full mode


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_full_mode_equals_numpy_centered_gram(tmp_path, dtype):
    store = make_store(tmp_path / "store", dtype=dtype)
    # a tiny slab bound forces column slabs narrower than one chunk
    # float64 tiles of 64 rows (the last of 11), column slabs of 5 columns
    cache = build_gram_cache(
        store,
        tmp_path / "grams",
        mode="full",
        device="cpu",
        storage="float64",
        tile_size=64,
        max_slab_bytes=64 * 8 * 5,
    )
    assert cache.mode == "full" and cache.attrs["stored"] == "linear_gram"
    for name in FEATURES:
        gram = cache.full_gram(name)
        assert gram.shape == (N, N) and gram.dtype == np.float64
        assert_close(gram, linear_gram(stored(store, name)), f"full {name}")
    with pytest.raises(GramCacheError, match="full-mode cache"):
        next(cache.iter_batches())


# --------------------------------------------------------------------------- partitions


def test_epoch_partitions_depend_only_on_seed_n_and_m(tmp_path):
    a = make_store(tmp_path / "a", seed=1)
    b = make_store(tmp_path / "b", seed=2)  # other data, same n
    ca = build_gram_cache(a, tmp_path / "ga", batch_size=M, epochs=3, seed=5, device="cpu")
    cb = build_gram_cache(b, tmp_path / "gb", batch_size=M, epochs=3, seed=5, device="cpu")
    cc = build_gram_cache(a, tmp_path / "gc", batch_size=M, epochs=3, seed=6, device="cpu")
    assert ca.partition == cb.partition
    assert ca.partition["epoch_seeds"][0] is None
    assert ca.partition["sha256"] != cc.partition["sha256"]
    assert ca.partition["epoch_seeds"][1:] != cc.partition["epoch_seeds"][1:]
    check_compatible([ca, cb])
    with pytest.raises(IncompatibleGramCachesError, match="different partitions.*epoch_seeds"):
        check_compatible([ca, cc])
    # the permuted epochs are permutations of all rows, different from each other
    seeds = ca.partition["epoch_seeds"]
    orders = [np.random.default_rng(s).permutation(N) for s in seeds[1:]]
    assert not np.array_equal(orders[0], orders[1])


def test_partial_caches_merge_bit_for_bit_into_one_pass(tmp_path):
    store = make_store(tmp_path / "store")
    settings = {"batch_size": M, "epochs": 2, "seed": 3, "device": "cpu"}
    whole = build_gram_cache(store, tmp_path / "whole", **settings)
    parts = [
        build_gram_cache(store, tmp_path / f"part{i}", rows=rows, **settings)
        for i, rows in enumerate([(0, 48), (48, 120), (120, N)])
    ]
    assert list(parts[1].batches) == [2, 3, 4, 11, 12, 13]
    merged = merge_gram_caches(parts[::-1], tmp_path / "merged")  # any order of parts
    assert list(merged.batches) == list(whole.batches)
    assert merged.partition == whole.partition
    for name in (f"{group}/{layer}" for group in ("grams", "grams_last") for layer in FEATURES):
        a = zarr.open_group(str(tmp_path / "whole"))[name][...]
        b = zarr.open_group(str(tmp_path / "merged"))[name][...]
        assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(
        zarr.open_group(str(tmp_path / "merged"))["batch_index"][...], whole.batches
    )
    check_compatible([whole, merged])
    with pytest.raises(IncompatibleGramCachesError, match="holds batches 2-4,11-13"):
        check_compatible([parts[1], whole])


def test_merge_refuses_overlaps_and_mismatches(tmp_path):
    store = make_store(tmp_path / "store")
    other = make_store(tmp_path / "other", sample_ids=np.arange(N) + 1)
    settings = {"batch_size": M, "device": "cpu"}
    first = build_gram_cache(store, tmp_path / "p0", rows=(0, 96), **settings)
    overlapping = build_gram_cache(store, tmp_path / "p1", rows=(72, N), **settings)
    with pytest.raises(IncompatibleGramCachesError, match="batch 3 is in both"):
        merge_gram_caches([first, overlapping], tmp_path / "m1")
    resized = build_gram_cache(store, tmp_path / "p2", rows=(96, N), batch_size=32, device="cpu")
    with pytest.raises(IncompatibleGramCachesError, match="differ in partition"):
        merge_gram_caches([first, resized], tmp_path / "m2")
    foreign = build_gram_cache(other, tmp_path / "p3", rows=(96, N), **settings)
    with pytest.raises(IncompatibleGramCachesError, match="differ in store"):
        merge_gram_caches([first, foreign], tmp_path / "m3")
    with pytest.raises(IncompatibleGramCachesError, match="different sample ids"):
        check_compatible([first, foreign])


# --------------------------------------------------------------------------- refusals


def test_bad_arguments_are_refused_with_clear_messages(tmp_path):
    store = make_store(tmp_path / "store")
    out = tmp_path / "grams"
    with pytest.raises(GramCacheError, match="batch_size must be an integer >= 4"):
        build_gram_cache(store, out, batch_size=3)
    with pytest.raises(GramCacheError, match=f"larger than the store's {N} samples"):
        build_gram_cache(store, out, batch_size=N + 1)
    with pytest.raises(GramCacheError, match=r"no layer\(s\) \['nope'\]; its layers are"):
        build_gram_cache(store, out, layers=["nope"])
    with pytest.raises(GramCacheError, match="batch boundaries"):
        build_gram_cache(store, out, batch_size=M, rows=(10, 48))
    with pytest.raises(GramCacheError, match="partial full-mode cache holds tile rows"):
        build_gram_cache(store, out, mode="full", rows=(0, 48))
    with pytest.raises(GramCacheError, match="kernel must be one of"):
        build_gram_cache(store, out, kernel="cosine")
    assert not out.exists()
    incomplete = make_store(tmp_path / "incomplete", complete=False)
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        build_gram_cache(incomplete, out, batch_size=M)
    opened = ActivationStore.open(incomplete, allow_incomplete=True)
    with pytest.raises(IncompleteError, match="incomplete.*finish its extraction"):
        build_gram_cache(opened, out, batch_size=M)


def test_incomplete_and_foreign_caches_are_refused(tmp_path):
    store = make_store(tmp_path / "store")
    build_gram_cache(store, tmp_path / "grams", batch_size=M, device="cpu")
    zarr.open_group(str(tmp_path / "grams"), mode="r+").attrs["complete"] = False
    with pytest.raises(IncompleteError, match="incomplete"):
        GramCache.open(tmp_path / "grams")
    # an existing cache is replaced only on request; anything but a Gram cache never
    with pytest.raises(GramCacheError, match="already exists; pass --overwrite"):
        build_gram_cache(store, tmp_path / "grams", batch_size=M, device="cpu")
    rebuilt = build_gram_cache(
        store, tmp_path / "grams", batch_size=M, device="cpu", overwrite=True
    )
    assert rebuilt.attrs["complete"] is True
    with pytest.raises(GramCacheError, match="not a Gram cache"):
        build_gram_cache(store, store, batch_size=M, device="cpu", overwrite=True)
    assert ActivationStore.open(store).n_samples == N
    with pytest.raises(GramCacheError, match="not a ckapipe Gram cache"):
        GramCache.open(store)


# --------------------------------------------------------------------------- CLI


def test_cli_gram_and_merge(tmp_path):
    store = make_store(tmp_path / "store")
    runner = CliRunner()
    for rows, out in (("0:96", "p0"), ("96:", "p1")):
        result = runner.invoke(
            main,
            ["gram", str(store), "-m", str(M), "--epochs", "2", "--rows", rows, "--device", "cpu",
             "--out", str(tmp_path / out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["merge-grams", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m")],
    )
    assert result.exit_code == 0, result.output
    assert "18 of 18 batches" in result.output
    single = runner.invoke(
        main, ["gram", str(store), "-m", str(M), "--epochs", "2", "--out", str(tmp_path / "s")]
    )
    assert single.exit_code == 0, single.output
    for name in (f"{group}/{layer}" for group in ("grams", "grams_last") for layer in FEATURES):
        a = zarr.open_group(str(tmp_path / "s"))[name][...]
        b = zarr.open_group(str(tmp_path / "m"))[name][...]
        assert a.tobytes() == b.tobytes()


def test_cli_usage_errors_are_one_line_messages(tmp_path):
    store = make_store(tmp_path / "store")
    runner = CliRunner()
    result = runner.invoke(main, ["gram", str(store), "-m", "3", "--out", str(tmp_path / "g")])
    assert result.exit_code != 0 and "batch_size must be an integer >= 4" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["gram", str(store), "--rows", "9", "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "START:STOP" in result.output
    result = runner.invoke(
        main, ["gram", str(store), "--layers", "nope", "--out", str(tmp_path / "g")]
    )
    assert result.exit_code == 1 and "its layers are ['narrow', 'wide']" in result.output


# --------------------------------------------------------------------------- one rule for the math


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cached_grams_equal_the_estimators_u_centered_gram(tmp_path, kernel):
    # the cache and MinibatchCKA must form Ũ(K_b) the same way, the short last batch included
    store = make_store(tmp_path / "store", dtype="float32")
    cache = build_gram_cache(
        store,
        tmp_path / "grams",
        batch_size=M,
        epochs=2,
        kernel=kernel,
        device="cpu",
        precision="float64",
        storage="float64",
    )
    rows = expected_batch_rows(N, M, 2, cache.partition["epoch_seeds"])
    assert sorted({len(r) for r in rows.values()}) == [11, M]
    for name in FEATURES:
        values = torch.from_numpy(stored(store, name))
        for number, grams in cache.iter_batches(layers=[name]):
            expected = u_centered_gram(values[rows[number]], kernel=kernel).numpy()
            error = np.abs(grams[0].numpy() - expected).max() / np.abs(expected).max()
            assert error <= 1e-12, f"{kernel} {name} batch {number}: relative error {error:.3g}"


def test_a_remainder_of_one_to_three_rows_is_dropped_recorded_and_warned(tmp_path):
    store = make_store(tmp_path / "store")  # 203 = 5 * 40 + 3
    with pytest.warns(RemainderDroppedWarning, match=r"last 3 of each epoch .*200 of 203 used"):
        cache = build_gram_cache(store, tmp_path / "grams", batch_size=40, epochs=2, device="cpu")
    assert cache.samples_used == 200 and cache.n_samples == N and cache.dropped_rows == 3
    assert cache.batch_sizes.tolist() == [40] * 10
    assert cache.attrs["samples_used"] == 200
    result = CliRunner().invoke(
        main, ["gram", str(store), "-m", "40", "--device", "cpu", "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert "Warning: " in result.output and "the last 3 of each epoch" in result.output
    assert "200 of 203 samples used" in result.output


# --------------------------------------------------------------------------- format on the base


def test_deleted_chunk_is_refused_naming_the_array_and_chunk(tmp_path):
    store = make_store(tmp_path / "store")
    build_gram_cache(store, tmp_path / "grams", batch_size=M, device="cpu")
    (tmp_path / "grams" / "grams" / "wide" / "c" / "3" / "0" / "0").unlink()
    with pytest.raises(IntegrityError, match=r"array 'grams/wide' .* grams/wide/c/3/0/0"):
        GramCache.open(tmp_path / "grams")
    assert issubclass(GramCacheError, FormatError)


def test_read_batches_into_equals_zarr_reads_and_refuses_a_damaged_chunk(tmp_path):
    store = make_store(tmp_path / "store")
    cache = build_gram_cache(store, tmp_path / "grams", batch_size=M, device="cpu")
    numbers = [
        int(b) for b in cache.batches if cache.batch_sizes[list(cache.batches).index(b)] == M
    ]
    out = np.full((len(numbers), len(cache.layer_names), M, M), np.nan)
    cache.read_batches_into(numbers, out)
    for g, number in enumerate(numbers):
        for i, layer in enumerate(cache.layer_names):
            np.testing.assert_array_equal(out[g, i], cache.batch_gram(layer, number))
    # a flipped byte fails the chunk's CRC-32C: zarr reads it instead and refuses it
    chunk = tmp_path / "grams" / "grams" / "wide" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum"):
        GramCache.open(tmp_path / "grams").read_batches_into(numbers, out)


def test_format_version_1_is_refused_with_rebuild_advice(tmp_path):
    store = make_store(tmp_path / "store")
    build_gram_cache(store, tmp_path / "grams", batch_size=M, device="cpu")
    zarr.open_group(str(tmp_path / "grams"), mode="r+").attrs["format_version"] = 1
    with pytest.raises(GramCacheError, match=r"format version 1.*rebuild it .*`ckapipe gram"):
        GramCache.open(tmp_path / "grams")


# A real `ckapipe gram` process that, once it has read two blocks of the store (so its output is
# being written), announces itself (marker file) and waits for a release file: a build certainly
# in progress, without a test hook in ckapipe.
PAUSED_GRAM = """
import pathlib, sys, time
import ckapipe.analyze.gram_build as gram_build
from ckapipe.cli import main
marker, release = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
iter_blocks = gram_build.iter_blocks
def paused(*args, **kwargs):
    for count, block in enumerate(iter_blocks(*args, **kwargs)):
        if count == 2 and not marker.exists():
            marker.write_text("writing")
            while not release.exists():
                time.sleep(0.02)
        yield block
gram_build.iter_blocks = paused
main(sys.argv[3:], prog_name="ckapipe")
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _paused_gram(tmp_path, args):
    marker, release = tmp_path / "marker", tmp_path / "release"
    marker.unlink(missing_ok=True)
    release.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSED_GRAM, str(marker), str(release), "gram", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the paused build never started writing"
        time.sleep(0.02)
    return process, release


def _gram(args):
    command = [sys.executable, "-m", "ckapipe.cli", "gram", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


def _self_cka(path):
    cache = GramCache.open(path)
    accumulator = MinibatchCKA(cache.layer_names)
    for _, grams in cache.iter_batches():
        accumulator.update_grams(grams)
    return np.diagonal(accumulator.compute())


def test_a_second_concurrent_build_is_refused_at_once_naming_the_pid(tmp_path):
    store = make_store(tmp_path / "store", dtype="float32")
    out = tmp_path / "grams"
    common = [str(store), "-m", str(M), "--device", "cpu", "--out", str(out)]
    first, release = _paused_gram(tmp_path, [*common, "--kernel", "linear"])
    second = _gram([*common, "--kernel", "rbf"])  # while the first one is mid-build
    release.write_text("go")
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), second.stderr
    assert f"pid {first.pid}" in lines[0] and "one writer at a time" in lines[0]
    cache = GramCache.open(out)
    assert cache.kernel == "linear" and cache.samples_used == N
    np.testing.assert_allclose(_self_cka(out), 1.0, rtol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".grams")) == [
        ".grams.lock"
    ]


@pytest.mark.slow
def test_racing_builds_exactly_one_succeeds_and_the_cache_is_consistent(tmp_path):
    store = make_store(tmp_path / "store", dtype="float32")
    out = tmp_path / "grams"
    common = [sys.executable, "-m", "ckapipe.cli", "gram", str(store), "-m", str(M)]
    processes = [
        subprocess.Popen(
            [*common, "--kernel", kernel, "--device", "cpu", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for kernel in ("rbf", "linear")
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (loser,) = [err for code, _, err in results if code]
    lines = loser.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), loser
    assert "being written by another process" in lines[0] or "already exists" in lines[0]
    (winner,) = [i for i, (code, _, _) in enumerate(results) if code == 0]
    cache = GramCache.open(out)
    assert cache.kernel == ("rbf", "linear")[winner]
    np.testing.assert_allclose(_self_cka(out), 1.0, rtol=1e-12)


@pytest.mark.slow
def test_a_killed_build_leaves_no_cache_or_the_previous_one_intact(tmp_path):
    store = make_store(tmp_path / "store", dtype="float32")
    out = tmp_path / "grams"
    common = [str(store), "-m", str(M), "--epochs", "2", "--device", "cpu", "--out", str(out)]
    process, _ = _paused_gram(tmp_path, common)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not out.exists()
    with pytest.raises(GramCacheError, match="no zarr.json"):
        GramCache.open(out)
    # the lock died with the process: a new build runs and clears the dead one's staging folder
    previous = _gram(common)
    assert previous.returncode == 0, previous.stderr
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    process, _ = _paused_gram(tmp_path, [*common, "--kernel", "rbf", "--overwrite"])
    assert (tmp_path / ".grams.staging").is_dir()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert GramCache.open(out).kernel == "linear"
    replaced = _gram([*common, "--kernel", "rbf", "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr
    assert GramCache.open(out).kernel == "rbf"
    assert not (tmp_path / ".grams.staging").exists()
    assert not (tmp_path / ".grams.replaced").exists()


# --------------------------------------------------------------------------- float32 products


def _offset_relu_features(n: int, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """Post-ReLU features on top of per-feature means spread 100x (10 to 1000) over a unit
    spread: the case where products of uncentered float32 features lose the signal."""
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(n, 16))
    return {
        name: (
            np.maximum(rng.normal(size=(n, w)) + shared @ rng.normal(size=(16, w)) / 4, 0)
            + np.geomspace(10, 1000, w)
        ).astype(np.float32)
        for name, w in widths.items()
    }


def _all_pairs_cka(batches: list[dict[str, np.ndarray]]) -> dict[tuple[str, str], float]:
    """Minibatch CKA of every layer pair from per-batch Ũ Grams (float64 arithmetic)."""

    def hsic(a, b):
        return np.mean([(batch[a] * batch[b]).sum() for batch in batches])

    names = list(batches[0])
    return {(a, b): hsic(a, b) / np.sqrt(hsic(a, a) * hsic(b, b)) for a in names for b in names}


def _cache_cka(cache) -> dict[tuple[str, str], float]:
    names = cache.layer_names
    return _all_pairs_cka(
        [
            dict(zip(names, (g.numpy() for g in grams), strict=True))
            for _, grams in cache.iter_batches()
        ]
    )


@pytest.mark.parametrize("features", ["offset_relu", "cnn"])
def test_default_float32_products_keep_cka_within_1e_6_of_float64(tmp_path, features):
    """The defaults (float32 products of float32-shifted tiles, float64 sums, float32 storage)
    against float64 products and storage, on float32 stores: every pair's CKA within 1e-6."""
    n = 512
    if features == "offset_relu":
        data = _offset_relu_features(n, {"a": 300, "b": 700})
    else:
        data = small_cnn_relus(n)
    store = float32_store(tmp_path / "store", data)
    default = build_gram_cache(store, tmp_path / "f32", batch_size=64, device="cpu")
    assert default.attrs["precision"] == "float32"
    assert default.storage_dtype == "float32"
    exact = build_gram_cache(
        store,
        tmp_path / "f64",
        batch_size=64,
        device="cpu",
        precision="float64",
        storage="float64",
    )
    assert exact.attrs["precision"] == "float64" and exact.storage_dtype == "float64"
    got, want = _cache_cka(default), _cache_cka(exact)
    worst = max(abs(got[pair] - want[pair]) for pair in want)
    assert worst <= 1e-6, worst


def test_uncentered_float32_products_miss_the_1e_6_bar():
    """Power check of the test above: the same offset features, multiplied in float32 without
    the shift first, move CKA by far more than 1e-6."""
    data = _offset_relu_features(512, {"a": 300, "b": 700})
    m = 64
    batches = {"exact": [], "uncentered": []}
    for k in range(512 // m):
        exact, uncentered = {}, {}
        for name, x in data.items():
            tile = torch.from_numpy(x[k * m : (k + 1) * m])
            exact[name] = centered_batch_gram(tile.double() @ tile.double().T).numpy()
            uncentered[name] = centered_batch_gram((tile @ tile.T).double()).numpy()
        batches["exact"].append(exact)
        batches["uncentered"].append(uncentered)
    exact, uncentered = (_all_pairs_cka(batches[key]) for key in ("exact", "uncentered"))
    assert max(abs(uncentered[pair] - exact[pair]) for pair in exact) > 1e-4
