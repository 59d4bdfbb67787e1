"""Fused extract + Gram: the cache an extraction builds as it writes is bit-for-bit the cache
``ckapipe gram`` builds from the finished store, and Gram-only layers are recorded as such.

Equality is exact (``np.array_equal``): both caches must come from the stored values (float16
residuals, bfloat16 bits), the same column tiles and the same functions. Small chunks make the
layers span several column tiles and several row chunks, and the sizes leave a short last batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import rows_complete
from reference import linear_gram, u_centered

import ckapipe
import ckapipe.store as store_module
from ckapipe.analyze.gram_cache import GramCache, GramCacheError, build_gram_cache
from ckapipe.cli import main
from ckapipe.errors import UsageError
from ckapipe.extract.extraction import extract_activations
from ckapipe.store import ActivationStore, StoreError

IMAGES = {"factory": "models:image_dataset", "kwargs": {"n": 46}}  # 46 = 3 x 12 + 10
LAYERS = ["0", "1", "6"]  # conv map (512), its ReLU (512), logits (10)
M = 12
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 4 KiB chunks: the 512-wide layers span several column tiles, the narrow one many rows
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 4096)


def extract(tmp_path, name="store", gram=None, **options):
    options.setdefault("batch_size", 4)
    options.setdefault("progress", False)
    options.setdefault("row_block", 8)
    return extract_activations(
        "models:make_cnn", IMAGES, layers=LAYERS, out=tmp_path / name, gram=gram, **options
    )


def grams_of(cache: GramCache) -> dict[str, list[np.ndarray]]:
    return {name: [cache.batch_gram(name, b) for b in cache.batches] for name in cache.layer_names}


def assert_same_cache(fused: GramCache, built: GramCache) -> None:
    assert fused.layer_names == built.layer_names
    np.testing.assert_array_equal(fused.batches, built.batches)
    assert fused.partition == built.partition
    without_path = [{k: v for k, v in c.identity.items() if k != "path"} for c in (fused, built)]
    assert without_path[0] == without_path[1]
    keys = ("kernel", "threshold", "precision", "storage_dtype", "batch_size", "epochs", "rows")
    for key in (*keys, "stored"):
        assert fused.attrs[key] == built.attrs[key], key
    for name in fused.layer_names:
        for b in fused.batches:
            a, c = fused.batch_gram(name, b), built.batch_gram(name, b)
            assert np.array_equal(a, c), (name, b, np.abs(a - c).max())
    # the stored values themselves, in the stored dtype, bit for bit
    for group in ("grams", "grams_last"):
        for name in fused.layer_names:
            a = zarr.open_group(str(fused.path))[f"{group}/{name}"][...]
            c = zarr.open_group(str(built.path))[f"{group}/{name}"][...]
            assert a.dtype == c.dtype == np.dtype(fused.storage_dtype)
            assert a.tobytes() == c.tobytes(), (group, name)


@pytest.mark.parametrize("storage", ["float32", "float64"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_fused_cache_is_bit_identical_to_ckapipe_gram(tmp_path, dtype, kernel, storage):
    request = ckapipe.GramRequest(
        out=tmp_path / "fused.zarr", batch_size=M, kernel=kernel, storage=storage
    )
    store = extract(tmp_path, gram=request, dtype=dtype)
    fused = GramCache.open(tmp_path / "fused.zarr")
    built = build_gram_cache(
        store, tmp_path / "built.zarr", batch_size=M, kernel=kernel, device="cpu", storage=storage
    )
    assert fused.batch_sizes.tolist() == [12, 12, 12, 10]  # a short last batch
    assert fused.storage_dtype == storage
    assert_same_cache(fused, built)


def test_fused_linear_grams_match_float64_reference(tmp_path):
    request = ckapipe.GramRequest(
        out=tmp_path / "g.zarr", batch_size=M, precision="float64", storage="float64"
    )
    store = extract(tmp_path, gram=request, dtype="float32")
    cache = GramCache.open(tmp_path / "g.zarr")
    for name in store.layer_names:
        values = np.asarray(store.read(name), dtype=np.float64)
        for b in cache.batches:
            rows = values[b * M : min((b + 1) * M, 46)]
            reference = u_centered(linear_gram(rows - rows.mean(0)))
            np.testing.assert_allclose(cache.batch_gram(name, b), reference, rtol=1e-9, atol=1e-9)


def test_gram_only_layer_is_not_stored_and_its_grams_equal_a_stored_layers(tmp_path):
    request = ckapipe.GramRequest(out=tmp_path / "g.zarr", batch_size=M)
    store = extract(tmp_path, gram=request, gram_only=["0"])
    assert store.layer_names == ["1", "6"]
    assert [r.name for r in store.gram_only] == ["0"]
    assert "0" not in zarr.open_group(str(store.path / "layers"), mode="r")
    with pytest.raises(StoreError, match="Gram-only.*--gram-only 0"):
        store.read("0")
    cache = GramCache.open(tmp_path / "g.zarr")
    assert cache.layer_names == ["0", "1", "6"]
    # the same extraction storing every layer gives the same Grams for layer 0
    full_request = ckapipe.GramRequest(out=tmp_path / "full.zarr", batch_size=M)
    extract(tmp_path, name="full", gram=full_request)
    full = GramCache.open(tmp_path / "full.zarr")
    for b in cache.batches:
        assert np.array_equal(cache.batch_gram("0", b), full.batch_gram("0", b))
    # ckapipe gram refuses the Gram-only layer, naming the fix
    with pytest.raises(GramCacheError, match="Gram-only.*re-extract without --gram-only 0"):
        build_gram_cache(store, tmp_path / "again.zarr", batch_size=M, layers=["0"])
    info = CliRunner().invoke(main, ["info", str(store.path)])
    assert info.exit_code == 0, info.output
    assert "Gram-only" in info.output and "0" in info.output


def test_fused_and_built_caches_are_interchangeable_for_analyze(tmp_path):
    results = {}
    for how in ("fused", "built"):
        caches = []
        for seed, name in ((0, "a"), (1, "b")):
            model = {"factory": "models:make_cnn", "kwargs": {"seed": seed}}
            out = tmp_path / how / f"{name}.grams"
            store_path = tmp_path / how / f"{name}.store"
            gram = ckapipe.GramRequest(out=out, batch_size=M) if how == "fused" else None
            store = extract_activations(
                model, IMAGES, layers=LAYERS, out=store_path, batch_size=4, row_block=8,
                progress=False, gram=gram,
            )  # fmt: skip
            if how == "built":
                build_gram_cache(store, out, batch_size=M, device="cpu")
            caches.append(str(out))
        result_path = tmp_path / how / "result"
        run = CliRunner().invoke(main, ["analyze", *caches, "--out", str(result_path)])
        assert run.exit_code == 0, run.output
        results[how] = ckapipe.load_result(result_path)
    fused, built = results["fused"], results["built"]
    assert list(fused.pairs) == list(built.pairs) and fused.pairs
    for key, pair in fused.pairs.items():
        assert np.array_equal(np.asarray(pair.cka), np.asarray(built.pairs[key].cka))


def test_bad_gram_requests_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="epoch 0 only"):
        ckapipe.GramRequest(out=tmp_path / "g", epochs=2)
    with pytest.raises(UsageError, match=">= 4"):
        ckapipe.GramRequest(out=tmp_path / "g", batch_size=3)
    with pytest.raises(UsageError, match="kernel"):
        ckapipe.GramRequest(out=tmp_path / "g", kernel="poly")
    with pytest.raises(UsageError, match=r"Gram storage must be one of \('float32', 'float64'\)"):
        ckapipe.GramRequest(out=tmp_path / "g", storage="float16")
    with pytest.raises(UsageError, match="needs a Gram request"):
        extract(tmp_path, gram_only=["0"])
    with pytest.raises(UsageError, match="not among the selected layers"):
        extract(tmp_path, gram=ckapipe.GramRequest(out=tmp_path / "g"), gram_only=["9"])
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="exists.*choose another --gram-out"):
        extract(tmp_path, name="s3", gram=ckapipe.GramRequest(out=tmp_path / "exists"))
    assert not (tmp_path / "s3").exists()
    with pytest.raises(UsageError, match="larger than"):
        extract(tmp_path, name="s2", gram=ckapipe.GramRequest(out=tmp_path / "g", batch_size=64))


def test_cli_fused_extract(tmp_path):
    args = [
        "extract", "--model", "models:make_cnn", "--dataset",
        '{"factory": "models:image_dataset", "kwargs": {"n": 46}}', "--layers", "0,1,6",
        "--out", str(tmp_path / "s"), "--batch-size", "4", "--no-progress",
        "--gram-out", str(tmp_path / "g"), "--gram-batch-size", str(M), "--gram-kernel", "rbf",
        "--gram-only", "0", "--gram-storage", "float64",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stored in float64" in result.output
    cache = GramCache.open(tmp_path / "g")
    assert cache.kernel == "rbf" and cache.layer_names == ["0", "1", "6"]
    assert cache.storage_dtype == "float64"
    # re-running reuses the complete store and its matching cache
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output


def test_fused_cache_survives_kill_and_resume(tmp_path, monkeypatch):
    """kill -9 an extraction mid-way (a real process); the resumed run's cache equals
    ckapipe gram's on the finished store. 64 rows done is not a multiple of m = 12, so the batch
    cut by the resume point is completed from the rows read back from the store."""
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 512)
    out, grams, n = tmp_path / "store", tmp_path / "grams", 160
    dataset = {"factory": "models:vector_dataset", "kwargs": {"n": n}}
    args = [
        "--model", "models:make_mlp", "--dataset", json.dumps(dataset), "--layers", "0,4",
        "--batch-size", "4", "--row-block", "8", "--out", str(out), "--no-progress",
        "--gram-out", str(grams), "--gram-batch-size", str(M),
    ]  # fmt: skip
    child_code = (
        "import ckapipe.store; ckapipe.store.TARGET_CHUNK_BYTES = 512; "
        "from ckapipe.extract.cli import extract_command; extract_command()"
    )
    stall_at = int(np.random.default_rng(0).permutation(n)[100])
    env = dict(os.environ, CKAPIPE_TEST_STALL_AT=str(stall_at), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, *args], env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 90
        while rows_complete(out) < 64:
            assert child.poll() is None, "the child extraction ended early"
            assert time.monotonic() < deadline, "the child wrote nothing within 90 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert ActivationStore.open(out, allow_incomplete=True).rows_complete == 64
    assert not grams.exists()
    resumed = CliRunner().invoke(main, ["extract", *args])
    assert resumed.exit_code == 0, resumed.output
    store = ActivationStore.open(out)
    built = build_gram_cache(store, tmp_path / "built", batch_size=M, device="cpu")
    fused = GramCache.open(grams)
    assert fused.batch_sizes.tolist()[-1] == 4
    assert_same_cache(fused, built)


def test_background_writer_stores_the_same_bytes_and_grams(tmp_path, monkeypatch):
    """With a free core the writes run on a writer thread, overlapping the next forward pass,
    and each row block is encoded (and its Grams formed) as soon as it is captured, while the
    zarr write waits for whole chunks (the narrow layer's chunks hold several row blocks): the
    store's chunk files and the Gram cache are the same as with inline writes."""
    import torch

    from ckapipe.extract import extraction

    modes = []  # whether each extraction wrote on the writer thread
    original = extraction._ChunkWriter.__init__

    def recording(self, *args, **kwargs):
        modes.append(kwargs["background"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(extraction._ChunkWriter, "__init__", recording)
    # a core free of torch's threads, whatever this machine has: the writer thread is used
    monkeypatch.setattr(os, "cpu_count", lambda: torch.get_num_threads() + 1)
    request = ckapipe.GramRequest(out=tmp_path / "bg.g", batch_size=M)
    background = extract(tmp_path, name="bg", gram=request)
    monkeypatch.setattr(os, "cpu_count", lambda: torch.get_num_threads())  # no free core
    inline = extract(
        tmp_path, name="inline", gram=ckapipe.GramRequest(out=tmp_path / "in.g", batch_size=M)
    )

    def chunks(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(root)}"  # chunk files
        }

    assert modes == [True, False]
    assert chunks(background.path) == chunks(inline.path) and chunks(background.path)
    assert_same_cache(GramCache.open(tmp_path / "bg.g"), GramCache.open(tmp_path / "in.g"))


def test_a_reused_store_refuses_a_fused_cache_of_another_storage(tmp_path):
    request = ckapipe.GramRequest(out=tmp_path / "g.zarr", batch_size=M)
    extract(tmp_path, gram=request)
    assert GramCache.open(tmp_path / "g.zarr").storage_dtype == "float32"
    extract(tmp_path, gram=request)  # the same request: store and cache reused
    wider = ckapipe.GramRequest(out=tmp_path / "g.zarr", batch_size=M, storage="float64")
    with pytest.raises(UsageError, match=r"not this extraction's Gram cache .*storage"):
        extract(tmp_path, gram=wider)
