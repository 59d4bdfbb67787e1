"""The Gram pass's speed-ups change no bit: the reused tile workspace and the writer thread.

Equality is exact (``np.array_equal`` / ``torch.equal``): the workspace holds the same cast and
shift as a fresh tensor, and the writer thread runs the same U-centering and writes on the
same Grams; only where and when differ.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

import ckapipe.store as store_module
from ckapipe.analyze import estimators, gram_build, pass_overlap
from ckapipe.analyze.estimators import TileWorkspace, add_shifted_products, centered_batch_gram
from ckapipe.analyze.gram_cache import GramCache, GramCacheError, build_gram_cache
from ckapipe.analyze.loader import column_ranges
from ckapipe.analyze.partition import batch_span, make_partition
from ckapipe.analyze.pass_overlap import BatchWriter, run_ahead
from ckapipe.store import ActivationStore, LayerRecord

FEATURES = {"narrow": 7, "wide": 300}
N, M = 100, 24  # 4 batches of 24 and a last one of 4 rows


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 4 KiB chunks: the wide layer spans several column tiles, the narrow one several batches
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 4096)


def make_store(path, dtype: str, constant: bool = False):
    rng = np.random.default_rng(3)
    records = [LayerRecord(name, (p,), "flatten", p) for name, p in FEATURES.items()]
    data = {  # post-ReLU-like: a large offset that the shift must remove before the products
        name: np.full((N, p), 3.5, np.float32)
        if constant
        else np.maximum(rng.normal(size=(N, p)) + 2, 0).astype(np.float32) * 10
        for name, p in FEATURES.items()
    }
    store = ActivationStore.create(
        path, layers=records, sample_ids=np.arange(N), dtype=dtype, row_block=16
    )
    store.write_rows(0, data)
    store.set_rows_complete(N)
    store.mark_complete()
    store.close()
    return path


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("product", [torch.float32, torch.float64])
def test_workspace_products_equal_fresh_tensor_products(stored, product):
    """Tiles that grow, shrink and change dtype through one workspace give the same Gram bits
    as a fresh tensor per tile, and the caller's tiles are never modified."""
    generator = torch.Generator().manual_seed(0)
    workspace = TileWorkspace()
    fresh = torch.zeros(16, 16, dtype=torch.float64)
    reused = torch.zeros(16, 16, dtype=torch.float64)
    for width in (40, 300, 5, 300, 129):
        tile = (torch.rand(16, width, generator=generator) * 30 + 100).to(stored)
        before = tile.clone()
        add_shifted_products(fresh, tile, product)
        add_shifted_products(reused, tile, product, workspace)
        assert torch.equal(tile, before)
        assert torch.equal(reused, fresh), width
    assert fresh.abs().max() > 0
    other = torch.float64 if product == torch.float32 else torch.float32
    tile = (torch.rand(16, 33, generator=generator) + 5).to(stored)
    add_shifted_products(fresh, tile, other)
    add_shifted_products(reused, tile, other, workspace)  # the workspace switches dtype
    assert torch.equal(reused, fresh)


def _writer_modes(monkeypatch) -> list[bool]:
    """Records whether each BatchWriter ran its writes on the writer thread."""
    modes = []
    original = BatchWriter.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        modes.append(self.background)

    monkeypatch.setattr(BatchWriter, "__init__", recording)
    return modes


def _free_cores(monkeypatch, free: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: torch.get_num_threads() + free)


def _reference_epoch0(path, kernel: str, product: torch.dtype) -> dict[tuple[str, int], np.ndarray]:
    """Each epoch-0 batch's Ũ Gram the way the pass formed it before the speed-ups: a fresh
    tensor per column tile (no workspace), the U-centering inline."""
    store = ActivationStore.open(path)
    partition = make_partition(N, M, 1, 0)
    expected = {}
    for name in store.layer_names:
        raw = torch.from_numpy(np.asarray(store.array(name)[...]))
        if store.dtype == "bfloat16":
            raw = raw.view(torch.bfloat16)
        for k in range(partition["batches_per_epoch"]):
            a, b = batch_span(partition, k)
            gram = torch.zeros(b - a, b - a, dtype=torch.float64)
            for c0, c1 in column_ranges(raw.shape[1], store.chunk_shape(name)[1]):
                add_shifted_products(gram, raw[a:b, c0:c1].contiguous(), product)
            expected[name, k] = centered_batch_gram(gram, kernel=kernel).numpy()
    return expected


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(("kernel", "precision"), [("linear", "float32"), ("rbf", "float64")])
def test_background_and_inline_writes_build_the_same_cache(
    tmp_path, monkeypatch, dtype, kernel, precision
):
    """With a core free of torch's threads the batches are finished and written on a writer
    thread; the cache is bit-for-bit the inline one and the pre-speed-up computation."""
    path = make_store(tmp_path / "store", dtype)
    modes = _writer_modes(monkeypatch)
    preparers = set()  # threads that shifted tiles

    def recording_shift(*args, **kwargs):
        preparers.add(threading.current_thread().name.rsplit("_", 1)[0])
        return estimators.shifted_tile(*args, **kwargs)

    monkeypatch.setattr(gram_build, "shifted_tile", recording_shift)
    options = {"batch_size": M, "epochs": 2, "kernel": kernel, "precision": precision}
    _free_cores(monkeypatch, 1)
    background = build_gram_cache(path, tmp_path / "bg", device="cpu", **options)
    _free_cores(monkeypatch, 0)
    inline = build_gram_cache(path, tmp_path / "inline", device="cpu", **options)
    assert modes == [True, False]
    assert preparers == {"ckapipe-gram-prepare", "MainThread"}
    assert background.layer_names == inline.layer_names == list(FEATURES)
    assert len(background.batches) == 10  # 2 epochs of 5, the permuted epoch included
    for name in FEATURES:
        for b in background.batches:
            assert np.array_equal(background.batch_gram(name, b), inline.batch_gram(name, b))
    product = torch.float64 if precision == "float64" else torch.float32
    assert background.storage_dtype == "float32"  # the default: each Ũ rounded once
    for (name, k), gram in _reference_epoch0(path, kernel, product).items():
        stored = gram.astype(np.float32).astype(np.float64)
        assert np.array_equal(background.batch_gram(name, k), stored), (name, k)
        assert np.abs(gram).max() > 0


def test_a_failed_background_write_raises_its_named_error_and_leaves_no_cache(
    tmp_path, monkeypatch
):
    """An undefined RBF bandwidth found on the writer thread is the error an inline write
    raises, and the staged cache is gone (no write may outlive the error)."""
    path = make_store(tmp_path / "store", "float16", constant=True)
    modes = _writer_modes(monkeypatch)
    _free_cores(monkeypatch, 1)
    with pytest.raises(GramCacheError, match=r"layer 'narrow', batch 0: .*median"):
        build_gram_cache(path, tmp_path / "rbf", batch_size=M, kernel="rbf", device="cpu")
    assert modes == [True]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["store"]  # neither the cache nor its staging folder
    cache = build_gram_cache(path, tmp_path / "linear", batch_size=M, device="cpu")
    assert isinstance(cache, GramCache) and not cache.batch_gram("wide", 0).any()


class _Recorder:
    def __init__(self):
        self.written: list[tuple[str, int]] = []
        self.threads: set[str] = set()

    def write(self, layer: str, batch: int, gram: np.ndarray) -> None:
        self.written.append((layer, batch))
        self.threads.add(threading.current_thread().name)


def _slow_finish(gram, layer, batch):
    time.sleep(0.02)
    return gram.numpy()


def test_an_error_in_the_pass_drops_pending_writes_and_waits_for_the_running_one():
    recorder = _Recorder()
    with pytest.raises(RuntimeError, match="products failed"):
        with BatchWriter(recorder, _slow_finish, background=True) as writer:
            for batch in range(20):
                writer.write("layer", batch, torch.zeros(4, 4, dtype=torch.float64))
            raise RuntimeError("products failed")
    done = len(recorder.written)
    time.sleep(0.1)
    assert len(recorder.written) == done < 20  # nothing was written after the error
    assert recorder.threads == {"ckapipe-gram-write_0"}


def test_writes_keep_their_order_and_bound_the_pending_grams(monkeypatch):
    monkeypatch.setattr(pass_overlap, "MAX_PENDING_BYTES", 3 * 4 * 4 * 8)  # three 4×4 Grams
    recorder = _Recorder()
    with BatchWriter(recorder, _slow_finish, background=True) as writer:
        for batch in range(8):
            writer.write("layer", batch, torch.zeros(4, 4, dtype=torch.float64))
            assert len(writer._pending) <= 3  # noqa: SLF001 - the bound under test
        writer.write("layer", 8, torch.zeros(8, 8, dtype=torch.float64))  # alone over the bound
        assert len(writer._pending) == 1  # noqa: SLF001
    assert recorder.written == [("layer", b) for b in range(9)]


def test_run_ahead_keeps_order_raises_errors_and_stops_its_source():
    def numbers(log):
        try:
            for i in range(6):
                log.append(threading.current_thread().name)
                if i == 4:
                    raise ValueError("bad block 4")
                yield i
        finally:
            log.append("closed")

    inline_log: list[str] = []
    with pytest.raises(ValueError, match="bad block 4"):
        list(run_ahead(numbers(inline_log), False))
    assert set(inline_log[:-1]) == {"MainThread"} and inline_log[-1] == "closed"
    log: list[str] = []
    seen = []
    with pytest.raises(ValueError, match="bad block 4"):
        for value in run_ahead(numbers(log), True):
            seen.append(value)
    assert seen == [0, 1, 2, 3] and log[-1] == "closed"
    assert set(log[:-1]) == {"ckapipe-gram-prepare_0"}

    log = []
    ahead = run_ahead(numbers(log), True)
    assert next(ahead) == 0
    ahead.close()  # the caller stops early: the item in progress finishes, the source closes
    assert log[-1] == "closed" and len(log) == 3  # items 0 and 1 computed, then closed
