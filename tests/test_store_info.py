"""`ckapipe info` / import-h5 / export-h5: describe_store, format_store_info and the click commands."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ckapipe.extract.cli_tools import commands, export_h5, import_h5, info
from ckapipe.extract.info import describe_store, format_store_info
from ckapipe.store import ActivationStore, LayerRecord

PROVENANCE = {
    "model": {"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}},
    "weights_sha256": "f" * 64,
    "dataset": {"array": "images.npy"},
    "seed": 3,
    "order": "random",
    "input_fingerprint": "1234abcd",
    "versions": {"torch": "2.13", "ckapipe": "0.1.0"},
}
LAYERS = [
    LayerRecord("layer1.0.conv1", (8, 4, 4), "flatten", 128),
    LayerRecord("fc", (10,), "flatten", 10),
]


def _make_store(path: Path, *, complete: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {"layer1.0.conv1": rng.normal(size=(24, 128)), "fc": rng.normal(size=(24, 10))}
    store = ActivationStore.create(
        path,
        layers=LAYERS,
        sample_ids=rng.permutation(24),
        dtype="float16",
        attrs=PROVENANCE,
        row_block=8,
    )
    store.write_rows(0, {k: v[:8] for k, v in data.items()})
    store.set_rows_complete(8)
    if complete:
        store.write_rows(8, {k: v[8:] for k, v in data.items()})
        store.set_rows_complete(24)
        store.mark_complete()
    store.close()
    return data


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_describe_complete_store(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _make_store(path, complete=True)
    description = describe_store(path)
    assert description["complete"] is True
    assert description["rows_complete"] == description["n_samples"] == 24
    assert description["dtype"] == "float16"
    assert description["codec"] == "none"
    assert description["format"] == "ckapipe.activation-store"
    assert description["size_bytes"] == _disk_bytes(path)
    # float16 with no codec: the chunks alone hold at least n * p * 2 bytes per layer
    assert description["size_bytes"] >= 24 * (128 + 10) * 2
    conv, fc = description["layers"]
    assert conv["name"] == "layer1.0.conv1"
    assert conv["stored_shape"] == [24, 128]
    assert conv["original_shape"] == [8, 4, 4]
    assert conv["reduction"] == "flatten"
    assert conv["chunk_shape"] == list(ActivationStore.open(path).chunk_shape("layer1.0.conv1"))
    assert conv["storage_dtype"] == "float16"
    assert conv["size_bytes"] == _disk_bytes(path / "layers" / "layer1.0.conv1")
    assert fc["stored_shape"] == [24, 10]
    provenance = description["provenance"]
    for key, value in PROVENANCE.items():
        assert provenance[key] == value
    assert "created_at" in provenance and "completed_at" in provenance
    json.dumps(description)  # JSON-ready

    text = format_store_info(description)
    assert "status     complete" in text
    assert "layer1.0.conv1" in text and "(24, 128)" in text and "(8, 4, 4)" in text
    assert "torchvision.models:resnet18" in text
    assert "input_fingerprint: 1234abcd" in text
    assert "INCOMPLETE" not in text


def test_describe_incomplete_store(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _make_store(path, complete=False)
    description = describe_store(path)
    assert description["complete"] is False
    assert description["rows_complete"] == 8
    assert "completed_at" not in description["provenance"]
    text = format_store_info(description)
    assert "INCOMPLETE: 8 of 24 rows written (33.3%)" in text


def test_cli_commands_exported() -> None:
    assert [c.name for c in commands] == ["info", "import-h5", "export-h5"]
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(command, ["--help"])
        assert result.exit_code == 0, result.output
        assert command.help


def test_cli_info_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _make_store(path, complete=False)
    runner = CliRunner()
    result = runner.invoke(info, [str(path)])
    assert result.exit_code == 0, result.output
    assert "INCOMPLETE" in result.output
    result = runner.invoke(info, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    assert parsed["rows_complete"] == 8
    assert parsed["layers"][1]["name"] == "fc"


def test_cli_info_on_non_store_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(info, [str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "no zarr.json" in result.output
    assert "Traceback" not in result.output


def test_cli_export_then_import_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s"
    data = _make_store(path, complete=True)
    runner = CliRunner()
    h5_path = tmp_path / "acts.h5"
    result = runner.invoke(export_h5, [str(path), "--out", str(h5_path), "--layers", "fc"])
    assert result.exit_code == 0, result.output
    with h5py.File(h5_path, "r") as h5:
        assert list(h5["layers"]) == ["fc"]
    result = runner.invoke(import_h5, [str(h5_path), "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert "imported 1 layer(s), 24 samples" in result.output
    back = ActivationStore.open(tmp_path / "back")
    original = ActivationStore.open(path)
    assert back.dtype == "float32"
    # export writes a float16 store's reconstructed values (offset + scale * residual) as float32
    np.testing.assert_array_equal(back.read("fc"), original.read("fc").astype(np.float32))
    np.testing.assert_allclose(back.read("fc"), data["fc"], rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(back.sample_ids, original.sample_ids)
    assert back.attrs["weights_sha256"] == PROVENANCE["weights_sha256"]


def test_cli_import_options_and_errors(tmp_path: Path) -> None:
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    with h5py.File(tmp_path / "f.hdf5", "w") as h5:
        h5.create_dataset("features", data=values)
        h5.create_dataset("other/x", data=np.zeros((4, 2)))
    ids = np.arange(10)[::-1] * 2
    np.save(tmp_path / "ids.npy", ids)
    runner = CliRunner()
    args = [str(tmp_path / "f.hdf5"), "--out", str(tmp_path / "s"), "--key", "features"]
    result = runner.invoke(
        import_h5, [*args, "--dtype", "float16", "--sample-ids", str(tmp_path / "ids.npy")]
    )
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(tmp_path / "s")
    assert store.dtype == "float16"
    np.testing.assert_array_equal(store.sample_ids, ids)
    np.testing.assert_array_equal(store.read("features"), values.astype(np.float16))
    result = runner.invoke(import_h5, [str(tmp_path / "f.hdf5"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 1
    assert "different row counts" in result.output
    result = runner.invoke(import_h5, [*args[:3], "--key", "missing"])
    assert result.exit_code == 1
    assert "no dataset or group 'missing'" in result.output
    result = runner.invoke(import_h5, [*args, "--dtype", "float64"])
    assert result.exit_code == 2  # usage error, not a traceback


def test_cli_export_refuses_incomplete(tmp_path: Path) -> None:
    _make_store(tmp_path / "s", complete=False)
    result = CliRunner().invoke(export_h5, [str(tmp_path / "s"), "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 1
    assert "incomplete" in result.output
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("complete", [True, False])
def test_cli_info_reports_a_deleted_chunk_as_damaged(tmp_path: Path, complete: bool) -> None:
    path = tmp_path / "s"
    _make_store(path, complete=complete)
    chunk = path / "layers" / "fc" / "c" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    runner = CliRunner()
    result = runner.invoke(info, [str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    status = next(line for line in result.output.splitlines() if line.startswith("status"))
    assert "DAMAGED: " in status and "'layers/fc'" in status and "layers/fc/c/0/0" in status
    # the description is still there: layers table and provenance
    assert "layer1.0.conv1" in result.output and "weights_sha256" in result.output
    result = runner.invoke(info, [str(path), "--json"])
    assert result.exit_code == 1, result.output
    parsed = json.loads(result.output)
    assert "layers/fc/c/0/0" in parsed["damaged"] and parsed["complete"] is complete


def test_info_counts_row_block_digests_instead_of_listing_them(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _make_store(path, complete=True)
    description = describe_store(path)
    description["provenance"]["input_block_sha256"] = ["ab" * 16] * 5000
    text = format_store_info(description)
    assert "input_block_sha256: 5000 row-block digests (see --json)" in text
    assert "ab" * 16 not in text
