"""HDF5 bridge (ckapipe.extract.h5bridge): real HDF5 files via h5py, real stores in tmp_path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from ckapipe.extract import h5bridge
from ckapipe.extract.h5bridge import H5BridgeError, export_h5, import_h5
from ckapipe.store import ActivationStore, LayerRecord, StoreError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _per_layer_file(path: Path, n: int = 37, dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {
        "conv1": rng.normal(size=(n, 4, 3, 3)).astype(dtype),
        "blocks/0/out": rng.normal(size=(n, 6)).astype(dtype),
        "head": rng.integers(-5, 5, size=(n,)).astype(np.int32),
    }
    with h5py.File(path, "w") as h5:
        for name, values in data.items():
            h5.create_dataset(name, data=values)
    return data


def test_import_one_dataset_per_layer(tmp_path: Path) -> None:
    h5_path = tmp_path / "acts.h5"
    data = _per_layer_file(h5_path)
    store = import_h5(h5_path, tmp_path / "store", row_block=8)
    assert store.is_complete
    assert sorted(store.layer_names) == ["blocks.0.out", "conv1", "head"]
    assert store.dtype == "float32"
    np.testing.assert_array_equal(store.sample_ids, np.arange(37))
    conv = store.layer("conv1")
    assert conv.shape == (4, 3, 3) and conv.n_features == 36 and conv.reduction == "flatten"
    assert store.layer("head").shape == () and store.layer("head").n_features == 1
    np.testing.assert_array_equal(store.read("conv1"), data["conv1"].reshape(37, 36))
    np.testing.assert_array_equal(store.read("blocks.0.out"), data["blocks/0/out"])
    np.testing.assert_array_equal(store.read("head")[:, 0], data["head"].astype(np.float32))
    attrs = store.attrs
    assert attrs["imported_from"] == "hdf5"
    assert attrs["source_path"] == str(h5_path.resolve())
    assert attrs["source_sha256"] == _sha256(h5_path)
    assert attrs["order"] == "dataset"
    assert attrs["h5_datasets"]["blocks.0.out"] == ["blocks/0/out"]


def test_import_select_layers_by_name_or_path_and_key(tmp_path: Path) -> None:
    h5_path = tmp_path / "acts.h5"
    data = _per_layer_file(h5_path)
    store = import_h5(h5_path, tmp_path / "a", layers=["blocks/0/out", "conv1"])
    assert store.layer_names == ["blocks.0.out", "conv1"]  # selection order
    store = import_h5(h5_path, tmp_path / "b", layers=["blocks.0.out"])
    assert store.layer_names == ["blocks.0.out"]
    store = import_h5(h5_path, tmp_path / "c", key="blocks")
    assert store.layer_names == ["0.out"]
    np.testing.assert_array_equal(store.read("0.out"), data["blocks/0/out"])
    store = import_h5(h5_path, tmp_path / "d", key="conv1", dtype="float16")
    assert store.layer_names == ["conv1"]
    original = data["conv1"].reshape(37, 36)
    # a float16 store keeps residuals from a per-feature offset: within its rounding bound
    error = store.read("conv1") - original
    assert np.sqrt(np.mean(error**2)) <= 1e-3 * np.std(original)
    with pytest.raises(H5BridgeError, match=r"no layer 'nope'.*conv1"):
        import_h5(h5_path, tmp_path / "e", layers=["nope"])


def test_thingsvision_single_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 8, 2)).astype(np.float32)
    with h5py.File(tmp_path / "features.hdf5", "w") as h5:
        h5.create_dataset("features", data=features)
    ids = np.arange(50)[::-1] + 1000
    store = import_h5(tmp_path / "features.hdf5", tmp_path / "s", sample_ids=ids)
    assert store.layer_names == ["features"]
    assert store.layer("features").shape == (8, 2)
    np.testing.assert_array_equal(store.sample_ids, ids)
    np.testing.assert_array_equal(store.read("features"), features.reshape(50, 16))
    assert store.attrs["order"] != "dataset"


def test_thingsvision_split_features_concatenated_in_numeric_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pieces = [
        rng.normal(size=(rows, 5)).astype(np.float32) for rows in (7, 3, 9, 4, 6, 2, 5, 1, 8, 4, 3)
    ]
    with h5py.File(tmp_path / "features.hdf5", "w") as h5:
        # written out of order, and 10/11 sort before 02 as strings
        for index in reversed(range(len(pieces))):
            h5.create_dataset(f"features_{index + 1:02d}", data=pieces[index])
    store = import_h5(tmp_path / "features.hdf5", tmp_path / "s", row_block=4)
    assert store.layer_names == ["features"]
    expected = np.concatenate(pieces, axis=0)
    assert store.n_samples == expected.shape[0] == 52
    np.testing.assert_array_equal(store.read("features"), expected)
    assert store.attrs["h5_datasets"]["features"] == [f"features_{i:02d}" for i in range(1, 12)]


def test_import_streams_in_row_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(300, 16)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("x", data=values)
    # a tiny byte budget forces one row block (row_block rows) per step
    monkeypatch.setattr(h5bridge, "_BLOCK_BYTES", 1)
    reads: list[int] = []
    original = h5bridge._read_rows

    def counting_read(h5, source, start, stop):  # type: ignore[no-untyped-def]
        reads.append(stop - start)
        return original(h5, source, start, stop)

    monkeypatch.setattr(h5bridge, "_read_rows", counting_read)
    store = import_h5(tmp_path / "a.h5", tmp_path / "s", row_block=32)
    assert max(reads) == 32 and sum(reads) == 300
    np.testing.assert_array_equal(store.read("x"), values)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_import_export_import(tmp_path: Path, dtype: str) -> None:
    h5_path = tmp_path / "acts.h5"
    _per_layer_file(h5_path, n=41, dtype=dtype)
    first = import_h5(h5_path, tmp_path / "first", dtype=dtype, sample_ids=np.arange(41) * 3 + 1)
    exported = export_h5(first, tmp_path / "export.h5")
    second = import_h5(exported, tmp_path / "second", dtype=dtype)
    assert second.layers == first.layers
    np.testing.assert_array_equal(second.sample_ids, first.sample_ids)
    assert second.attrs["sample_ids_sha256"] == first.attrs["sample_ids_sha256"]
    for name in first.layer_names:
        a, b = first.read(name), second.read(name)
        if dtype == "float32":
            assert a.dtype == b.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(a, b)
        else:  # float16 stores re-encode their residuals: equal within that rounding bound
            assert np.sqrt(np.mean((a - b) ** 2)) <= 1e-3 * np.std(a)
    # the exported file holds logical values in natural shapes, as float32
    with h5py.File(exported, "r") as h5:
        assert h5["layers/conv1"].shape == (41, 4, 3, 3)
        assert h5["layers/conv1"].dtype == np.float32
        np.testing.assert_array_equal(h5["sample_ids"][:], first.sample_ids)
        assert h5.attrs["format"] == "ckapipe.activation-export"
        provenance = json.loads(h5.attrs["store_attrs"])
        assert provenance["source_sha256"] == _sha256(h5_path)
    assert second.attrs["source_sha256"] == _sha256(exported)


def test_export_restores_reduced_records_and_provenance(tmp_path: Path) -> None:
    layers = [
        LayerRecord("features.3", (16, 4, 4), "mean", 16),
        LayerRecord("encoder.cls", (9, 12), "cls", 12),
    ]
    rng = np.random.default_rng(4)
    data = {"features.3": rng.normal(size=(20, 16)), "encoder.cls": rng.normal(size=(20, 12))}
    provenance = {
        "model": {"factory": "m:f"},
        "weights_sha256": "00" * 32,
        "seed": 7,
        "order": "random",
    }
    ids = rng.permutation(20)
    with ActivationStore.create(
        tmp_path / "s", layers=layers, sample_ids=ids, dtype="bfloat16", attrs=provenance
    ) as store:
        store.write_rows(0, data)
        store.set_rows_complete(20)
        store.mark_complete()
    original = ActivationStore.open(tmp_path / "s")
    export_h5(tmp_path / "s", tmp_path / "e.h5", layers=["encoder.cls"])
    with h5py.File(tmp_path / "e.h5", "r") as h5:
        assert list(h5["layers"]) == ["encoder.cls"]
        assert h5["layers/encoder.cls"].dtype == np.float32  # bfloat16 exported as float32
        assert h5["layers/encoder.cls"].shape == (20, 12)
        assert h5["layers/encoder.cls"].attrs["reduction"] == "cls"
    back = import_h5(tmp_path / "e.h5", tmp_path / "back", dtype="bfloat16")
    assert back.layers == [layers[1]]
    np.testing.assert_array_equal(back.read("encoder.cls"), original.read("encoder.cls"))
    np.testing.assert_array_equal(back.sample_ids, ids)
    assert back.attrs["model"] == provenance["model"]
    assert back.attrs["seed"] == 7 and back.attrs["order"] == "random"
    assert back.identity()["sample_ids_sha256"] == original.identity()["sample_ids_sha256"]


# -- errors ------------------------------------------------------------------------------------


def test_missing_key(tmp_path: Path) -> None:
    _per_layer_file(tmp_path / "a.h5")
    with pytest.raises(H5BridgeError, match=r"no dataset or group 'feats'.*conv1"):
        import_h5(tmp_path / "a.h5", tmp_path / "s", key="feats")


def test_different_row_counts_name_both(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("layer_a", data=np.zeros((10, 2)))
        h5.create_dataset("layer_b", data=np.zeros((12, 2)))
    with pytest.raises(H5BridgeError, match=r"'layer_a' \(10 rows\) and 'layer_b' \(12 rows\)"):
        import_h5(tmp_path / "a.h5", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_empty_file_and_empty_dataset(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "empty.h5", "w") as h5:
        h5.create_group("nothing")
    with pytest.raises(H5BridgeError, match="holds no datasets"):
        import_h5(tmp_path / "empty.h5", tmp_path / "s")
    with h5py.File(tmp_path / "zero.h5", "w") as h5:
        h5.create_dataset("x", shape=(0, 3), dtype="f4")
    with pytest.raises(H5BridgeError, match=r"'x'.*no rows"):
        import_h5(tmp_path / "zero.h5", tmp_path / "s")


def test_non_numeric_dataset(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("acts", data=np.zeros((3, 2)))
        h5.create_dataset("names", data=np.array([b"a", b"b", b"c"]))
    with pytest.raises(H5BridgeError, match=r"'names'.*non-numeric"):
        import_h5(tmp_path / "a.h5", tmp_path / "s")
    store = import_h5(tmp_path / "a.h5", tmp_path / "s", layers=["acts"])
    assert store.layer_names == ["acts"]


def test_names_colliding_after_mapping(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("a/b", data=np.zeros((3, 2)))
        h5.create_dataset("a.b", data=np.zeros((3, 2)))
    with pytest.raises(H5BridgeError, match="same layer name 'a.b'"):
        import_h5(tmp_path / "a.h5", tmp_path / "s")


def test_missing_file_wrong_ids_and_nan(tmp_path: Path) -> None:
    with pytest.raises(H5BridgeError, match="does not exist"):
        import_h5(tmp_path / "nope.h5", tmp_path / "s")
    values = np.ones((4, 2))
    values[2, 1] = np.nan
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("x", data=values)
    with pytest.raises(H5BridgeError, match=r"sample_ids has shape \(3,\).*4 rows"):
        import_h5(tmp_path / "a.h5", tmp_path / "s", sample_ids=[0, 1, 2])
    with pytest.raises(H5BridgeError, match=r"'x'.*non-finite.*sample id 2(.|\n)*partial store"):
        import_h5(tmp_path / "a.h5", tmp_path / "s2")
    # the writer lock was released: the partial store can be inspected and is marked incomplete
    partial = ActivationStore.open(tmp_path / "s2", allow_incomplete=True)
    assert not partial.is_complete


def test_export_refuses_incomplete_store_and_existing_file(tmp_path: Path) -> None:
    with ActivationStore.create(
        tmp_path / "s", layers=[LayerRecord("x", (2,), "flatten", 2)], sample_ids=np.arange(4)
    ) as store:
        store.write_rows(0, {"x": np.ones((4, 2))})
        with pytest.raises(H5BridgeError, match="incomplete"):
            export_h5(store, tmp_path / "out.h5")
        with pytest.raises(StoreError, match="incomplete"):
            export_h5(tmp_path / "s", tmp_path / "out.h5")
        store.set_rows_complete(4)
        store.mark_complete()
    (tmp_path / "out.h5").write_text("occupied")
    with pytest.raises(H5BridgeError, match="already exists"):
        export_h5(tmp_path / "s", tmp_path / "out.h5")
    with pytest.raises(StoreError, match="no layer 'y'"):
        export_h5(tmp_path / "s", tmp_path / "other.h5", layers=["y"])
    assert not (tmp_path / "other.h5").exists()
    assert not (tmp_path / "other.h5.partial").exists()


def test_reserved_names_are_mapped_and_recorded(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("__hidden/acts", data=np.ones((3, 2)))
    store = import_h5(tmp_path / "a.h5", tmp_path / "s")
    assert store.layer_names == ["h5__hidden.acts"]
    assert store.attrs["h5_datasets"] == {"h5__hidden.acts": ["__hidden/acts"]}


# -- layer order -------------------------------------------------------------------------------
# Layer order is depth order: result rows and plot axes follow it. HDF5 lists untracked groups
# alphabetically, so every case below uses names whose alphabetical order is wrong.
DEPTH_ORDER = ["conv2", "conv1", "fc", "b"]


def _store_in_depth_order(path: Path, n: int = 23) -> ActivationStore:
    layers = [
        LayerRecord("conv2", (2, 3, 3), "flatten", 18),
        LayerRecord("conv1", (4, 2, 2), "mean", 4),
        LayerRecord("fc", (5,), "flatten", 5),
        LayerRecord("b", (), "flatten", 1),
    ]
    rng = np.random.default_rng(5)
    data = {record.name: rng.normal(size=(n, record.n_features)) for record in layers}
    with ActivationStore.create(
        path, layers=layers, sample_ids=rng.permutation(n), dtype="float32"
    ) as store:
        store.write_rows(0, data)
        store.set_rows_complete(n)
        store.mark_complete()
    return ActivationStore.open(path)


def test_cli_export_import_round_trip_keeps_layer_order(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ckapipe.cli import main

    original = _store_in_depth_order(tmp_path / "s")
    runner = CliRunner()
    result = runner.invoke(
        main, ["export-h5", str(tmp_path / "s"), "--out", str(tmp_path / "e.h5")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, ["import-h5", str(tmp_path / "e.h5"), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    back = ActivationStore.open(tmp_path / "b")
    assert back.layer_names == DEPTH_ORDER
    assert back.layers == original.layers
    np.testing.assert_array_equal(back.sample_ids, original.sample_ids)
    for name in DEPTH_ORDER:
        np.testing.assert_array_equal(back.read(name), original.read(name))
    # other HDF5 readers see the order too: the export tracks creation order
    with h5py.File(tmp_path / "e.h5", "r") as h5:
        assert list(h5["layers"]) == DEPTH_ORDER


def test_export_of_chosen_layers_imports_in_the_chosen_order(tmp_path: Path) -> None:
    original = _store_in_depth_order(tmp_path / "s")
    export_h5(original, tmp_path / "e.h5", layers=["fc", "conv2", "b"])
    back = import_h5(tmp_path / "e.h5", tmp_path / "b")
    assert back.layer_names == ["fc", "conv2", "b"]
    np.testing.assert_array_equal(back.read("conv2"), original.read("conv2"))


def test_exported_layer_order_attribute_is_followed_without_tracked_order(tmp_path: Path) -> None:
    # an export whose groups do not track creation order (rewritten by another tool)
    rng = np.random.default_rng(6)
    data = {name: rng.normal(size=(9, 3)).astype(np.float32) for name in DEPTH_ORDER}
    with h5py.File(tmp_path / "e.h5", "w") as h5:
        h5.attrs["format"] = h5bridge.EXPORT_FORMAT
        h5.attrs["layer_order"] = json.dumps(DEPTH_ORDER)
        for name in DEPTH_ORDER:
            h5.create_dataset(f"layers/{name}", data=data[name])
    back = import_h5(tmp_path / "e.h5", tmp_path / "b")
    assert back.layer_names == DEPTH_ORDER
    for name in DEPTH_ORDER:
        np.testing.assert_array_equal(back.read(name), data[name])


def test_foreign_file_with_tracked_creation_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    names = [*DEPTH_ORDER, "block/z", "block/a"]
    data = {name: rng.normal(size=(11, 2)).astype(np.float32) for name in names}
    with h5py.File(tmp_path / "t.h5", "w", track_order=True) as h5:
        for name in DEPTH_ORDER:
            h5.create_dataset(name, data=data[name])
        block = h5.create_group("block", track_order=True)
        block.create_dataset("z", data=data["block/z"])
        block.create_dataset("a", data=data["block/a"])
    store = import_h5(tmp_path / "t.h5", tmp_path / "s")
    assert store.layer_names == [*DEPTH_ORDER, "block.z", "block.a"]
    for name in names:
        np.testing.assert_array_equal(store.read(name.replace("/", ".")), data[name])


def test_untracked_foreign_file_in_natural_name_order(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "u.h5", "w") as h5:
        for name in ["layer10", "layer1", "head"]:
            h5.create_dataset(name, data=np.full((4, 2), float(len(name))))
        h5.create_dataset("layer2/x10", data=np.ones((4, 2)))
        h5.create_dataset("layer2/x9", data=np.ones((4, 2)))
    store = import_h5(tmp_path / "u.h5", tmp_path / "s")
    assert store.layer_names == ["head", "layer1", "layer2.x9", "layer2.x10", "layer10"]
    # an explicit order wins
    store = import_h5(tmp_path / "u.h5", tmp_path / "t", layers=["layer10", "head"])
    assert store.layer_names == ["layer10", "head"]
