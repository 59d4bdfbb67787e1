"""The chunk-aligned prefetching loader, checked against the stored arrays read back with zarr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import ckapipe.store as store_module
from ckapipe.analyze.loader import (
    BlockRequest,
    column_ranges,
    iter_blocks,
    iter_column_slabs,
    iter_row_blocks,
    resolve_device,
)
from ckapipe.store import ActivationStore, LayerRecord, StoreError

LAYERS = {"narrow": 7, "wide": 300}


@pytest.fixture
def small_chunks(monkeypatch):
    # 4 KiB chunks instead of 16 MiB: a tiny store then has many chunks along both axes
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 4096)


def make_store(path, n=203, dtype="float16", row_block=16, seed=0):
    rng = np.random.default_rng(seed)
    records = [LayerRecord(name, (p,), "flatten", p) for name, p in LAYERS.items()]
    data = {
        name: (rng.normal(size=(n, p)) * 3 + 1).astype(np.float32) for name, p in LAYERS.items()
    }
    store = ActivationStore.create(
        path, layers=records, sample_ids=rng.permutation(n) + 1000, dtype=dtype, row_block=row_block
    )
    store.write_rows(0, data)
    store.set_rows_complete(n)
    store.mark_complete()
    store.close()
    return ActivationStore.open(path)


def stored_values(path, name) -> np.ndarray:
    """The layer as float32, read straight from zarr (bfloat16 bits decoded here)."""
    raw = zarr.open_group(str(path), mode="r")["layers"][name][...]
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def as_float32(tensor: torch.Tensor) -> np.ndarray:
    """A copy (float32 input would otherwise share the loader's reused buffer)."""
    return tensor.to(torch.float32).cpu().numpy().copy()


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_row_blocks_yield_every_row_once_in_order(tmp_path, small_chunks, dtype, prefetch):
    store = make_store(tmp_path / "s", dtype=dtype)
    assert store.chunk_shape("wide")[0] < 203 and store.chunk_shape("wide")[1] < 300
    expected = {name: stored_values(tmp_path / "s", name) for name in LAYERS}
    seen = {name: [] for name in LAYERS}
    starts = []
    for block in iter_row_blocks(store, 37, prefetch=prefetch, threads=3):
        a, b = block.request.rows
        starts.append(a)
        for name, tensor in block.arrays.items():
            assert tensor.shape == (b - a, LAYERS[name])
            seen[name].append(as_float32(tensor))  # copied: the buffer is reused
    assert starts == list(range(0, 203, 37))
    for name in LAYERS:
        np.testing.assert_array_equal(np.concatenate(seen[name]), expected[name])


@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_buffers_are_reused_not_grown(tmp_path, small_chunks, prefetch):
    store = make_store(tmp_path / "s")
    pointers = set()
    n_blocks = 0
    for block in iter_row_blocks(store, 16, layers=["wide"], prefetch=prefetch):
        pointers.add(block.tensors[0].data_ptr())
        n_blocks += 1
    assert n_blocks == 13
    assert len(pointers) == prefetch + 1  # a ring of prefetch + 1 slots, whatever n is


def test_column_slabs_are_full_height_and_chunk_aligned(tmp_path, small_chunks):
    store = make_store(tmp_path / "s")
    column_chunk = store.chunk_shape("wide")[1]
    expected = stored_values(tmp_path / "s", "wide")
    got = np.zeros_like(expected)
    covered = np.zeros(300, dtype=int)
    for block in iter_column_slabs(store, "wide", max_slab_bytes=10**9):
        _, c0, c1 = block.request.parts[0]
        assert c0 % column_chunk == 0 and (c1 % column_chunk == 0 or c1 == 300)
        assert block.tensors[0].shape == (203, c1 - c0)
        got[:, c0:c1] = as_float32(block.tensors[0])
        covered[c0:c1] += 1
    assert (covered == 1).all()
    np.testing.assert_array_equal(got, expected)


def test_column_slabs_narrower_than_a_chunk_when_memory_is_capped(tmp_path, small_chunks):
    store = make_store(tmp_path / "s")
    column_chunk = store.chunk_shape("wide")[1]
    cap = 203 * 2 * 10  # ten float16 columns of full height
    widths = [b.tensors[0].shape[1] for b in iter_column_slabs(store, "wide", max_slab_bytes=cap)]
    assert max(widths) == 10 < column_chunk
    assert sum(widths) == 300


def test_column_ranges_follow_the_chunk_grid():
    assert column_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert column_ranges(10, 4, width=9) == [(0, 8), (8, 10)]  # rounded down to whole chunks
    assert column_ranges(10, 4, width=3) == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 10)]


def test_multi_part_request_and_tag(tmp_path, small_chunks):
    store = make_store(tmp_path / "s", dtype="bfloat16")
    request = BlockRequest((5, 150), (("wide", 33, 250), ("narrow", 0, 7)), tag="x")
    (block,) = list(iter_blocks(store, [request]))
    assert block.request.tag == "x"
    assert block.tensors[0].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        as_float32(block.tensors[0]), stored_values(tmp_path / "s", "wide")[5:150, 33:250]
    )
    np.testing.assert_array_equal(
        as_float32(block.tensors[1]), stored_values(tmp_path / "s", "narrow")[5:150]
    )


def test_stopping_early_releases_the_pool(tmp_path, small_chunks):
    store = make_store(tmp_path / "s")
    blocks = iter_row_blocks(store, 16, prefetch=3)
    first = next(blocks)
    assert first.request.rows == (0, 16)
    blocks.close()  # must not hang or leak reads into freed buffers


def test_bad_requests_are_refused(tmp_path, small_chunks):
    store = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="outside store"):
        list(iter_blocks(store, [BlockRequest((0, 204), (("wide", 0, 300),))]))
    with pytest.raises(StoreError, match=r"layer 'wide': column range 0:301"):
        list(iter_blocks(store, [BlockRequest((0, 10), (("wide", 0, 301),))]))
    with pytest.raises(StoreError, match="its layers are"):
        list(iter_blocks(store, [BlockRequest((0, 10), (("nope", 0, 1),))]))
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        list(iter_row_blocks(store, 16, prefetch=0))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_blocks_equal_stored_values(tmp_path, small_chunks, dtype):
    store = make_store(tmp_path / "s", dtype=dtype)
    expected = stored_values(tmp_path / "s", "wide")
    parts = []
    for block in iter_row_blocks(store, 16, layers=["wide"], device="cuda", prefetch=2):
        tensor = block.tensors[0]
        assert tensor.is_cuda
        # slow consumer work on the default stream: the next copy must not overtake it
        parts.append((tensor.to(torch.float32) * 1.0).cpu().numpy())
    np.testing.assert_array_equal(np.concatenate(parts), expected)
