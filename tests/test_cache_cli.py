"""`ckapipe cache`: listing, sizing, verifying and pruning a real cache root."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from ckapipe.analyze.gram_cache import build_gram_cache
from ckapipe.cache import config_keys
from ckapipe.cli import main
from ckapipe.store import ActivationStore, LayerRecord

CKAPIPE = shutil.which("ckapipe")


def _config(workdir: Path, name: str = "study", layers: tuple[str, ...] = ("relu1",)) -> Path:
    np.save(workdir / "x.npy", np.zeros((8, 3, 32, 32), dtype=np.float32))
    config = {
        "study": name,
        "models": {"m": {"spec": {"factory": "ckapipe.demo.models:mlp"}, "layers": list(layers)}},
        "datasets": {"d": {"spec": {"array": "x.npy"}}},
        "storage": {"cache_root": "cache"},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _store(path: Path, *, complete: bool = True) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = ActivationStore.create(
        path,
        layers=[LayerRecord("a", (6,), "flatten", 6), LayerRecord("b", (4,), "flatten", 4)],
        sample_ids=np.arange(32),
        dtype="float32",
        row_block=16,
        attrs={
            "model": {"factory": "pkg.models:net", "kwargs": {"width": 4}},
            "dataset": {"array": "data/x.npy"},
        },
    )
    with store:
        store.write_rows(0, {"a": rng.normal(size=(16, 6)), "b": rng.normal(size=(16, 4))})
        store.set_rows_complete(16)
        if complete:
            store.write_rows(16, {"a": rng.normal(size=(16, 6)), "b": rng.normal(size=(16, 4))})
            store.set_rows_complete(32)
            store.mark_complete()
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A cache root of the study config's layout: one store of the config, one unused store,
    one incomplete store, and the Gram cache of the first."""
    keys = config_keys(_config(tmp_path), workdir=tmp_path)
    (used,) = keys.stores
    (used_gram,) = keys.grams
    cache = tmp_path / "cache"
    _store(cache / "stores" / f"{used}.zarr")
    _store(cache / "stores" / "00000000000000aa.zarr")
    _store(cache / "stores" / "00000000000000bb.zarr", complete=False)
    build_gram_cache(
        cache / "stores" / f"{used}.zarr", cache / "grams" / f"{used_gram}.zarr", batch_size=8
    )
    return cache


def _invoke(*args: str, cwd: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["cache", *args, "--workdir", str(cwd)])
    return result.exit_code, result.output


def test_ls_lists_every_entry_with_state_and_users(root: Path) -> None:
    workdir = root.parent
    code, output = _invoke("ls", "--config", str(workdir / "study.yaml"), cwd=workdir)
    assert code == 0, output
    lines = output.splitlines()
    assert len(lines) == 4
    assert sum(line.startswith("store") for line in lines) == 3
    assert sum(line.startswith("gram") for line in lines) == 1
    assert "pkg.models:net(width=4)" in lines[0] and "x.npy" in lines[0] and "2 layers" in lines[0]
    incomplete = next(line for line in lines if "00000000000000bb" in line)
    assert " incomplete " in incomplete
    unused = next(line for line in lines if "00000000000000aa" in line)
    assert unused.endswith("used by: -")
    assert sum("study.yaml" in line for line in lines) == 2  # its store and its Gram cache

    code, output = _invoke("ls", "--json", str(root), cwd=workdir)
    records = json.loads(output)
    assert {record["state"] for record in records} == {"complete", "incomplete"}
    assert all(record["size"] > 0 for record in records)


def test_du_totals_per_kind(root: Path) -> None:
    code, output = _invoke("du", str(root), cwd=root.parent)
    assert code == 0, output
    assert re.search(r"^store\s+3 entries", output, re.M)
    assert re.search(r"^gram\s+1 entries", output, re.M)
    assert re.search(r"^total\s+4 entries", output, re.M)


def test_verify_flags_a_damaged_entry(root: Path) -> None:
    code, output = _invoke("verify", str(root), cwd=root.parent)
    assert code == 1  # the incomplete store
    assert output.count("OK ") == 3 and output.count("DAMAGED ") == 1
    shutil.rmtree(root / "stores" / "00000000000000bb.zarr")
    chunk = next(
        p for p in (root / "stores" / "00000000000000aa.zarr").rglob("c/*/*") if p.is_file()
    )
    chunk.write_bytes(chunk.read_bytes()[:-3])
    code, output = _invoke("verify", str(root), cwd=root.parent)
    assert code == 1 and "00000000000000aa" in output and output.count("DAMAGED ") == 1


def _hold(lock: Path) -> subprocess.Popen[str]:
    """A live process holding the writer lock ``lock``, as a workflow job or writer would."""
    code = (
        "import sys, time\n"
        "from ckapipe.formats import WriterLock\n"
        f"WriterLock({str(lock)!r}, what='test').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_gc_dry_run_then_removes_only_unused_idle_entries(root: Path) -> None:
    workdir = root.parent
    config = str(workdir / "study.yaml")
    before = sorted(p.name for p in root.glob("*/*.zarr"))
    code, output = _invoke("gc", "--keep-config", config, cwd=workdir)
    assert code == 0, output
    assert "would remove store 00000000000000aa" in output
    assert "would remove store 00000000000000bb" in output
    assert "2 entries" in output and "would be freed" in output
    assert sorted(p.name for p in root.glob("*/*.zarr")) == before  # a dry run

    # a live process holds the job lock of one unused entry: it must survive --yes
    holder = _hold(root / "stores" / ".00000000000000aa.zarr.job.lock")
    try:
        code, output = _invoke("gc", "--keep-config", config, "--yes", cwd=workdir)
    finally:
        holder.kill()
        holder.wait()
    assert code == 0, output
    assert "kept    store 00000000000000aa: being written" in output
    assert "removed store 00000000000000bb" in output
    assert (root / "stores" / "00000000000000aa.zarr").is_dir()
    assert not (root / "stores" / "00000000000000bb.zarr").exists()
    assert len(list(root.glob("*/*.zarr"))) == 3  # the study's store and Gram cache stay

    # once its holder is gone, it goes too
    code, output = _invoke("gc", "--keep-config", config, "--yes", cwd=workdir)
    assert "removed store 00000000000000aa" in output
    assert not (root / "stores" / "00000000000000aa.zarr").exists()


def test_gc_keeps_an_entry_whose_writer_lock_is_held(root: Path) -> None:
    holder = _hold(root / "stores" / "00000000000000aa.zarr" / ".writer.lock")
    try:
        code, output = _invoke(
            "gc", "--keep-config", str(root.parent / "study.yaml"), "--yes", cwd=root.parent
        )
        assert (root / "stores" / "00000000000000aa.zarr").is_dir()
        assert "being written" in output
    finally:
        holder.kill()
        holder.wait()


def test_gc_without_keep_config_is_refused(root: Path) -> None:
    code, output = _invoke("gc", str(root), cwd=root.parent)
    assert code == 2 and "--keep-config" in output


def test_missing_root_is_one_error_line(tmp_path: Path) -> None:
    code, output = _invoke("ls", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert code == 1 and output.startswith("Error: cache root") and "storage.cache_root" in output


@pytest.mark.parametrize("demo", [True, False], ids=["demo", "array-dataset"])
def test_config_keys_match_the_workflow_plan(tmp_path: Path, demo: bool) -> None:
    """The keys `ckapipe cache` computes are those Snakemake's plan uses (a dry run's receipts)."""
    config = None if demo else _config(tmp_path, layers=("relu1", "relu2"))
    args = [] if config is None else [str(config)]
    assert CKAPIPE
    started = time.perf_counter()
    completed = subprocess.run(
        [CKAPIPE, "run", *args, "--workdir", str(tmp_path), "--", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert time.perf_counter() - started < 300
    kinds = "stores|grams|demo-data|demo-models"
    planned = set(re.findall(rf"receipts/({kinds})/([0-9a-f]{{16}})", completed.stdout))
    # a minibatch study of one epoch: the extract jobs write the Gram caches (--gram-target)
    planned |= {
        ("grams", key)
        for key in re.findall(r"--gram-target \S*/grams/([0-9a-f]{16})\.zarr", completed.stdout)
    }
    keys = config_keys(config, workdir=tmp_path)
    assert planned == (
        {("stores", key) for key in keys.stores}
        | {("grams", key) for key in keys.grams}
        | {("demo-data", key) for key in keys.demo_data}
        | {("demo-models", key) for key in keys.demo_models}
    )
    assert len(keys.demo_models) == (4 if demo else 0)
    assert len(keys.demo_data) == (1 if demo else 0)
    assert keys.cache_root == (tmp_path / ("cache" if not demo else ".cache/ckapipe")).resolve()


def _demo_study(workdir: Path) -> Path:
    """A study with one demo-trained model on the demo dataset, its cache under ``cache``."""
    config = {
        "study": "demo_user",
        "models": {
            "t": {
                "spec": {"factory": "ckapipe.demo.models:mlp"},
                "layers": ["relu1"],
                "train": {"seed": 0},
            }
        },
        "datasets": {"probe": {"demo": "probe"}},
        "storage": {"cache_root": "cache"},
    }
    path = workdir / "demo_user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_gc_covers_the_demo_data_and_trained_models(root: Path) -> None:
    workdir = root.parent
    demo_study = _demo_study(workdir)
    keys = config_keys(demo_study, workdir=workdir)
    ((data,), (model,)) = keys.demo_data, keys.demo_models
    for folder, key in (("data", data), ("models", model), ("models", "00000000000000cc")):
        (root / "demo" / folder / key).mkdir(parents=True)
        (root / "demo" / folder / key / "weights.pt").write_bytes(b"x" * 100)
    (root / "demo/models" / model / "metrics.json").write_text(
        json.dumps({"factory": "ckapipe.demo.models:mlp", "seed": 0})
    )
    # a build in progress (its job holds the entry's job lock): its staging folder is not an
    # entry, and it stays
    (root / "demo/models/.00000000000000dd.building-1").mkdir()
    holder = _hold(root / "demo/models/.00000000000000dd.job.lock")
    try:
        code, output = _invoke("ls", "--config", str(demo_study), cwd=workdir)
        assert code == 0, output
        listed = [line for line in output.splitlines() if line.startswith("demo-")]
        assert len(listed) == 3, output
        trained = next(line for line in listed if model in line)
        assert "ckapipe.demo.models:mlp seed 0" in trained and str(demo_study) in trained
        staging = [line for line in output.splitlines() if line.startswith("staging")]
        assert len(staging) == 1 and " being written " in staging[0], output

        # kept by the study that trains on it; the unused model goes (so do the array study's
        # store and Gram cache, which this study does not use)
        code, output = _invoke("gc", "--keep-config", str(demo_study), "--yes", cwd=workdir)
    finally:
        holder.kill()
        holder.wait()
    assert code == 0, output
    assert "removed demo-model 00000000000000cc" in output
    assert (root / "demo/data" / data).is_dir() and (root / "demo/models" / model).is_dir()
    assert not (root / "demo/models/00000000000000cc").exists()
    assert (root / "demo/models/.00000000000000dd.building-1").is_dir()

    # a study that does not use the demo does not keep its entries
    code, output = _invoke("gc", "--keep-config", str(workdir / "study.yaml"), cwd=workdir)
    assert f"would remove demo-data {data}" in output
    assert f"would remove demo-model {model}" in output


def test_gc_removes_the_staging_folder_of_a_killed_gram_build_never_a_live_one(
    root: Path,
) -> None:
    """A real `ckapipe gram --out` into the cache, paused mid-build (after its staging folder
    holds chunks): while it lives, `ls` shows its staging folder as being written and `gc --yes`
    keeps it; after SIGKILL, `ls` shows it orphaned with its size and `gc --yes` removes it."""
    from test_gram_cache import M, _paused_gram, make_store

    workdir = root.parent
    config = str(workdir / "study.yaml")
    store = make_store(workdir / "source.zarr", dtype="float32")
    out = root / "grams" / "00000000000000cc.zarr"
    staging = root / "grams" / ".00000000000000cc.zarr.staging"
    process, release = _paused_gram(
        workdir, [str(store), "-m", str(M), "--device", "cpu", "--out", str(out)]
    )
    try:
        assert staging.is_dir() and any(staging.iterdir())
        code, output = _invoke("ls", str(root), cwd=workdir)
        assert code == 0, output
        (line,) = [line for line in output.splitlines() if line.startswith("staging")]
        assert staging.name in line and " being written " in line, output
        assert "for grams/00000000000000cc.zarr" in line
        code, output = _invoke("gc", "--keep-config", config, "--yes", cwd=workdir)
        assert code == 0, output
        assert f"kept    staging {staging.name}: being written by a live process" in output
        assert staging.is_dir()  # the live writer's folder survives
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert staging.is_dir() and not out.exists()  # what a killed writer leaves

    code, output = _invoke("ls", "--json", str(root), cwd=workdir)
    (record,) = [r for r in json.loads(output) if r["kind"] == "staging"]
    assert record["key"] == staging.name and record["state"] == "orphaned"
    assert record["size"] > 0
    code, output = _invoke("du", str(root), cwd=workdir)
    assert re.search(r"^staging\s+1 entries", output, re.M), output
    code, output = _invoke("gc", "--keep-config", config, cwd=workdir)
    assert f"would remove staging {staging.name}" in output and staging.is_dir()  # dry run
    code, output = _invoke("gc", "--keep-config", config, "--yes", cwd=workdir)
    assert code == 0, output
    assert f"removed staging {staging.name}" in output
    assert not staging.exists()
    # the next build of that output is not hindered by the removal
    built = subprocess.run(
        [CKAPIPE, "gram", str(store), "-m", str(M), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert (out / "zarr.json").is_file()
