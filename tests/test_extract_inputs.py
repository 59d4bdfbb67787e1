"""Resume and reuse verify the inputs: a dataset file replaced under an existing store is refused.

Real `.npy` dataset files, a real `ckapipe extract` child killed with SIGKILL, real stores. The
child stalls (sleeps) right after its rows_complete reaches 64 of 160, so the kill lands at a
known resume point; the stall is in the child's command line, not in the code under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import STORE_TIMESTAMPS, rows_complete, sigkill_when, store_files

import ckapipe.store
from ckapipe.extract.cli import extract_command
from ckapipe.store import ActivationStore

TESTS = Path(__file__).parent
N = 160
STALL_AT = 64
# small chunks, so that rows_complete advances in several steps (64, 128, 160), here and in the child
CHUNK_BYTES = 512
CHILD = textwrap.dedent(
    f"""
    import time
    import ckapipe.store
    from ckapipe.store import ActivationStore
    ckapipe.store.TARGET_CHUNK_BYTES = {CHUNK_BYTES}
    write = ActivationStore.set_rows_complete
    def stalling(self, rows, **attrs):
        write(self, rows, **attrs)
        if rows == {STALL_AT}:
            time.sleep(600)
    ActivationStore.set_rows_complete = stalling
    from ckapipe.extract.cli import extract_command
    extract_command()
    """
)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "models:make_mlp",
        "--dataset", str(data),
        "--layers", "0,4",
        "--batch-size", "4",
        "--row-block", "8",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _assert_same_store(a: Path, b: Path) -> None:
    """Byte-identical but for the timestamps in the root metadata."""
    files_a, files_b = store_files(a), store_files(b)
    del files_a["zarr.json"], files_b["zarr.json"]
    assert files_a == files_b

    def attrs(path: Path) -> dict:
        values = ActivationStore.open(path).attrs
        return {k: v for k, v in values.items() if k not in STORE_TIMESTAMPS}

    assert attrs(a) == attrs(b)


def _kill_at_row_64(data: Path, out: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *_args(data, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sigkill_when(child, lambda: rows_complete(out) >= STALL_AT, within=60)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckapipe.store, "TARGET_CHUNK_BYTES", CHUNK_BYTES)


def _dataset(path: Path, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(N, 12)).astype(np.float32)
    np.save(path, values)
    return values


def test_killed_extraction_on_replaced_data_is_refused_then_advice_works(tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    original = _dataset(data)
    killed = tmp_path / "killed"
    _kill_at_row_64(data, killed)
    assert rows_complete(killed) == STALL_AT
    spare = tmp_path / "spare"
    shutil.copytree(killed, spare)

    # the same path and shape, one sample changed: the one written in row 20 (row block 2)
    sample = int(np.random.default_rng(0).permutation(N)[20])
    changed = original.copy()
    changed[sample] += 1.0
    np.save(data, changed)
    before = store_files(killed)
    runner = CliRunner()
    result = runner.invoke(extract_command, _args(data, killed))
    assert result.exit_code == 1, result.output
    first_id = int(np.random.default_rng(0).permutation(N)[16])
    assert f"rows 16:24 (row block 2, first sample id {first_id})" in result.output
    assert "resuming it would mix rows of the old and the new data" in result.output
    assert "x.npy" in result.output and f"rm -r {killed}" in result.output
    assert "wrote" not in result.output and "Traceback" not in result.output
    assert store_files(killed) == before  # untouched: still the interrupted store of the old data

    # the advice works: delete the store, re-run the same command
    shutil.rmtree(killed)
    result = runner.invoke(extract_command, _args(data, killed))
    assert result.exit_code == 0, result.output
    fresh = tmp_path / "fresh"
    assert runner.invoke(extract_command, _args(data, fresh)).exit_code == 0
    _assert_same_store(killed, fresh)

    # unchanged data: the interrupted store resumes, identical to an uninterrupted run
    np.save(data, original)
    result = runner.invoke(extract_command, _args(data, spare))
    assert result.exit_code == 0, result.output
    assert f"wrote {spare}" in result.output
    reference = tmp_path / "reference"
    assert runner.invoke(extract_command, _args(data, reference)).exit_code == 0
    _assert_same_store(spare, reference)


def test_complete_store_on_replaced_data_is_refused_not_reused(tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    original = _dataset(data)
    out = tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(extract_command, _args(data, out)).exit_code == 0

    # unchanged data: reused, verified, nothing written
    before = store_files(out)
    result = runner.invoke(extract_command, _args(data, out))
    assert result.exit_code == 0, result.output
    assert "already holds this extraction" in result.output and "wrote" not in result.output
    assert store_files(out) == before

    # the file replaced by other values of the same shape: refused, the store untouched
    np.save(data, original[::-1].copy())
    result = runner.invoke(extract_command, _args(data, out))
    assert result.exit_code == 1, result.output
    first_id = int(np.random.default_rng(0).permutation(N)[0])
    assert f"rows 0:8 (row block 0, first sample id {first_id})" in result.output
    assert "reusing it would return activations of the old data" in result.output
    assert "wrote" not in result.output and "already holds" not in result.output
    assert store_files(out) == before

    # the advice works
    shutil.rmtree(out)
    result = runner.invoke(extract_command, _args(data, out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert store_files(out) != before


def test_float16_unrepresentable_layer_removes_store_and_float32_advice_works(
    tmp_path: Path,
) -> None:
    values = np.random.default_rng(1).normal(size=(32, 12)).astype(np.float32)
    values[8:] *= 1e7  # after the first row block, 1e7 times its spread: beyond float16's range
    data = tmp_path / "x.npy"
    np.save(data, values)
    out = tmp_path / "store"
    args = [*_args(data, out), "--order", "dataset"]
    runner = CliRunner()
    result = runner.invoke(extract_command, args)
    assert result.exit_code == 1, result.output
    assert "layer '0'" in result.output and "re-run the same command with --dtype float32" in (
        result.output
    )
    assert "Traceback" not in result.output
    assert not out.exists()
    result = runner.invoke(extract_command, [*args, "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert ActivationStore.open(out).dtype == "float32"


@pytest.mark.parametrize("rows", [8, 160])
def test_input_block_digests_recorded_per_row_block(tmp_path: Path, rows: int) -> None:
    data = tmp_path / "x.npy"
    _dataset(data)
    out = tmp_path / "store"
    result = CliRunner().invoke(extract_command, [*_args(data, out), "--limit", str(rows)])
    assert result.exit_code == 0, result.output
    attrs = ActivationStore.open(out).attrs
    assert len(attrs["input_block_sha256"]) == rows // 8
    assert len(set(attrs["input_block_sha256"])) == rows // 8
