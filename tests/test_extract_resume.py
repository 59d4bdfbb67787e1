"""A real SIGKILL of a `ckapipe extract` child process, then resume: byte-identical to one run.

The child imports ``models`` through PYTHONPATH and stalls when it loads the item of row 100
(``CKAPIPE_TEST_STALL_AT``, read by ``models.VectorDataset``; the spec is unchanged), after its
first 64 rows are durable; the test then kills it with SIGKILL.
The store's chunk target is shrunk to 512 bytes (in the child and here) so that this small store
has several chunks per layer, of different heights: layer "0" (16 features, float16) gets
16-row chunks, layer "4" (4 features) 64-row chunks, and ``rows_complete`` advances to 64, 128, 160.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_same_store_bytes, rows_complete, sigkill_when

import ckapipe.store
from ckapipe.extract.cli import extract_command
from ckapipe.extract.extraction import ExtractionError, extract_activations
from ckapipe.store import ActivationStore, StoreLockedError

TESTS = Path(__file__).parent
N = 160
CHUNK_BYTES = 512
DATASET = {"factory": "models:vector_dataset", "kwargs": {"n": N}}
ARGS = [
    "--model", "models:make_mlp",
    "--dataset", json.dumps(DATASET),
    "--layers", "0,4",
    "--batch-size", "4",
    "--row-block", "8",
]  # fmt: skip
CHILD = (
    f"import ckapipe.store; ckapipe.store.TARGET_CHUNK_BYTES = {CHUNK_BYTES}; "
    "from ckapipe.extract.cli import extract_command; extract_command()"
)


def test_sigkill_then_resume_is_byte_identical(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ckapipe.store, "TARGET_CHUNK_BYTES", CHUNK_BYTES)
    killed = tmp_path / "killed"
    stall_at = int(np.random.default_rng(0).permutation(N)[100])
    env = dict(os.environ, CKAPIPE_TEST_STALL_AT=str(stall_at))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            *ARGS,
            "--out",
            str(killed),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def ready() -> bool:
        if rows_complete(killed) < 64:
            return False
        # a second writer while the child holds the store is refused
        with pytest.raises(StoreLockedError, match=r"being written by another process"):
            extract_activations(
                "models:make_mlp",
                DATASET,
                layers="0,4",
                out=killed,
                batch_size=4,
                row_block=8,
                progress=False,
            )
        return True

    sigkill_when(child, ready, within=60)
    interrupted = ActivationStore.open(killed, allow_incomplete=True)
    assert interrupted.rows_complete == 64 and not interrupted.is_complete
    assert interrupted.chunk_shape("0") == (16, 16) and interrupted.chunk_shape("4") == (64, 4)

    # a resume with other settings is refused, naming the differing field
    with pytest.raises(
        ExtractionError, match=r"interrupted extraction whose 'seed' is 0, but this run's is 1"
    ):
        extract_activations(
            "models:make_mlp",
            DATASET,
            layers="0,4",
            out=killed,
            batch_size=4,
            row_block=8,
            seed=1,
            progress=False,
        )
    with pytest.raises(ExtractionError, match=r"'batch_size' is 4, but this run's is 8"):
        extract_activations(
            "models:make_mlp",
            DATASET,
            layers="0,4",
            out=killed,
            batch_size=8,
            row_block=8,
            progress=False,
        )
    with pytest.raises(ExtractionError, match=r"'dataset' is"):
        extract_activations(
            "models:make_mlp",
            dict(DATASET, transform="models:double"),
            layers="0,4",
            out=killed,
            batch_size=4,
            row_block=8,
            progress=False,
        )

    runner = CliRunner()
    with caplog.at_level("INFO", logger="ckapipe.extract"):
        resumed = runner.invoke(extract_command, [*ARGS, "--out", str(killed), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {killed} from row {interrupted.rows_complete} of {N}" in caplog.text
    fresh = runner.invoke(
        extract_command, [*ARGS, "--out", str(tmp_path / "fresh"), "--no-progress"]
    )
    assert fresh.exit_code == 0, fresh.output

    files = assert_same_store_bytes(killed, tmp_path / "fresh")
    assert sum(name.startswith("layers/0/c/") for name in files) == N // 16  # chunks compared
    assert sum(name.startswith("layers/4/c/") for name in files) == 3
    attrs = json.loads(files["zarr.json"])["attributes"]
    assert attrs["complete"] is True and attrs["rows_complete"] == N
