"""An interrupted extraction with Gram-only layers resumes: a real SIGKILL of a `ckapipe extract`
child, then the same command again, gives the fused Gram cache (and the store) of one
uninterrupted run, bit for bit.

The child stalls loading the item of a known row (``CKAPIPE_TEST_STALL_AT``, read by
``models.VectorDataset``) and is killed there. The store's chunk target is shrunk to 512 bytes
(in the child and here): the Gram-only layers "0" and "2" (16 features) flush every 16 rows, the
stored layer "4" (4 features) every 64, so ``rows_complete`` lags the Gram-only layers and some
of their batches beyond the resume point are already kept when the child dies.

- m = 16, stall at row 128: the resume point is row 128, a batch boundary.
- m = 12, stall at row 100 (inside batch 8): the rows every layer holds end at 64, inside batch
  5, so ``rows_complete`` is held back to 60; batches 5-7 of the Gram-only layers are written
  beyond it and recomputed on resume; 160 = 13 x 12 + 4 leaves a short last batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_store_bytes, rows_complete, sigkill_when, store_files

import ckapipe.store
from ckapipe.analyze.gram_cache import GramCache
from ckapipe.analyze.gram_format import GramCacheUsageError
from ckapipe.cli import main
from ckapipe.errors import IntegrityError
from ckapipe.extract.fused_gram import FusedGramWriter, GramRequest
from ckapipe.store import ActivationStore, LayerRecord, StoreError
from ckapipe.verify import verify

TESTS = Path(__file__).parent
N = 160
CHUNK_BYTES = 512
DATASET = {"factory": "models:vector_dataset", "kwargs": {"n": N}}
CHILD = (
    f"import ckapipe.store; ckapipe.store.TARGET_CHUNK_BYTES = {CHUNK_BYTES}; "
    "from ckapipe.extract.cli import extract_command; extract_command()"
)


def args(out: Path, grams: Path, m: int, *extra: str, gram_only: str = "0,2") -> list[str]:
    return [
        "--model", "models:make_mlp", "--dataset", json.dumps(DATASET), "--layers", "0,2,4",
        "--batch-size", "4", "--row-block", "8", "--out", str(out), "--no-progress",
        "--gram-out", str(grams), "--gram-batch-size", str(m), "--gram-only", gram_only, *extra,
    ]  # fmt: skip


def run_extract(arguments: list[str]):
    return CliRunner().invoke(main, ["extract", *arguments])


def kill_child_at(arguments: list[str], stall_row: int, ready) -> None:
    """Run the extraction in a child that stalls at ``stall_row``; SIGKILL it once ``ready()``."""
    stall_at = int(np.random.default_rng(0).permutation(N)[stall_row])
    env = dict(os.environ, CKAPIPE_TEST_STALL_AT=str(stall_at), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *arguments],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sigkill_when(child, ready)


def assert_same_store(a: Path, b: Path) -> None:
    files = assert_same_store_bytes(a, b)
    assert any(name.startswith("gram_only_grams/grams/0/c/") for name in files)


def assert_same_cache(resumed: GramCache, fresh: GramCache) -> None:
    assert resumed.layer_names == fresh.layer_names == ["0", "2", "4"]
    assert resumed.partition == fresh.partition
    np.testing.assert_array_equal(resumed.batches, fresh.batches)
    without_path = [{k: v for k, v in c.identity.items() if k != "path"} for c in (resumed, fresh)]
    assert without_path[0] == without_path[1]
    for key in ("kernel", "threshold", "precision", "batch_size", "epochs", "rows", "stored"):
        assert resumed.attrs[key] == fresh.attrs[key], key
    for name in resumed.layer_names:
        for b in resumed.batches:
            a, c = resumed.batch_gram(name, b), fresh.batch_gram(name, b)
            assert np.array_equal(a, c), (name, b, np.abs(a - c).max())


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ckapipe.store, "TARGET_CHUNK_BYTES", CHUNK_BYTES)


@pytest.mark.parametrize(
    ("m", "stall_row", "resume_row", "kept"),
    [(16, 128, 128, 8), (12, 100, 60, 5)],
    ids=["at-a-batch-boundary", "inside-a-batch"],
)
def test_sigkill_then_resume_gives_the_uninterrupted_cache(
    tmp_path, small_chunks, m, stall_row, resume_row, kept
):
    out, grams = tmp_path / "killed", tmp_path / "killed.grams"
    killed_args = args(out, grams, m)
    last_kept = out / "gram_only_grams" / "grams" / "2" / "c" / str(stall_row // 16 * 16 // m - 1)

    def ready() -> bool:  # every batch the child can form before its stall is kept
        return rows_complete(out) >= resume_row and (last_kept / "0" / "0").is_file()

    kill_child_at(killed_args, stall_row, ready)
    interrupted = ActivationStore.open(out, allow_incomplete=True)
    assert interrupted.rows_complete == resume_row and not interrupted.is_complete
    assert interrupted.gram_only_batches_kept() == kept
    assert not grams.exists()

    resumed = run_extract(killed_args)
    assert resumed.exit_code == 0, resumed.output
    fresh_args = args(tmp_path / "fresh", tmp_path / "fresh.grams", m)
    fresh = run_extract(fresh_args)
    assert fresh.exit_code == 0, fresh.output
    assert_same_cache(GramCache.open(grams), GramCache.open(tmp_path / "fresh.grams"))
    assert_same_store(out, tmp_path / "fresh")
    if m == 12:
        assert GramCache.open(grams).batch_sizes.tolist()[-1] == 4  # a short last batch

    # killed after the store's completion flag, before the cache's rename: rebuilt from the
    # store (the Gram-only layers' Grams copied from it), equal again
    shutil.rmtree(grams)
    again = run_extract(killed_args)
    assert again.exit_code == 0, again.output
    assert_same_cache(GramCache.open(grams), GramCache.open(tmp_path / "fresh.grams"))


def test_a_resume_with_other_gram_settings_is_refused_and_info_verify_see_the_grams(
    tmp_path, small_chunks
):
    out, grams = tmp_path / "killed", tmp_path / "killed.grams"
    kill_child_at(args(out, grams, 12), 100, lambda: rows_complete(out) >= 60)
    before = store_files(out)

    refusals = {
        "gram_only": (
            args(out, grams, 12, gram_only="0"),
            r"Gram-only layers \(--gram-only\) are \['0', '2'\], but this run's are \['0'\].*"
            r"re-run with --gram-only 0,2 to resume it",
        ),
        "kernel": (
            args(out, grams, 12, "--gram-kernel", "rbf"),
            r"--gram-kernel 'linear' \(this run: 'rbf'\).*Re-run with the original settings",
        ),
        "batch size": (
            args(out, grams, 16),
            r"--gram-batch-size 12 \(this run: 16\)",
        ),
    }
    for what, (arguments, message) in refusals.items():
        refused = run_extract(arguments)
        assert refused.exit_code != 0, what
        assert re.search(message, " ".join(refused.output.split())), (what, refused.output)
    assert store_files(out) == before and not grams.exists()  # nothing touched

    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "INCOMPLETE: 60 of 160 rows" in info.output
    assert "kept in the store: 5 of 14 batches (m = 12, kernel linear" in info.output
    described = json.loads(CliRunner().invoke(main, ["info", "--json", str(out)]).output)
    assert described["gram_only_grams"]["batches_kept"] == 5

    resumed = run_extract(args(out, grams, 12))
    assert resumed.exit_code == 0, resumed.output
    info = CliRunner().invoke(main, ["info", str(out)])
    assert "14 of 14 batches" in info.output
    report = verify(out)
    assert report.ok, report.summary()
    gram_chunks = sorted(out.glob("gram_only_grams/grams/0/c/*/0/0"))
    assert len(gram_chunks) == 13 and (out / "gram_only_grams/grams_last/2/c/0/0/0").is_file()
    # a flipped byte in a kept Gram is found by verify; a deleted one by every open
    damaged = gram_chunks[3]
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = verify(out)
    assert not report.ok and "gram_only_grams/grams/0" in report.summary()
    damaged.unlink()
    with pytest.raises(IntegrityError, match="gram_only_grams/grams/0"):
        ActivationStore.open(out)


def _small_store(path: Path, **options) -> ActivationStore:
    layers = [LayerRecord("a", (6,), "flatten", 6)]
    gram_only = [LayerRecord("g", (5,), "flatten", 5)]
    return ActivationStore.create(
        path, layers=layers, gram_only=gram_only, sample_ids=np.arange(30), dtype="float32",
        row_block=4, **options,
    )  # fmt: skip


def test_store_keeps_gram_only_grams_per_batch(tmp_path):
    kept = GramRequest(out=tmp_path / "g", batch_size=8).kept_record(["a", "g"])
    with _small_store(tmp_path / "s", gram_only_grams=kept) as store:
        assert store.gram_only_grams == kept
        assert store.gram_only_batch_count() == 4  # 30 = 3 x 8 + 6: a short last batch of 6
        gram = np.random.default_rng(0).normal(size=(8, 8))
        store.write_gram_only_gram("g", 1, gram)
        with pytest.raises(StoreError, match="not written yet"):
            store.read_gram_only_gram("g", 1)  # rows_complete 0 covers no batch
        store.write_rows(0, {"a": np.ones((16, 6)), "g": np.ones((16, 5))})
        store.set_rows_complete(16)
        assert np.array_equal(store.read_gram_only_gram("g", 1), gram)
        with pytest.raises(StoreError, match="resume point must be a batch boundary"):
            store.set_rows_complete(20)
        with pytest.raises(StoreError, match=r"float64 of shape \(6, 6\)"):
            store.write_gram_only_gram("g", 3, np.zeros((8, 8)))
        with pytest.raises(StoreError, match="no per-batch Grams of layer 'a'"):
            store.write_gram_only_gram("a", 0, gram)
        with pytest.raises(StoreError, match="batches 0…3, not 4"):
            store.write_gram_only_gram("g", 4, gram)
    with pytest.raises(StoreError, match="between 4 and the 30 samples"):
        _small_store(tmp_path / "bad", gram_only_grams=dict(kept, batch_size=31))


def test_a_gram_only_store_without_kept_grams_still_says_to_re_extract(tmp_path):
    """A Gram-only store as ckapipe wrote it before the Grams were kept (no gram_only_grams)."""
    with _small_store(tmp_path / "old") as store:
        store.write_rows(0, {"a": np.ones((8, 6)), "g": np.ones((8, 5))})
        store.set_rows_complete(8)
        request = GramRequest(out=tmp_path / "g", batch_size=8)
        writer = FusedGramWriter(request, store, ["a", "g"], torch.device("cpu"))
        with writer, pytest.raises(GramCacheUsageError, match="older ckapipe.*rm -r"):
            writer.resume(8)


def test_resume_points_far_apart_are_warned_about(tmp_path, caplog):
    """Batches of 8 and m = 12: resume points only every lcm = 24 rows, said once at the start."""
    from ckapipe.extract.extraction import extract_activations

    with caplog.at_level("WARNING", logger="ckapipe.extract"):
        store = extract_activations(
            "models:make_mlp", {"factory": "models:vector_dataset", "kwargs": {"n": 48}},
            layers="0,4", out=tmp_path / "s", batch_size=8, row_block=8, progress=False,
            gram=GramRequest(out=tmp_path / "g", batch_size=12), gram_only=["0"],
        )  # fmt: skip
    assert "lcm(batch size 8, Gram batch size 12) = 24 rows" in caplog.text
    assert store.gram_only_batches_kept() == 4 and GramCache.open(tmp_path / "g").batches.size == 4
