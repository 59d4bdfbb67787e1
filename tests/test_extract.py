"""Extract stage: stored activations equal directly computed ones, and every bad input fails clearly.

Models and datasets come from ``tests/models.py`` (importable as ``models``; see its docstring).
References are computed in the test with plain torch forward passes / numpy float64.
"""

from __future__ import annotations

import hashlib
import json

import models
import numpy as np
import pytest
import torch

from ckapipe.extract.capture import CaptureError
from ckapipe.extract.extraction import ExtractionError, extract_activations
from ckapipe.extract.layers import LayerSelectionError, list_layers, resolve_layers
from ckapipe.extract.specs import (
    DatasetSpec,
    ModelSpec,
    SpecError,
    parse_dataset_spec,
    parse_model_spec,
)
from ckapipe.store import ActivationStore, StoreError

IMAGES = {"factory": "models:image_dataset", "kwargs": {"n": 40}}
VECTORS = {"factory": "models:vector_dataset", "kwargs": {"n": 40}}


def run(tmp_path, model, dataset, layers, name="store", **options):
    options.setdefault("batch_size", 8)
    options.setdefault("dtype", "float32")
    options.setdefault("progress", False)
    return extract_activations(model, dataset, layers=layers, out=tmp_path / name, **options)


def unpermute(store: ActivationStore, name: str) -> np.ndarray:
    """Rows of layer ``name`` in dataset order (the store holds them in sample_ids order)."""
    values = np.asarray(store.read(name), dtype=np.float64)
    result = np.empty_like(values)
    result[store.sample_ids] = values
    return result


# -- activations equal direct computation ---------------------------------------------------------
def test_cnn_4d_outputs_match_direct_forward(tmp_path):
    store = run(tmp_path, "models:make_cnn", IMAGES, ["0", "type:ReLU", "6"])
    assert store.layer_names == ["0", "1", "3", "6"]
    assert [layer.shape for layer in store.layers] == [(8, 8, 8), (8, 8, 8), (8, 8, 8), (10,)]
    assert [layer.n_features for layer in store.layers] == [512, 512, 512, 10]
    assert store.is_complete and store.n_samples == 40
    np.testing.assert_array_equal(store.sample_ids, np.random.default_rng(0).permutation(40))
    assert store.array("0").metadata.dimension_names == ("sample", "feature:0")

    net = models.make_cnn().eval()
    x = models.image_dataset(40).tensors[0]
    with torch.no_grad():
        h0 = net[0](x)
        h1 = net[1](h0)
        h3 = net[3](net[2](h1))
        logits = net(x)
    for name, direct in (("0", h0), ("1", h1), ("3", h3), ("6", logits)):
        np.testing.assert_allclose(
            unpermute(store, name), direct.reshape(40, -1).double().numpy(), rtol=1e-5, atol=1e-6
        )


def test_float16_store_is_within_float16_rounding(tmp_path):
    store = run(tmp_path, "models:make_cnn", IMAGES, ["3"], dtype="float16")
    assert store.read("3").dtype == np.float64  # reconstructed exactly: offset + scale * stored
    assert store.array("3").dtype == np.float16
    net = models.make_cnn().eval()
    with torch.no_grad():
        direct = net[:4](models.image_dataset(40).tensors[0]).reshape(40, -1).double().numpy()
    stored = unpermute(store, "3")
    # float16 keeps 11 significant bits of each residual from the per-feature offsets
    offsets, _ = store.encoding("3")
    residual = np.abs(direct - offsets.astype(np.float64)).max()
    np.testing.assert_allclose(stored, direct, rtol=0, atol=2**-11 * residual * 1.01)
    assert np.abs(stored - direct).max() > 0  # it really was rounded


def test_mlp_2d_and_mean_reduction(tmp_path):
    store = run(tmp_path, "models:make_mlp", VECTORS, ["1", "4"], reduce="mean")
    net = models.make_mlp().eval()
    x = models.vector_dataset(40).data
    with torch.no_grad():
        np.testing.assert_allclose(
            unpermute(store, "1"), net[:2](x).double().numpy(), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(
            unpermute(store, "4"), net(x).double().numpy(), rtol=1e-6, atol=1e-7
        )

    cnn = run(tmp_path, "models:make_cnn", IMAGES, ["1"], name="cnn", reduce="mean")
    assert cnn.layers[0].shape == (8, 8, 8) and cnn.layers[0].n_features == 8
    with torch.no_grad():
        h1 = models.make_cnn().eval()[:2](models.image_dataset(40).tensors[0]).double().numpy()
    np.testing.assert_allclose(unpermute(cnn, "1"), h1.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_rows_follow_selection_order_not_hook_order(tmp_path):
    # registration order is (late, early) and execution order is (early, late)
    for selection in (["late", "early"], ["early", "late"]):
        store = run(tmp_path, "models:make_reordered", VECTORS, selection, name="-".join(selection))
        assert store.layer_names == selection
        net = models.make_reordered().eval()
        x = models.vector_dataset(40).data
        with torch.no_grad():
            direct = {"early": net.early(x), "late": net(x)}
        for name in selection:
            np.testing.assert_allclose(
                unpermute(store, name), direct[name].double().numpy(), rtol=1e-6, atol=1e-7
            )
        assert store.read("early").shape[1] == 8 and store.read("late").shape[1] == 5


def test_module_called_twice_needs_a_call_choice(tmp_path):
    with pytest.raises(LayerSelectionError, match=r"'block' ran 2 times.*'block@0', 'block@1'"):
        run(tmp_path, "models:make_twice", VECTORS, ["block"])
    assert not (tmp_path / "store").exists()  # refused before anything was written
    store = run(tmp_path, "models:make_twice", VECTORS, ["block@1", "block@0"], name="calls")
    assert store.layer_names == ["block@1", "block@0"]
    net = models.make_twice().eval()
    x = models.vector_dataset(40).data
    with torch.no_grad():
        first = net.block(torch.tanh(net.inp(x)))
        second = net(x)
    np.testing.assert_allclose(
        unpermute(store, "block@0"), first.double().numpy(), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        unpermute(store, "block@1"), second.double().numpy(), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(LayerSelectionError, match=r"ran only 2 time\(s\).*0 to 1"):
        run(tmp_path, "models:make_twice", VECTORS, ["block@2"], name="call2")


def test_layer_that_does_not_run_is_an_error(tmp_path):
    with pytest.raises(LayerSelectionError, match=r"'unused' did not run"):
        run(tmp_path, "models:make_twice", VECTORS, ["inp", "unused"])


def test_tuple_output_element_and_non_per_sample_output(tmp_path):
    dataset = {"factory": "models:sequence_dataset", "kwargs": {"n": 24}}
    store = run(tmp_path, "models:make_tuple_net", dataset, ["gru"])
    assert store.layers[0].shape == (7, 5)
    net = models.make_tuple_net().eval()
    x = models.sequence_dataset(24).tensors[0]
    with torch.no_grad():
        output, _ = net.gru(x)
    np.testing.assert_allclose(
        unpermute(store, "gru"), output.reshape(24, -1).double().numpy(), rtol=1e-5, atol=1e-6
    )
    # element 1 is h_n, shaped (layers, batch, hidden): its first axis is not the batch
    with pytest.raises(CaptureError, match=r"'gru' output has shape \(1, 2, 5\).*not a per-sample"):
        run(tmp_path, "models:make_tuple_net", dataset, ["gru"], name="hn", output_index=1)
    with pytest.raises(CaptureError, match=r"tuple of 2 elements"):
        run(tmp_path, "models:make_tuple_net", dataset, ["gru"], name="oob", output_index=2)


@pytest.fixture(scope="module")
def bert_reference():
    net = models.make_tiny_bert()
    data = models.token_dataset(24)
    with torch.no_grad():
        output = net(input_ids=data.ids, attention_mask=data.mask, output_hidden_states=True)
    hidden = [h.double().numpy() for h in output.hidden_states]  # embeddings, layer 0, layer 1
    return data.mask.double().numpy(), hidden


def test_transformer_dict_output_with_masked_mean_and_cls(tmp_path, bert_reference):
    mask, hidden = bert_reference
    tokens = {"factory": "models:token_dataset", "kwargs": {"n": 24}}
    layers = ["encoder", "encoder.layer.0", "embeddings"]  # ModelOutput, tensor, tensor
    store = run(tmp_path, "models:make_tiny_bert", tokens, layers, reduce="masked_mean")
    assert [layer.shape for layer in store.layers] == [(10, 32)] * 3
    weights = mask[:, :, None]
    for name, states in zip(layers, [hidden[2], hidden[1], hidden[0]], strict=True):
        expected = (states * weights).sum(axis=1) / weights.sum(axis=1)
        np.testing.assert_allclose(unpermute(store, name), expected, rtol=1e-4, atol=1e-5)
    # padding matters: the plain token mean differs
    assert not np.allclose(unpermute(store, "encoder"), hidden[2].mean(axis=1), atol=1e-3)

    cls = run(
        tmp_path,
        "models:make_tiny_bert",
        tokens,
        ["encoder.layer.1.attention"],
        name="cls",
        reduce="cls",
    )
    assert cls.layers[0].reduction == "cls"
    # the attention block returns a tuple (hidden, None): element 0, first token
    assert cls.read("encoder.layer.1.attention").shape == (24, 32)


def test_masked_mean_without_mask_and_cls_on_images_fail(tmp_path):
    with pytest.raises(CaptureError, match=r"'masked_mean' needs an attention mask"):
        run(
            tmp_path,
            "models:make_tuple_net",
            {"factory": "models:sequence_dataset"},
            ["gru"],
            reduce="masked_mean",
        )
    with pytest.raises(CaptureError, match=r"layer '0': reduction 'cls' needs a \(batch, tokens"):
        run(tmp_path, "models:make_cnn", IMAGES, ["0"], reduce="cls")


# -- layer selection ---------------------------------------------------------------------------
def test_selection_by_glob_and_type_and_suggestions():
    net = models.make_tiny_bert()
    names = [s.name for s in resolve_layers(net, ["encoder.layer.?.output", "type:Embedding"])]
    assert names == [
        "encoder.layer.0.output",
        "encoder.layer.1.output",
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.token_type_embeddings",
    ]
    assert [s.name for s in resolve_layers(net, "pooler, pooler.dense,pooler")] == [
        "pooler",
        "pooler.dense",
    ]
    with pytest.raises(
        LayerSelectionError,
        match=r"unknown layer 'encoder.layr.0'; closest valid names: \['encoder.layer.0'",
    ):
        resolve_layers(net, ["encoder.layr.0"])
    with pytest.raises(LayerSelectionError, match=r"pattern 'decoder\.\*' matches no module"):
        resolve_layers(net, ["decoder.*"])
    with pytest.raises(LayerSelectionError, match=r"no module of type 'Conv2d'.*LayerNorm"):
        resolve_layers(net, ["type:Conv2d"])


def test_list_layers_reports_types_shapes_and_calls():
    rows = list_layers(models.make_twice(), torch.zeros(3, 12))
    assert [(r.name, r.type, r.shape, r.calls) for r in rows] == [
        ("inp", "Linear", (3, 6), 1),
        ("block", "Linear", (3, 6), 2),
        ("unused", "Linear", None, 0),
    ]
    bert = {
        r.name: r
        for r in list_layers(
            models.make_tiny_bert(), {"input_ids": torch.ones(2, 5, dtype=torch.long)}
        )
    }
    assert bert["encoder"].shape == (2, 5, 32) and "last_hidden_state" in bert["encoder"].output
    assert bert["encoder.layer.0.attention"].output.startswith("tuple[(2, 5, 32)")


def test_hooks_removed_and_training_flags_restored_even_on_error(tmp_path):
    net = models.make_twice()
    net.train()
    net.inp.eval()  # a mixed state must come back exactly
    run(tmp_path, net, models.vector_dataset(16), ["inp", "block@0"])
    with pytest.raises(LayerSelectionError):
        run(tmp_path, net, models.vector_dataset(16), ["unused"], name="bad")
    assert net.training and not net.inp.training and net.block.training
    assert all(not m._forward_hooks for m in net.modules())


# -- values the store refuses ------------------------------------------------------------------
def test_nan_activation_names_layer_and_sample(tmp_path):
    dataset = {"factory": "models:vector_dataset", "kwargs": {"n": 40, "negative": 17}}
    with pytest.raises(
        StoreError, match=r"layer 'root' has a non-finite activation .* sample id 17 "
    ):
        run(tmp_path, "models:make_sqrt_net", dataset, ["root"])
    assert not ActivationStore.open(tmp_path / "store", allow_incomplete=True).is_complete


def test_float16_stores_a_layer_beyond_65504_through_its_scale(tmp_path):
    store = run(tmp_path, "models:make_scaled_mlp", VECTORS, ["1"], dtype="float16")
    reference = run(tmp_path, "models:make_scaled_mlp", VECTORS, ["1"], name="f32")
    exact = reference.read("1").astype(np.float64)
    assert np.abs(exact).max() > 65504
    np.testing.assert_allclose(store.read("1"), exact, rtol=0, atol=2**-10 * np.abs(exact).max())
    assert store.attrs["float16_encoding"]["1"]["scale"] > 1


# -- specs, weights and provenance -------------------------------------------------------------
def test_spec_forms_parse_to_the_same_spec(tmp_path):
    expected = ModelSpec("models:make_mlp", {"hidden": 8})
    (tmp_path / "m.json").write_text(
        json.dumps({"factory": "models:make_mlp", "kwargs": {"hidden": 8}})
    )
    (tmp_path / "m.yaml").write_text("factory: models:make_mlp\nkwargs:\n  hidden: 8\n")
    for form in (
        {"factory": "models:make_mlp", "kwargs": {"hidden": 8}},
        '{"factory": "models:make_mlp", "kwargs": {"hidden": 8}}',
        f"@{tmp_path / 'm.json'}",
        f"@{tmp_path / 'm.yaml'}",
    ):
        assert parse_model_spec(form) == expected
    assert parse_model_spec("models:make_mlp") == ModelSpec("models:make_mlp")
    assert parse_dataset_spec("x.npy") == DatasetSpec(array="x.npy")
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['weight'\]"):
        parse_model_spec({"factory": "models:make_mlp", "weight": "w.pt"})
    with pytest.raises(SpecError, match=r"exactly one of 'factory'"):
        parse_dataset_spec({"factory": "models:vector_dataset", "array": "x.npy"})
    with pytest.raises(SpecError, match=r"HDF5: name its dataset with 'key'"):
        parse_dataset_spec({"array": "x.h5"})
    with pytest.raises(SpecError, match=r"cannot import module 'no_such_module'"):
        parse_model_spec("no_such_module:f").build()
    with pytest.raises(SpecError, match=r"has no attribute 'nope'"):
        parse_model_spec("models:nope").build()
    with pytest.raises(SpecError, match=r"optional package 'timm'"):
        parse_model_spec("timm:resnet18").build()
    with pytest.raises(SpecError, match=r"does not exist"):
        parse_model_spec(f"@{tmp_path / 'missing.json'}")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_change_activations_and_recorded_sha256(tmp_path, suffix):
    from safetensors.torch import save_file

    trained = models.make_mlp(seed=1)
    weights = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(trained.state_dict(), weights)
    else:
        save_file(trained.state_dict(), str(weights))
    plain = run(tmp_path, "models:make_mlp", VECTORS, ["2"], name="plain")
    loaded = run(
        tmp_path,
        {"factory": "models:make_mlp", "weights": str(weights)},
        VECTORS,
        ["2"],
        name="loaded",
    )
    assert loaded.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert plain.attrs["weights_sha256"] is None
    assert loaded.attrs["model_state_sha256"] != plain.attrs["model_state_sha256"]
    x = models.vector_dataset(40).data
    with torch.no_grad():
        expected = trained.eval()[:3](x).double().numpy()
    np.testing.assert_allclose(unpermute(loaded, "2"), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(unpermute(plain, "2"), expected, atol=1e-3)
    with pytest.raises(SpecError, match=r"do not fit model"):
        run(
            tmp_path,
            {"factory": "models:make_mlp", "kwargs": {"hidden": 5}, "weights": str(weights)},
            VECTORS,
            ["2"],
            name="bad",
        )


def test_array_file_datasets_npy_zarr_hdf5(tmp_path):
    import h5py
    import zarr

    x = np.random.default_rng(3).standard_normal((20, 12))  # float64: becomes float32 inputs
    np.save(tmp_path / "x.npy", x)
    zarr.save_array(str(tmp_path / "x.zarr"), x)
    with h5py.File(tmp_path / "x.h5", "w") as handle:
        handle["inputs"] = x
    net = models.make_mlp().eval()
    with torch.no_grad():
        expected = net[:2](torch.from_numpy(x.astype(np.float32))).double().numpy()
    for name, spec in (
        ("npy", str(tmp_path / "x.npy")),
        ("zarr", {"array": str(tmp_path / "x.zarr")}),
        ("h5", {"array": str(tmp_path / "x.h5"), "key": "inputs"}),
    ):
        store = run(tmp_path, "models:make_mlp", spec, ["1"], name=name, batch_size=4)
        np.testing.assert_allclose(unpermute(store, "1"), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(SpecError, match=r"has no dataset 'images'; it has \['inputs'\]"):
        run(
            tmp_path,
            "models:make_mlp",
            {"array": str(tmp_path / "x.h5"), "key": "images"},
            ["1"],
            name="bad",
        )


def _reference_fingerprint(inputs: torch.Tensor, sample_ids: np.ndarray) -> str:
    state = bytes(32)
    for index in sample_ids:
        sample = inputs[int(index)].contiguous()
        digest = hashlib.sha256(f"|{sample.dtype}|{tuple(sample.shape)}|".encode())
        digest.update(sample.numpy().tobytes())
        state = hashlib.sha256(state + digest.digest()).digest()
    return state.hex()


def test_input_fingerprint_follows_inputs_not_batching(tmp_path):
    a = run(tmp_path, "models:make_cnn", IMAGES, ["6"], name="a", batch_size=8)
    b = run(
        tmp_path,
        {"factory": "models:make_cnn", "kwargs": {"seed": 1}},
        IMAGES,
        ["0"],
        name="b",
        batch_size=5,
    )
    shifted = dict(IMAGES, transform="models:add_offset", transform_kwargs={"offset": 0.5})
    c = run(tmp_path, "models:make_cnn", shifted, ["6"], name="c")
    images = models.image_dataset(40).tensors[0]
    assert a.attrs["input_sha256"] == _reference_fingerprint(images, a.sample_ids)
    assert b.attrs["input_sha256"] == a.attrs["input_sha256"]
    assert c.attrs["input_sha256"] == _reference_fingerprint(images + 0.5, c.sample_ids)
    assert c.attrs["input_sha256"] != a.attrs["input_sha256"]
    assert c.attrs["dataset"]["transform"] == "models:add_offset"
    for key in ("model", "dataset", "seed", "order", "versions", "started_at", "completed_at"):
        assert key in a.attrs


def test_sample_order_limit_and_dataset_order(tmp_path):
    a = run(tmp_path, "models:make_mlp", VECTORS, ["1"], name="a", limit=10, seed=7)
    b = run(tmp_path, "models:make_reordered", VECTORS, ["early"], name="b", limit=10, seed=7)
    np.testing.assert_array_equal(a.sample_ids, np.random.default_rng(7).permutation(40)[:10])
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    c = run(tmp_path, "models:make_mlp", VECTORS, ["1"], name="c", order="dataset", limit=6)
    np.testing.assert_array_equal(c.sample_ids, np.arange(6))
    with pytest.raises(ExtractionError, match=r"limit must be between 1 and the dataset size 40"):
        run(tmp_path, "models:make_mlp", VECTORS, ["1"], name="d", limit=41)
    with pytest.raises(
        ExtractionError, match=r"row_block must be a positive multiple of batch_size 8"
    ):
        run(tmp_path, "models:make_mlp", VECTORS, ["1"], name="e", row_block=12)


def test_rerun_of_complete_store_is_reused_or_refused(tmp_path):
    first = run(tmp_path, "models:make_mlp", VECTORS, ["1"])
    again = run(tmp_path, "models:make_mlp", VECTORS, ["1"])
    assert again.attrs["completed_at"] == first.attrs["completed_at"]
    with pytest.raises(ExtractionError, match=r"holds a complete extraction whose 'model'"):
        run(tmp_path, {"factory": "models:make_mlp", "kwargs": {"seed": 1}}, VECTORS, ["1"])


def test_workers_bfloat16_autocast_and_zstd(tmp_path):
    import h5py

    x = np.random.default_rng(5).standard_normal((24, 12)).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as handle:
        handle["x"] = x
    spec = {"array": str(tmp_path / "x.h5"), "key": "x"}
    net = models.make_mlp().eval()
    with torch.no_grad():
        expected = net[:3](torch.from_numpy(x)).double().numpy()
    # two DataLoader worker processes read the HDF5 file; results equal the single-process run
    single = run(tmp_path, "models:make_mlp", spec, ["2"], name="single", batch_size=4)
    workers = run(
        tmp_path, "models:make_mlp", spec, ["2"], name="workers", batch_size=4, num_workers=2
    )
    np.testing.assert_array_equal(workers.read("2"), single.read("2"))
    np.testing.assert_allclose(unpermute(single, "2"), expected, rtol=1e-6, atol=1e-7)

    bf16 = run(
        tmp_path, "models:make_mlp", spec, ["2"], name="bf16", dtype="bfloat16", codec="zstd"
    )
    assert bf16.dtype == "bfloat16" and bf16.attrs["codec"] == "zstd"
    # bfloat16 keeps 8 significant bits
    np.testing.assert_allclose(unpermute(bf16, "2"), expected, rtol=2**-8, atol=1e-30)

    cast = run(tmp_path, "models:make_mlp", spec, ["2"], name="cast", autocast="bfloat16")
    assert cast.attrs["autocast"] == "bfloat16"
    stored = unpermute(cast, "2")
    assert not np.array_equal(stored, expected)  # the forward pass really ran in bfloat16
    np.testing.assert_allclose(stored, expected, atol=0.05)


def test_wrong_input_and_unbatchable_items_are_named(tmp_path):
    # the MLP takes 12 features; images are (3, 8, 8)
    with pytest.raises(
        CaptureError, match=r"model failed on the first batch, input \(2, 3, 8, 8\)"
    ):
        run(tmp_path, "models:make_mlp", IMAGES, ["0"])
    with pytest.raises(CaptureError, match=r"dataset items collate to str; expected a tensor"):
        run(tmp_path, "models:make_mlp", {"factory": "models:string_dataset"}, ["0"], name="s")


def test_transformers_constructor_builds_from_config_without_download(tmp_path):
    spec = {
        "factory": "transformers:BertModel",
        "kwargs": {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 32},
    }  # fmt: skip
    net = parse_model_spec(spec).build()
    assert type(net).__name__ == "BertModel" and net.config.hidden_size == 16
    tokens = {
        "factory": "models:token_dataset",
        "kwargs": {"n": 8, "vocab": 50},
        "keys": ["input_ids"],
    }
    store = run(tmp_path, spec, tokens, ["encoder"], reduce="masked_mean", batch_size=4)
    # the mask feeds masked_mean although only input_ids go to the model
    assert store.read("encoder").shape == (8, 16)
    assert store.attrs["versions"]["transformers"]


def test_failure_midway_leaves_a_resumable_store(tmp_path, monkeypatch):
    import ckapipe.store

    # small chunks: 8-row chunks for layer "0", 32-row chunks for layer "4" (float32)
    monkeypatch.setattr(ckapipe.store, "TARGET_CHUNK_BYTES", 512)
    dataset = {"factory": "models:vector_dataset", "kwargs": {"n": 160}}
    options = {"batch_size": 4, "dtype": "float32"}
    fail_at = int(np.random.default_rng(0).permutation(160)[100])
    monkeypatch.setenv("CKAPIPE_TEST_FAIL_AT", str(fail_at))
    with pytest.raises(RuntimeError, match=f"test failure loading item {fail_at}"):
        run(tmp_path, "models:make_mlp", dataset, ["0", "4"], row_block=8, **options)
    broken = ActivationStore.open(tmp_path / "store", allow_incomplete=True)
    assert broken.rows_complete == 96 and not broken.is_complete
    assert broken.chunk_shape("0") == (8, 16) and broken.chunk_shape("4") == (32, 4)
    monkeypatch.delenv("CKAPIPE_TEST_FAIL_AT")
    resumed = run(tmp_path, "models:make_mlp", dataset, ["0", "4"], **options)  # row_block kept
    fresh = run(
        tmp_path, "models:make_mlp", dataset, ["0", "4"], name="fresh", row_block=8, **options
    )
    assert resumed.is_complete and resumed.row_block == 8
    for name in ("0", "4"):
        np.testing.assert_array_equal(resumed.read(name), fresh.read(name))
    assert resumed.attrs["input_sha256"] == fresh.attrs["input_sha256"]
