"""The activation store format (ckapipe.store) on real zarr stores in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from ckapipe.store import (
    FLOAT16_MAX_REL_ERROR,
    ActivationStore,
    DtypeRangeError,
    IncompleteStoreError,
    LayerRecord,
    StoreError,
    StoreLockedError,
    open_store,
    sample_ids_digest,
)

MB = 2**20


def _layers(*widths: int) -> list[LayerRecord]:
    return [
        LayerRecord(name=f"block{i}.out", shape=(w,), reduction="flatten", n_features=w)
        for i, w in enumerate(widths)
    ]


def _write_all(store: ActivationStore, data: dict[str, np.ndarray], block: int) -> None:
    n = store.n_samples
    for start in range(0, n, block):
        stop = min(start + block, n)
        store.write_rows(start, {name: values[start:stop] for name, values in data.items()})
        store.set_rows_complete(stop)
    store.mark_complete()


def _float16_reference(values: np.ndarray, row_block: int) -> np.ndarray:
    """A float16 store's logical values, recomputed here: offsets from the first row block,
    a power-of-two scale for residual RMS ~1, float16 residuals, decoded in float32."""
    x = np.asarray(values, dtype=np.float64)
    offsets = x[:row_block].mean(axis=0).astype(np.float32)
    residual = x - offsets.astype(np.float64)
    rms = np.sqrt(np.mean(np.square(residual[:row_block])))
    scale = 2.0 ** round(np.log2(rms)) if rms > 0 else 1.0
    stored = (residual / scale).astype(np.float16)
    return stored.astype(np.float64) * scale + offsets.astype(np.float64)


def _bfloat16_reference(values: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (8 significant bits, round half to even) in float64 arithmetic."""
    x = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(x)
    nonzero = x != 0
    magnitude = np.abs(x[nonzero])
    # exponent of the leading bit; bfloat16 shares float32's minimum normal exponent (-126)
    exponent = np.maximum(np.floor(np.log2(magnitude)), -126.0)
    ulp = np.exp2(exponent - 7.0)
    out[nonzero] = np.sign(x[nonzero]) * np.round(magnitude / ulp) * ulp  # np.round: half to even
    return out


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_float(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    n = 70
    data = {"block0.out": rng.normal(size=(n, 5)), "block1.out": rng.normal(size=(n, 3)) * 100}
    ids = rng.permutation(200)[:n]
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(5, 3), sample_ids=ids, dtype=dtype, row_block=16
    ) as store:
        _write_all(store, data, block=16)
    reader = ActivationStore.open(tmp_path / "s")
    assert reader.dtype == dtype
    assert reader.n_samples == n
    np.testing.assert_array_equal(reader.sample_ids, ids)
    assert reader.sample_ids.dtype == np.int64
    for name, values in data.items():
        got = reader.read(name)
        assert got.dtype == (np.float32 if dtype == "float32" else np.float64)
        # float32: only the cast; float16: the offset/scale encoding, recomputed independently
        expected = (
            values.astype(np.float32) if dtype == "float32" else _float16_reference(values, 16)
        )
        np.testing.assert_array_equal(got, expected)
        part = reader.read(name, rows=slice(10, 37), cols=slice(1, 3))
        np.testing.assert_array_equal(part, expected[10:37, 1:3])
    assert reader.array("block0.out").dtype == np.dtype(dtype)


def test_round_trip_bfloat16_rounds_to_nearest_even(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    random_values = (rng.normal(size=300) * np.exp2(rng.integers(-20, 20, size=300))).astype(
        np.float32
    )
    # exact halfway cases: low 16 bits 0x8000, with even and odd upper halves, both signs
    upper = np.array([0x3F80, 0x3F81, 0x4049, 0x404A, 0xBF80, 0xBF81], dtype=np.uint32)
    halfway = ((upper << 16) | 0x8000).view(np.float32)
    just_above = ((upper << 16) | 0x8001).view(np.float32)
    just_below = ((upper << 16) | 0x7FFF).view(np.float32)
    tiny = np.array([1e-40, -3e-39, 1.2e-38, 0.0], dtype=np.float32)  # subnormals and zero
    carry = np.array([np.float32(1.9999999), np.float32(255.99)], dtype=np.float32)
    values = np.concatenate([random_values, halfway, just_above, just_below, tiny, carry])
    n = values.size
    data = values.reshape(n, 1)
    with ActivationStore.create(
        tmp_path / "s",
        layers=_layers(1),
        sample_ids=np.arange(n),
        dtype="bfloat16",
        row_block=64,
    ) as store:
        _write_all(store, {"block0.out": data}, block=64)
    reader = ActivationStore.open(tmp_path / "s")
    raw = reader.array("block0.out")
    assert raw.dtype == np.uint16
    assert raw.attrs["logical_dtype"] == "bfloat16"
    assert reader.dtype == "bfloat16"
    got = reader.read("block0.out")
    assert got.dtype == np.float32
    expected = _bfloat16_reference(values.astype(np.float64)).reshape(n, 1)
    np.testing.assert_array_equal(got.astype(np.float64), expected)
    # halfway cases go to the even neighbour: 0x3F80 stays, 0x3F81 rounds up to 0x3F82
    halfway_bits = raw[random_values.size : random_values.size + upper.size, 0]
    np.testing.assert_array_equal(
        halfway_bits, np.array([0x3F80, 0x3F82, 0x404A, 0x404A, 0xBF80, 0xBF82], dtype=np.uint16)
    )
    # read(out=) with a reused uint16 buffer decodes the same values
    buffer = np.empty((10, 1), dtype=np.uint16)
    np.testing.assert_array_equal(
        reader.read("block0.out", rows=slice(5, 15), out=buffer), got[5:15]
    )


def test_bfloat16_overflow_is_refused_not_stored_as_inf(tmp_path: Path) -> None:
    # float32's largest value rounds past bfloat16's largest finite value (3.39e38)
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(2), sample_ids=np.arange(4) + 10, dtype="bfloat16"
    ) as store:
        values = np.ones((4, 2), dtype=np.float32)
        values[2, 1] = np.finfo(np.float32).max
        with pytest.raises(StoreError, match=r"block0\.out.*sample id 12.*float32"):
            store.write_rows(0, {"block0.out": values})


def test_float32_overflow_from_float64_is_refused(tmp_path: Path) -> None:
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(2), sample_ids=np.arange(4), dtype="float32"
    ) as store:
        values = np.ones((4, 2))
        values[3, 0] = 1e300
        with pytest.raises(StoreError, match=r"block0\.out.*float32's range.*sample id 3"):
            store.write_rows(0, {"block0.out": values})


def test_zstd_codec_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    values = np.maximum(rng.normal(size=(64, 40)), 0)  # post-ReLU-like: half zeros
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(40), sample_ids=np.arange(64), codec="zstd", row_block=32
    ) as store:
        _write_all(store, {"block0.out": values}, block=32)
    reader = ActivationStore.open(tmp_path / "s")
    assert reader.attrs["codec"] == "zstd"
    meta = json.loads((tmp_path / "s/layers/block0.out/zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-2:] == ["zstd", "crc32c"]
    np.testing.assert_array_equal(reader.read("block0.out"), _float16_reference(values, 32))


def test_unknown_codec_and_dtype_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="codec"):
        ActivationStore.create(tmp_path / "a", layers=_layers(2), sample_ids=[0], codec="lz4")
    with pytest.raises(StoreError, match="dtype"):
        ActivationStore.create(tmp_path / "b", layers=_layers(2), sample_ids=[0], dtype="float64")


# -- layout -----------------------------------------------------------------------------------


def test_chunk_shapes_wide_and_narrow(tmp_path: Path) -> None:
    n, row_block = 3000, 256
    layers = [
        LayerRecord("wide", (64, 32, 32), "flatten", 65536),
        LayerRecord("narrow", (10,), "mean", 10),
    ]
    for dtype, itemsize in [("float16", 2), ("float32", 4), ("bfloat16", 2)]:
        path = tmp_path / dtype
        with ActivationStore.create(
            path, layers=layers, sample_ids=np.arange(n), dtype=dtype, row_block=row_block
        ):
            pass
        store = ActivationStore.open(path, allow_incomplete=True)
        rows, cols = store.chunk_shape("wide")
        assert rows % row_block == 0
        assert cols < 65536
        assert 8 * MB <= rows * cols * itemsize <= 32 * MB
        rows, cols = store.chunk_shape("narrow")
        assert cols == 10  # whole rows
        assert rows % row_block == 0
        assert rows >= n  # a narrow layer fits in one chunk here
        assert rows < n + row_block  # but is not padded beyond the last row block


@pytest.mark.parametrize("n_features", [16383, 16500, 20000, 32768, 32769, 200_000, 1_000_000])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_chunk_bytes_stay_in_range_across_widths(
    tmp_path: Path, n_features: int, dtype: str
) -> None:
    itemsize = np.dtype(dtype).itemsize
    layer = LayerRecord("x", (n_features,), "flatten", n_features)
    with ActivationStore.create(
        tmp_path / "s", layers=[layer], sample_ids=np.arange(5000), dtype=dtype
    ) as store:
        rows, cols = store.chunk_shape("x")
    assert rows % 256 == 0
    assert 8 * MB <= rows * cols * itemsize <= 32 * MB, (rows, cols)


def test_narrow_layer_with_many_rows_caps_chunk_bytes(tmp_path: Path) -> None:
    with ActivationStore.create(
        tmp_path / "s",
        layers=[LayerRecord("x", (512,), "flatten", 512)],
        sample_ids=np.arange(100_000),
        dtype="float32",
        row_block=100,
    ) as store:
        rows, cols = store.chunk_shape("x")
    assert cols == 512
    assert rows % 100 == 0
    assert 8 * MB <= rows * cols * 4 <= 32 * MB


def test_dimension_names_in_zarr_metadata(tmp_path: Path) -> None:
    with ActivationStore.create(tmp_path / "s", layers=_layers(3, 4), sample_ids=np.arange(5)):
        pass
    for name in ("block0.out", "block1.out"):
        meta = json.loads((tmp_path / "s" / "layers" / name / "zarr.json").read_text())
        # one feature dimension per layer: layers differ in width, and xarray needs one size
        assert meta["dimension_names"] == ["sample", f"feature:{name}"]
        assert meta["shape"] == [5, 3 if name == "block0.out" else 4]
    meta = json.loads((tmp_path / "s" / "sample_ids" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["sample"]
    assert meta["data_type"] == "int64"


# -- completion --------------------------------------------------------------------------------


def test_incomplete_store_refused_then_allowed(tmp_path: Path) -> None:
    store = ActivationStore.create(
        tmp_path / "s", layers=_layers(2), sample_ids=np.arange(10), row_block=4
    )
    store.write_rows(0, {"block0.out": np.ones((4, 2))})
    store.set_rows_complete(4)
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(4 of 10 rows"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path / "s")
    reader = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert not reader.is_complete
    assert reader.rows_complete == 4
    np.testing.assert_array_equal(reader.read("block0.out", rows=slice(0, 4)), np.ones((4, 2)))
    with pytest.raises(StoreError, match="cannot mark .* complete: 4 of 10"):
        store.mark_complete()
    store.close()


def test_mark_complete_writes_flag_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    store = ActivationStore.create(path, layers=_layers(2), sample_ids=np.arange(4), row_block=4)
    store.write_rows(0, {"block0.out": np.zeros((4, 2))})
    store.set_rows_complete(4)
    # record what a reader would see on disk after every attribute write
    snapshots: list[dict] = []
    original_update = zarr.Group.update_attributes

    def snapshot() -> None:
        snapshots.append(json.loads((path / "zarr.json").read_text())["attributes"])

    def update(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = original_update(self, *args, **kwargs)
        snapshot()
        return result

    monkeypatch.setattr(zarr.Group, "update_attributes", update)
    store.mark_complete(input_fingerprint="abc")
    monkeypatch.undo()
    assert snapshots, "mark_complete wrote no attributes"
    assert snapshots[-1]["complete"] is True
    assert all(s["complete"] is False for s in snapshots[:-1])
    # everything else is on disk by the time the flag is
    assert snapshots[-2]["input_fingerprint"] == "abc"
    assert "completed_at" in snapshots[-2]
    store.close()
    assert ActivationStore.open(path).is_complete


# -- value checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_non_finite_refused_naming_layer_and_sample(tmp_path: Path, bad: float, dtype: str) -> None:
    ids = np.array([40, 41, 42, 43, 44, 45])
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(2, 3), sample_ids=ids, dtype=dtype, row_block=2
    ) as store:
        good = {"block0.out": np.ones((2, 2)), "block1.out": np.ones((2, 3))}
        store.write_rows(0, good)
        bad_block = {"block0.out": np.ones((2, 2)), "block1.out": np.ones((2, 3))}
        bad_block["block1.out"][1, 2] = bad
        with pytest.raises(StoreError, match=r"'block1\.out'.*non-finite.*sample id 43"):
            store.write_rows(2, bad_block)
        # nothing of the refused block was written, not even the good layer
        reader = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
        np.testing.assert_array_equal(reader.array("block0.out")[2:4], 0)


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in float64 (feature-space form), the reference for storage error."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) - np.mean(y, axis=0, dtype=np.float64)
    cross = np.linalg.norm(x.T @ y) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _stored(tmp_path: Path, name: str, values: np.ndarray, row_block: int = 64) -> np.ndarray:
    """``values`` through a complete float16 store and back (``read``)."""
    n, p = values.shape
    with ActivationStore.create(
        tmp_path / name, layers=_layers(p), sample_ids=np.arange(n), row_block=row_block
    ) as store:
        _write_all(store, {"block0.out": values}, block=row_block)
    return ActivationStore.open(tmp_path / name).read("block0.out")


@pytest.mark.parametrize(
    ("offset", "magnitude"),
    [(100.0, 1.0), (0.0, 1e-6), (0.0, 1e-8), (3e5, 1e3)],
    ids=["mean-100x-spread", "1e-6-layer", "1e-8-layer", "beyond-65504"],
)
def test_float16_keeps_the_variation_cka_measures(
    tmp_path: Path, offset: float, magnitude: float
) -> None:
    # plain float16 moves this CKA by ~1e-3 (offset features, the 1e-6 layer), reports the 1e-8
    # layer as all zeros, and refuses the 3e5 layer as overflow
    rng = np.random.default_rng(7)
    latent = rng.normal(size=(512, 8))
    x = offset + magnitude * (latent @ rng.normal(size=(8, 48)) + rng.normal(size=(512, 48)))
    x = np.maximum(x, offset)  # post-ReLU-like: a floor at the offset, half the entries on it
    y = latent @ rng.normal(size=(8, 16)) + 0.5 * rng.normal(size=(512, 16))
    got = _stored(tmp_path, "s", x)
    assert np.std(got) > 0.3 * np.std(x)  # not flushed to zero
    # reconstructed values: float16 rounding of the residuals, at most half an ulp each
    np.testing.assert_allclose(got, x, rtol=0, atol=2**-11 * np.abs(x - x.mean(0)).max())
    assert abs(_linear_cka(got, y) - _linear_cka(x, y)) < 1e-4


def test_float16_encoding_reused_on_resume_and_recorded_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    values = 50 + rng.normal(size=(32, 4))
    path = tmp_path / "s"
    with ActivationStore.create(
        path, layers=_layers(4), sample_ids=np.arange(32), row_block=8
    ) as store:
        store.write_rows(0, {"block0.out": values[:8]})
        store.set_rows_complete(8)
    recorded = ActivationStore.open(path, allow_incomplete=True).encoding("block0.out")
    np.testing.assert_array_equal(recorded[0], values[:8].mean(0).astype(np.float32))
    with ActivationStore.open_for_resume(path) as store:
        # later blocks of another mean keep the first block's offsets
        for start in range(8, 32, 8):
            store.write_rows(start, {"block0.out": values[start : start + 8] + 0.5})
            store.set_rows_complete(start + 8)
        store.mark_complete()
    reader = ActivationStore.open(path)
    np.testing.assert_array_equal(reader.encoding("block0.out")[0], recorded[0])
    np.testing.assert_allclose(reader.read("block0.out")[8:], values[8:] + 0.5, atol=5e-3)


def test_float16_unrepresentable_layer_is_refused_naming_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    ids = np.arange(100, 132)
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(3), sample_ids=ids, row_block=8
    ) as store:
        store.write_rows(0, {"block0.out": rng.normal(size=(8, 3))})
        # 1e6 times the first block's spread: beyond float16 at the scale fixed there
        big = rng.normal(size=(8, 3))
        big[2, 1] = 1e6
        with pytest.raises(DtypeRangeError, match=r"'block0\.out'.*sample id 110.*--dtype float32"):
            store.write_rows(8, {"block0.out": big})
        # a block whose variation is 1e-7 of the first block's: rounded away
        with pytest.raises(
            DtypeRangeError,
            match=r"'block0\.out'.*rows 16:24 \(first sample id 116\).*relative RMS error.*"
            r"--dtype float32",
        ):
            store.write_rows(16, {"block0.out": 1e-7 * rng.normal(size=(8, 3))})


def _exact_relative_float16_loss(residual: np.ndarray) -> float:
    """The rounding check's quantity in float64, independently: centred RMS of the float16
    rounding error over the centred RMS of the values."""
    r = residual.astype(np.float64)
    error = residual.astype(np.float16).astype(np.float64) - r
    error -= error.mean(0)
    r = r - r.mean(0)
    return float(np.sqrt(np.sum(error**2) / np.sum(r**2)))


@pytest.mark.parametrize(
    "kind", ["relu", "tiny_variation", "subnormal", "drifted_mean", "constant_feature"]
)
def test_float16_fast_bound_never_accepts_what_the_exact_check_refuses(kind: str) -> None:
    """The cheap rounding bound may only accept blocks whose exact loss is within the bound."""
    import torch

    from ckapipe.store import _float16_rounding_surely_within_bound

    rng = np.random.default_rng(3)
    for scale in (1e-9, 1e-6, 1e-4, 1e-2, 1.0, 1e3):
        x = rng.standard_normal((64, 257)).astype(np.float32)
        if kind == "relu":
            x = np.maximum(x + 0.3, 0) * scale
        elif kind == "tiny_variation":
            x = 100.0 + scale * x  # values whose variation is far below their float16 spacing
        elif kind == "subnormal":
            x = x * 1e-6 * scale
        elif kind == "drifted_mean":
            x = x * scale + 30.0 * scale
        else:
            x[:, :200] = 7.0
            x *= scale
        x = x.astype(np.float32)
        accepted = _float16_rounding_surely_within_bound(torch.from_numpy(x))
        exact = _exact_relative_float16_loss(x)
        if accepted:
            assert exact <= FLOAT16_MAX_REL_ERROR
        if kind == "relu" and scale == 1.0:
            assert accepted  # the common case takes the cheap path
        if kind == "tiny_variation" and scale == 1e-2:
            assert exact > FLOAT16_MAX_REL_ERROR and not accepted


def test_write_rows_shape_and_range_checks(tmp_path: Path) -> None:
    with ActivationStore.create(tmp_path / "s", layers=_layers(2, 3), sample_ids=np.arange(4)) as s:
        with pytest.raises(StoreError, match=r"missing \['block1\.out'\]"):
            s.write_rows(0, {"block0.out": np.ones((2, 2))})
        with pytest.raises(StoreError, match="unknown"):
            s.write_rows(
                0, {"block0.out": np.ones((2, 2)), "block1.out": np.ones((2, 3)), "x": np.ones(2)}
            )
        with pytest.raises(StoreError, match="different row counts"):
            s.write_rows(0, {"block0.out": np.ones((2, 2)), "block1.out": np.ones((3, 3))})
        with pytest.raises(StoreError, match="outside"):
            s.write_rows(3, {"block0.out": np.ones((2, 2)), "block1.out": np.ones((2, 3))})
        with pytest.raises(StoreError, match=r"'block1\.out': expected rows of shape \(2, 3\)"):
            s.write_rows(0, {"block0.out": np.ones((2, 2)), "block1.out": np.ones((2, 4))})


def test_reader_cannot_write(tmp_path: Path) -> None:
    with ActivationStore.create(tmp_path / "s", layers=_layers(2), sample_ids=np.arange(2)) as s:
        s.write_rows(0, {"block0.out": np.ones((2, 2))})
        s.set_rows_complete(2)
        s.mark_complete()
    reader = ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="read-only"):
        reader.write_rows(0, {"block0.out": np.ones((2, 2))})


def test_non_json_attrs_refused_before_anything_is_created(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="JSON-serializable.*int64"):
        ActivationStore.create(
            tmp_path / "s", layers=_layers(2), sample_ids=np.arange(3), attrs={"seed": np.int64(3)}
        )
    assert not (tmp_path / "s").exists()


def test_failed_create_leaves_nothing_and_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("No space left on device")

    # the first array creation fails, after the lock was taken
    monkeypatch.setattr(zarr.Group, "create_array", disk_full)
    with pytest.raises(OSError, match="No space"):
        ActivationStore.create(tmp_path / "s", layers=_layers(2), sample_ids=np.arange(3))
    monkeypatch.undo()
    # no half-made store (nor staging folder) is left behind to be mistaken for a store
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []
    # and the lock is free again: a retry in this very process succeeds
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(2), sample_ids=np.arange(3)
    ) as store:
        assert store.writable


# -- names and ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "__meta", ".", "..", "zarr.json"])
def test_bad_layer_names_refused(name: str) -> None:
    with pytest.raises(StoreError, match="cannot name a zarr array"):
        LayerRecord(name=name, shape=(2,), reduction="flatten", n_features=2)


def test_zero_features_refused() -> None:
    with pytest.raises(StoreError, match="n_features must be >= 1"):
        LayerRecord(name="x", shape=(0,), reduction="flatten", n_features=0)


def test_duplicate_layers_and_ids_refused(tmp_path: Path) -> None:
    layer = LayerRecord("conv", (2,), "flatten", 2)
    with pytest.raises(StoreError, match=r"more than once: \['conv'\]"):
        ActivationStore.create(tmp_path / "a", layers=[layer, layer], sample_ids=np.arange(3))
    with pytest.raises(StoreError, match="duplicates"):
        ActivationStore.create(tmp_path / "b", layers=[layer], sample_ids=np.array([1, 2, 1]))
    with pytest.raises(StoreError, match="no layers"):
        ActivationStore.create(tmp_path / "c", layers=[], sample_ids=np.arange(3))
    with pytest.raises(StoreError, match="non-empty 1-D"):
        ActivationStore.create(tmp_path / "d", layers=[layer], sample_ids=np.arange(0))


def test_unknown_layer_lists_known_ones(tmp_path: Path) -> None:
    with ActivationStore.create(tmp_path / "s", layers=_layers(2), sample_ids=np.arange(2)) as s:
        with pytest.raises(StoreError, match=r"no layer 'block9'.*\['block0\.out'\]"):
            s.read("block9")


def test_existing_directory_and_non_store_refused(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="already exists and is not empty"):
        ActivationStore.create(tmp_path / "full", layers=_layers(2), sample_ids=np.arange(2))
    with pytest.raises(StoreError, match="no zarr.json"):
        ActivationStore.open(tmp_path / "full")
    import zarr

    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not a ckapipe activation store"):
        ActivationStore.open(tmp_path / "other")


# -- one writer --------------------------------------------------------------------------------


def test_second_writer_in_same_process_refused(tmp_path: Path) -> None:
    store = ActivationStore.create(tmp_path / "s", layers=_layers(2), sample_ids=np.arange(4))
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        ActivationStore.open_for_resume(tmp_path / "s")
    store.close()
    resumed = ActivationStore.open_for_resume(tmp_path / "s")
    resumed.close()


_CHILD_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ckapipe.store import ActivationStore, LayerRecord
    layers = [LayerRecord("block0.out", (2,), "flatten", 2)]
    store = ActivationStore.create(sys.argv[1], layers=layers, sample_ids=np.arange(8), row_block=4)
    store.write_rows(0, {"block0.out": np.full((4, 2), 3.0)})
    store.set_rows_complete(4)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_writer_process_holds_lock_until_killed_then_resume(tmp_path: Path) -> None:
    path = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
            ActivationStore.open_for_resume(path)
        with pytest.raises(StoreError, match="already exists"):
            ActivationStore.create(path, layers=_layers(2), sample_ids=np.arange(8))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(IncompleteStoreError):
        ActivationStore.open(path)
    with ActivationStore.open_for_resume(path) as store:
        assert store.rows_complete == 4
        store.write_rows(4, {"block0.out": np.full((4, 2), 5.0)})
        store.set_rows_complete(8)
        store.mark_complete()
    with pytest.raises(StoreError, match="already complete"):
        ActivationStore.open_for_resume(path)
    got = ActivationStore.open(path).read("block0.out")
    np.testing.assert_array_equal(got, np.repeat([[3.0, 3.0], [5.0, 5.0]], 4, axis=0))


_CHILD_TRY_WRITER = textwrap.dedent(
    """
    import sys
    from ckapipe.store import ActivationStore, StoreLockedError
    try:
        ActivationStore.open_for_resume(sys.argv[1])
    except StoreLockedError as error:
        print("locked:", error)
        sys.exit(3)
    print("got the lock")
    """
)


def test_second_writer_process_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = ActivationStore.create(path, layers=_layers(2), sample_ids=np.arange(4))
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD_TRY_WRITER, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        store.close()
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"pid {os.getpid()}" in result.stdout
    assert "one writer at a time" in result.stdout


# -- reading API -------------------------------------------------------------------------------


def test_open_store_returns_dask_arrays(tmp_path: Path) -> None:
    import dask.array as da

    rng = np.random.default_rng(3)
    data = {"block0.out": rng.normal(size=(40, 6)), "block1.out": rng.normal(size=(40, 2))}
    for dtype in ("float32", "bfloat16", "float16"):
        path = tmp_path / dtype
        with ActivationStore.create(
            path, layers=_layers(6, 2), sample_ids=np.arange(40), dtype=dtype, row_block=8
        ) as store:
            _write_all(store, data, block=16)
        arrays = open_store(path)
        assert list(arrays) == ["block0.out", "block1.out"]
        for name, values in data.items():
            assert isinstance(arrays[name], da.Array)
            got = arrays[name].compute()
            assert got.dtype == (np.float64 if dtype == "float16" else np.float32)
            if dtype == "float32":
                expected = values.astype(np.float32).astype(np.float64)
            elif dtype == "float16":  # reconstructed: offset + scale * stored
                expected = _float16_reference(values, 8).astype(np.float64)
            else:
                expected = _bfloat16_reference(values.astype(np.float32).astype(np.float64))
            np.testing.assert_array_equal(got.astype(np.float64), expected)
            np.testing.assert_array_equal(arrays[name][5:9, 1].compute(), got[5:9, 1])


def test_identity_contents(tmp_path: Path) -> None:
    ids = np.array([5, 3, 9, 1])
    attrs = {
        "model": {"factory": "m:f", "kwargs": {}},
        "weights_sha256": "ab" * 32,
        "dataset": {"array": "x.npy"},
        "seed": 0,
    }
    with ActivationStore.create(
        tmp_path / "s", layers=_layers(2, 3), sample_ids=ids, dtype="float32", attrs=attrs
    ) as store:
        store.write_rows(0, {"block0.out": np.zeros((4, 2)), "block1.out": np.zeros((4, 3))})
        store.set_rows_complete(4)
        store.mark_complete()
    identity = ActivationStore.open(tmp_path / "s").identity()
    import hashlib

    assert identity["model"] == attrs["model"]
    assert identity["weights_sha256"] == attrs["weights_sha256"]
    assert identity["dataset"] == attrs["dataset"]
    assert identity["n_samples"] == 4
    assert identity["layers"] == ["block0.out", "block1.out"]
    assert identity["dtype"] == "float32"
    expected_digest = hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()
    assert identity["sample_ids_sha256"] == expected_digest
    assert sample_ids_digest(ids) == expected_digest
    assert sample_ids_digest(ids[::-1]) != expected_digest


def test_layer_records_survive_round_trip(tmp_path: Path) -> None:
    layers = [
        LayerRecord("features.0", (16, 8, 8), "mean", 16),
        LayerRecord("encoder.layer.1", (12, 32), "cls", 32),
    ]
    with ActivationStore.create(tmp_path / "s", layers=layers, sample_ids=np.arange(3)):
        pass
    reader = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert reader.layers == layers
    assert reader.array("features.0").attrs["shape"] == [16, 8, 8]


def test_created_store_timestamps(tmp_path: Path) -> None:
    before = time.time()
    with ActivationStore.create(tmp_path / "s", layers=_layers(2), sample_ids=np.arange(2)) as s:
        s.write_rows(0, {"block0.out": np.ones((2, 2))})
        s.set_rows_complete(2)
        s.mark_complete()
    attrs = ActivationStore.open(tmp_path / "s").attrs
    import datetime as dt

    created = dt.datetime.fromisoformat(attrs["created_at"]).timestamp()
    completed = dt.datetime.fromisoformat(attrs["completed_at"]).timestamp()
    assert before - 1 <= created <= completed <= time.time() + 1


def test_float16_store_begun_without_encoding_resumes_as_plain_float16(tmp_path: Path) -> None:
    # a store begun by the previous ckapipe (plain float16 cast, no float16_encoding attribute)
    path = tmp_path / "s"
    values = np.random.default_rng(11).normal(size=(16, 3))
    with ActivationStore.create(
        path, layers=_layers(3), sample_ids=np.arange(16), row_block=8
    ) as store:
        store.write_rows(0, {"block0.out": values[:8]})
        store.set_rows_complete(8)
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    del attrs["float16_encoding"]
    group.attrs.clear()
    group.attrs.update(attrs)
    group["layers/block0.out"][:8] = values[:8].astype(np.float16)
    with ActivationStore.open_for_resume(path) as store:
        store.write_rows(8, {"block0.out": values[8:]})
        store.set_rows_complete(16)
        store.mark_complete()
    got = ActivationStore.open(path).read("block0.out")
    np.testing.assert_array_equal(got, values.astype(np.float16).astype(np.float64))
