"""Stores are readable as labelled arrays by xarray alone (results: see test_study.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ckapipe.store import ActivationStore, LayerRecord

xarray = pytest.importorskip("xarray")


def test_xarray_reads_a_store_with_per_layer_feature_dimensions(tmp_path):
    records = [
        LayerRecord(name="blk.0", shape=(4,), reduction="flatten", n_features=4),
        LayerRecord(name="fc", shape=(3,), reduction="flatten", n_features=3),
    ]
    rng = np.random.default_rng(0)
    data = {"blk.0": rng.normal(size=(5, 4)), "fc": rng.normal(size=(5, 3))}
    store = ActivationStore.create(
        tmp_path / "s.zarr", layers=records, sample_ids=np.arange(5), dtype="float32"
    )
    with store:
        store.write_rows(0, {name: values.astype(np.float32) for name, values in data.items()})
        store.set_rows_complete(5)
        store.mark_complete()
    layers = xarray.open_zarr(tmp_path / "s.zarr", group="layers", consolidated=False)
    assert layers["blk.0"].dims == ("sample", "feature:blk.0")
    assert layers["fc"].dims == ("sample", "feature:fc")
    np.testing.assert_array_equal(layers["fc"].values, data["fc"].astype(np.float32))
    tree = xarray.open_datatree(tmp_path / "s.zarr", engine="zarr", consolidated=False)
    assert tree["sample_ids"].dims == ("sample",)
    assert tree["layers"]["blk.0"].attrs["logical_dtype"] == "float32"
