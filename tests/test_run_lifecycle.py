"""`ckapipe run` as a process: the end-of-run summary, stale Snakemake locks, and stopping it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from ckapipe.run import live_snakemake

CKAPIPE = shutil.which("ckapipe")


def _tiny_study(workdir: Path) -> Path:
    """Two untrained MLPs (different layer lists) on 64 random images: about a minute of work."""
    np.save(workdir / "x.npy", np.random.default_rng(0).normal(size=(64, 1, 16, 16)))
    mlp = {"factory": "ckapipe.demo.models:mlp"}
    config = {
        "study": "tiny",
        "models": {
            "a": {"spec": mlp, "layers": ["relu1", "relu2"]},
            "b": {"spec": {**mlp, "kwargs": {}}, "layers": ["relu1", "relu2", "relu3"]},
        },
        "datasets": {"d": {"spec": {"array": "x.npy"}}},
        "storage": {"cache_root": "cache"},
        "analysis": {"batch_size": 8},
        "extraction": {"device": "cpu"},
    }
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    assert CKAPIPE
    return subprocess.run(
        [CKAPIPE, "run", *args[:1], "--workdir", str(workdir), *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def _stale_lock(workdir: Path) -> Path:
    # what a killed Snakemake leaves: its lock files (same names as Snakemake's own)
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.input.lock").write_text(str(workdir / "x.npy") + "\n")
    (locks / "0.output.lock").write_text(str(workdir / "results") + "\n")
    return locks


def test_stale_lock_is_removed_with_one_line(tmp_path: Path) -> None:
    config = _tiny_study(tmp_path)
    locks = _stale_lock(tmp_path)
    completed = _run(str(config), "--", "--dry-run", workdir=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "removed a stale Snakemake lock" in completed.stdout
    assert not any(locks.iterdir())


def test_lock_of_a_live_snakemake_is_refused_naming_its_pid(tmp_path: Path) -> None:
    config = _tiny_study(tmp_path)
    locks = _stale_lock(tmp_path)
    # a live process whose command line is a Snakemake of this working directory
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "snakemake",
            "--directory",
            str(tmp_path),
        ]
    )
    try:
        assert live_snakemake(tmp_path) == [other.pid]
        completed = _run(str(config), "--", "--dry-run", workdir=tmp_path)
    finally:
        other.kill()
        other.wait()
    assert completed.returncode == 1
    assert completed.stderr.startswith(f"Error: Snakemake (pid {other.pid}) is already running")
    assert len(completed.stderr.strip().splitlines()) == 1
    assert len(list(locks.iterdir())) == 2  # not touched


@pytest.mark.slow
def test_sigterm_stops_snakemake_and_a_rerun_completes_with_the_summary(tmp_path: Path) -> None:
    config = _tiny_study(tmp_path)
    assert CKAPIPE
    run = subprocess.Popen(
        [CKAPIPE, "run", str(config), "--workdir", str(tmp_path), "--", "--cores", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "results" / "tiny" / "logs").rglob("*.log")):
        assert run.poll() is None and time.monotonic() < deadline, "no job started"
        time.sleep(0.2)  # a job is running: Snakemake holds its locks
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert live_snakemake(tmp_path) == [], output[-3000:]
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    locks = tmp_path / ".snakemake" / "locks"
    assert not locks.is_dir() or not any(locks.iterdir()), output[-3000:]

    completed = _run(str(config), "--", "--cores", "1", workdir=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    tail = completed.stdout.strip().splitlines()[-6:]
    assert tail[0] == f"report: {tmp_path / 'results/tiny/report.html'}"
    assert tail[1] == f"table:  {tmp_path / 'results/tiny/d/cka.csv'}"
    assert tail[2] == "d: mean CKA of matched layers per model pair"
    assert tail[3].split()[:4] == ["a", ":", "a", "1.000"] and tail[3].endswith("[diagonal]")
    assert tail[4].split()[:3] == ["a", ":", "b"] and tail[4].endswith("[row best]")
