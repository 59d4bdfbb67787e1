"""The shared cache through the installed `ckapipe run`, with a tiny user module instead of the
demo (no training): an edited transform re-extracts even when its file keeps its size and mtime,
unchanged code reuses the store, and two studies run at the same time on one cache root both
succeed with their shared store extracted once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ckapipe.store import ActivationStore

pytestmark = pytest.mark.slow

CKAPIPE = shutil.which("ckapipe")

USER_MODULE = """
import torch


def model(width=16):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 4), torch.nn.ReLU()
    )


def data(n=64):
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=generator))


def transform(x):
    return x * 1.0
"""


def user_module(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinyuser.py"
    path.write_text(USER_MODULE)
    return path


def study_config(name: str, cache: Path, models: dict) -> dict:
    return {
        "study": name,
        "models": {
            model: {
                "spec": {"factory": "tinyuser:model", "kwargs": {"width": width}},
                "layers": ["1", "3"],
            }
            for model, width in models.items()
        },  # fmt: skip
        "datasets": {
            "tiny": {"spec": {"factory": "tinyuser:data", "transform": "tinyuser:transform"}}
        },
        "extraction": {"batch_size": 16, "device": "cpu"},
        "storage": {"cache_root": str(cache)},
        "analysis": {"batch_size": 16, "n_bootstrap": 0},
    }


def ckapipe_run(config: dict, workdir: Path, code: Path, *snakemake: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{config['study']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), *sys.path])}
    assert CKAPIPE, "the ckapipe console script is not installed"
    return subprocess.Popen(
        [CKAPIPE, "run", str(path), "--workdir", str(workdir), "--", "--cores", "2", *snakemake],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-6000:]
    return output


def stores(cache: Path) -> set[str]:
    return {path.name for path in (cache / "stores").glob("*.zarr")}


def test_edited_transform_re_extracts_and_unchanged_code_reuses(tmp_path):
    code, cache, workdir = tmp_path / "code", tmp_path / "cache", tmp_path / "study"
    module = user_module(code)
    config = study_config("edits", cache, {"tiny": 16})
    started = time.perf_counter()
    finish(ckapipe_run(config, workdir, code, "--until", "extract"))
    (first,) = stores(cache)
    before = ActivationStore.open(cache / "stores" / first).read("3")

    # unchanged code: the store is reused, nothing to do
    dry = finish(ckapipe_run(config, workdir, code, "--until", "extract", "-n"))
    assert "rule extract" not in dry and "rule" not in dry.split("Job stats:")[0], dry

    # same size, same mtime: only the content (and so the ctime) tells the edit apart
    stat = module.stat()
    module.write_text(USER_MODULE.replace("x * 1.0", "x * 2.0"))
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert module.stat().st_size == stat.st_size
    assert module.stat().st_mtime_ns == stat.st_mtime_ns
    finish(ckapipe_run(config, workdir, code, "--until", "extract"))
    assert len(stores(cache) - {first}) == 1, stores(cache)
    (second,) = stores(cache) - {first}
    after = ActivationStore.open(cache / "stores" / second).read("3")
    # the new store holds the edited transform's activations; the old one is left as it was
    assert not np.allclose(before, after)
    assert np.array_equal(ActivationStore.open(cache / "stores" / first).read("3"), before)
    print(f"\nthree runs: {time.perf_counter() - started:.1f} s")


def test_two_studies_at_once_on_one_cache_root(tmp_path):
    code, cache = tmp_path / "code", tmp_path / "cache"
    user_module(code)
    # "shared" is the same content in both studies (one store key); each also has its own model
    first = study_config("first", cache, {"shared": 16, "only_first": 12})
    second = study_config("second", cache, {"shared": 16, "only_second": 20})
    started = time.perf_counter()
    processes = [
        ckapipe_run(first, tmp_path / "a", code),
        ckapipe_run(second, tmp_path / "b", code),
    ]
    outputs = [finish(process) for process in processes]
    print(f"\ntwo concurrent studies: {time.perf_counter() - started:.1f} s")

    assert len(stores(cache)) == 3, stores(cache)
    receipts = {
        study: {
            path.stem: json.loads(path.read_text())
            for path in (tmp_path / workdir / "results" / study / "receipts/stores").glob("*.json")
        }
        for study, workdir in (("first", "a"), ("second", "b"))
    }
    (shared,) = set(receipts["first"]) & set(receipts["second"])
    store = ActivationStore.open(cache / "stores" / f"{shared}.zarr")
    assert store.is_complete and store.n_samples == 64
    # extracted once: one job made it, the other found it complete (or waited for it)
    logs = [
        (tmp_path / workdir / "results" / study / "logs/extract" / f"{shared}.log").read_text()
        for study, workdir in (("first", "a"), ("second", "b"))
    ]
    assert sum("found complete store" in log for log in logs) == 1, logs
    assert sum("found complete store" not in log for log in logs) == 1, logs
    # both results hold the shared model's CKA, computed from the same store
    for study, workdir in (("first", "a"), ("second", "b")):
        table = tmp_path / workdir / "results" / study / "tiny" / "cka.csv"
        assert table.is_file(), outputs
        assert "shared" in table.read_text()
    # nothing of a study is in the cache root but cache entries
    assert sorted(p.name for p in cache.iterdir()) == ["grams", "sha256-index.json", "stores"]
