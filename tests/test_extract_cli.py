"""`ckapipe layers` / `ckapipe extract` and in-memory `compare()`.

The compare reference is an independent numpy float64 implementation of minibatch CKA with the
unbiased HSIC estimator (Song et al. 2012), written here.
"""

from __future__ import annotations

import json
import shutil

import models
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from reference import minibatch_cka

from ckapipe.cli import main
from ckapipe.extract.compare import compare
from ckapipe.extract.layers import LayerSelectionError
from ckapipe.extract.progress import Progress
from ckapipe.store import ActivationStore


@pytest.fixture()
def runner():
    return CliRunner()


def test_extract_from_spec_files(tmp_path, runner):
    (tmp_path / "model.json").write_text(
        json.dumps({"factory": "models:make_cnn", "kwargs": {"channels": 4}})
    )
    (tmp_path / "data.yaml").write_text("factory: models:image_dataset\nkwargs:\n  n: 24\n")
    out = tmp_path / "store"
    result = runner.invoke(
        main,
        ["extract", "--model", f"@{tmp_path / 'model.json'}", "--dataset", f"@{tmp_path / 'data.yaml'}",
         "--layers", "0", "--layers", "type:ReLU", "--out", str(out), "--batch-size", "6",
         "--dtype", "float32", "--limit", "20", "--seed", "3", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "20 samples x 3 layers" in result.output
    store = ActivationStore.open(out)
    assert store.layer_names == ["0", "1", "3"]
    assert store.attrs["model"]["kwargs"] == {"channels": 4}
    assert store.attrs["dataset"]["kwargs"] == {"n": 24}
    assert store.attrs["seed"] == 3 and store.row_block % 6 == 0
    np.testing.assert_array_equal(store.sample_ids, np.random.default_rng(3).permutation(24)[:20])


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--layers", "conv"], 1, "unknown layer 'conv'; the model has 7 modules"),
        (["--layers", "0", "--batch-size", "0"], 2, "Invalid value for '--batch-size'"),
        (["--layers", "0", "--dtype", "float64"], 2, "'float64' is not one of"),
        (["--layers", "0", "--model", "{not json"], 2, "model spec is not valid JSON"),
        (
            ["--layers", "0", "--model", "no_such_module:f"],
            1,
            "cannot import module 'no_such_module'",
        ),
    ],
)
def test_extract_user_errors_have_messages_not_tracebacks(
    tmp_path, runner, arguments, code, message
):
    base = [
        "extract",
        "--model",
        "models:make_cnn",
        "--dataset",
        "models:image_dataset",
        "--out",
        str(tmp_path / "s"),
    ]
    result = runner.invoke(main, [*base, *arguments])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_layers_command_table_and_json(runner):
    result = runner.invoke(main, ["layers", "models:make_twice", "--input-shape", "12"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "type", "calls", "output"]
    assert lines[2].split() == ["block", "Linear", "2", "(1,", "6)"]
    assert lines[3].split() == ["unused", "Linear", "0", "(did", "not", "run)"]
    result = runner.invoke(
        main, ["layers", "models:make_tiny_bert", "--dataset", "models:token_dataset", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["encoder.layer.1"]["shape"] == [1, 10, 32]
    result = runner.invoke(main, ["layers", "models:make_twice"])
    assert result.exit_code == 2 and "exactly one of --dataset and --input-shape" in result.output


def test_progress_lines_without_a_terminal():
    import io

    stream = io.StringIO()
    meter = Progress(100, initial=20, label="s", stream=stream, interval=0.0)
    meter.update(30)
    meter.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert (
        lines[-1].startswith("s: 50/100 samples (50%)")
        and "samples/s" in lines[-1]
        and "ETA" in lines[-1]
    )


# -- compare ------------------------------------------------------------------------------------
def test_compare_matches_numpy_reference():
    data = models.image_dataset(40)
    loader = torch.utils.data.DataLoader(data, batch_size=10)  # 4 batches, tuple items
    net_a, net_b = models.make_cnn(), models.make_cnn(channels=4, seed=1)
    result = compare(
        net_a, net_b, loader, layers_a=["6", "1"], layers_b=["type:Conv2d"], device="cpu"
    )
    assert result.layers_a == ["6", "1"] and result.layers_b == ["0", "2"]
    assert result.cka.shape == (2, 2) and result.n_samples == 40 and result.n_batches == 4

    batches_a, batches_b = [], []
    with torch.no_grad():
        for x, _ in loader:
            h1 = net_a[:2](x)
            batches_a.append([net_a(x).double().numpy(), h1.reshape(10, -1).double().numpy()])
            c0 = net_b[0](x)
            c2 = net_b[:3](x)
            batches_b.append(
                [c0.reshape(10, -1).double().numpy(), c2.reshape(10, -1).double().numpy()]
            )
    expected = minibatch_cka(batches_a, batches_b)
    np.testing.assert_allclose(result.cka, expected, rtol=1e-6, atol=1e-9)
    assert result.value("1", "2") == pytest.approx(expected[1, 1], rel=1e-6)

    self_result = compare(net_a, None, loader, layers_a=["1", "6"], device="cpu")
    np.testing.assert_allclose(np.diag(self_result.cka), 1.0, rtol=1e-12)
    assert all(not m._forward_hooks for m in net_a.modules())


def test_compare_short_batches_and_bad_layers():
    data = models.vector_dataset(22)
    loader = torch.utils.data.DataLoader(data, batch_size=10)  # 10, 10, 2
    with pytest.warns(UserWarning, match=r"2 samples in batches smaller than 4"):
        result = compare(
            models.make_mlp(),
            models.make_reordered(),
            loader,
            layers_a=["1"],
            layers_b=["early", "late"],
        )
    assert result.n_samples == 20 and result.dropped_samples == 2
    with pytest.raises(
        LayerSelectionError, match=r"unknown layer 'erly'; closest valid names: \['early'\]"
    ):
        compare(
            models.make_mlp(), models.make_reordered(), loader, layers_a=["1"], layers_b=["erly"]
        )


def test_compare_dict_batches_with_masked_mean():
    net = models.make_tiny_bert()
    data = models.token_dataset(24)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    layers = ["encoder.layer.0", "encoder"]
    result = compare(net, None, loader, layers_a=layers, reduce="masked_mean", device="cpu")
    batches = []
    with torch.no_grad():
        for batch in loader:
            hidden = net(**batch, output_hidden_states=True).hidden_states
            weights = batch["attention_mask"].double().numpy()[:, :, None]
            batches.append(
                [(h.double().numpy() * weights).sum(1) / weights.sum(1) for h in hidden[1:]]
            )
    expected = minibatch_cka(batches, batches)
    np.testing.assert_allclose(result.cka, expected, rtol=1e-5, atol=1e-8)
    assert result.layers_a == layers and result.n_batches == 3


def test_too_few_samples_advice_works_when_followed(tmp_path, runner):
    store = tmp_path / "store"
    extract = ["extract", "--model", "models:make_mlp",
               "--dataset", json.dumps({"factory": "models:vector_dataset", "kwargs": {"n": 40}}),
               "--layers", "0", "--batch-size", "4", "--no-progress", "--out", str(store)]  # fmt: skip
    assert runner.invoke(main, [*extract, "--limit", "3"]).exit_code == 0
    for options in ([], ["-m", "3"], ["--mode", "full"]):
        result = runner.invoke(main, ["gram", str(store), "--out", str(tmp_path / "g"), *options])
        assert result.exit_code == 1, result.output
        # the advice is not a batch size (every one is refused for n = 3)
        assert "holds only 3 samples" in result.output and "batch size <=" not in result.output
        assert f"rm -r {store}" in result.output and "--limit" in result.output
    # following it: delete, re-extract with 4 samples, build the cache
    shutil.rmtree(store)
    assert runner.invoke(main, [*extract, "--limit", "4"]).exit_code == 0
    result = runner.invoke(main, ["gram", str(store), "--out", str(tmp_path / "g"), "-m", "4"])
    assert result.exit_code == 0, result.output
