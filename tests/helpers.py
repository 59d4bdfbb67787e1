"""Small helpers shared by several test modules (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run or dry run as {rule: count}, the total dropped;
    {} when there is no table (nothing to do)."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return {}
    counts = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts


def store_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes) but the writer lock: to compare two
    stores byte for byte, or a store before and after a refused command."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ".writer.lock"
    }


def rows_complete(path: Path) -> int:
    """The resume point of a store being written by another process; -1 until it can be opened."""
    from ckapipe.store import ActivationStore

    try:
        return ActivationStore.open(path, allow_incomplete=True, check_chunks=False).rows_complete
    except Exception:  # noqa: BLE001 - not created yet, or its metadata half written
        return -1


def float32_store(path: Path, data: dict) -> Path:
    """A complete float32 activation store at ``path`` holding ``data`` ({layer: (n, p)}),
    written in one call (row block 64)."""
    import numpy as np

    from ckapipe.store import ActivationStore, LayerRecord

    n = len(next(iter(data.values())))
    records = [LayerRecord(name, (x.shape[1],), "flatten", x.shape[1]) for name, x in data.items()]
    store = ActivationStore.create(
        path, layers=records, sample_ids=np.arange(n), dtype="float32", row_block=64
    )
    store.write_rows(0, data)
    store.set_rows_complete(n)
    store.mark_complete()
    store.close()
    return path


# attributes of a store's root that record when it was written: the only bytes two extractions
# of the same inputs may differ in
STORE_TIMESTAMPS = frozenset({"started_at", "created_at", "completed_at"})


def assert_same_store_bytes(a: Path, b: Path) -> dict[str, bytes]:
    """Two stores hold the same files with the same bytes, but for the timestamps in the root
    metadata; returns ``a``'s files."""
    import json

    files_a, files_b = store_files(a), store_files(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        if name != "zarr.json":
            assert files_a[name] == files_b[name], name
    attrs_a = json.loads(files_a["zarr.json"])["attributes"]
    attrs_b = json.loads(files_b["zarr.json"])["attributes"]
    for key in STORE_TIMESTAMPS:
        attrs_a.pop(key), attrs_b.pop(key)
    assert attrs_a == attrs_b
    return files_a


def sigkill_when(child: subprocess.Popen, ready: Callable[[], bool], within: float = 90) -> None:
    """SIGKILL ``child`` as soon as ``ready()`` holds; fail if it exits first (showing its
    stderr, which must be a pipe) or if that takes more than ``within`` seconds."""
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, f"the child did not get there within {within} s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def small_cnn_relus(n: int, seed: int = 0) -> dict:
    """{"relu1", "relu3"}: the two ReLU outputs (flattened, float32) of the small CNN of
    tests/models.py (16 channels, weights from ``seed``) on its n random 8×8 images."""
    import torch
    from models import image_dataset, make_cnn

    net = make_cnn(channels=16, seed=seed)
    acts = {}
    for i in (1, 3):
        net[i].register_forward_hook(
            lambda mod, inp, out, i=i: acts.__setitem__(f"relu{i}", out.flatten(1).numpy().copy())
        )
    with torch.no_grad():
        net(image_dataset(n=n, size=8)[:][0])
    return acts


def load_file_module(path: Path, name: str):
    """Import the Python file ``path`` as module ``name`` on its own (not from a package: the
    benchmarks and tools are scripts beside the package, not in it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
