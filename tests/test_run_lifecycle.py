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
    # a job's log (logs/<rule>/<key>.log), not Snakemake's own log beside them
    while not list((tmp_path / "results" / "tiny" / "logs").glob("*/*.log")):
        assert run.poll() is None and time.monotonic() < deadline, "no job started"
        time.sleep(0.2)  # a job is running: Snakemake holds its locks
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert "ckapipe: stopped on SIGTERM; run the same command again to resume" in output
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
    lines = completed.stdout.strip().splitlines()
    # one log per run (the stopped one's and this one's); the timestamp sorts them
    log = sorted(tmp_path.glob("results/tiny/logs/snakemake-*Z.log"))[-1]
    assert lines[0] == f"ckapipe: Snakemake's full log: {log}"
    assert "Finished jobid" in log.read_text() and "Finished jobid" not in completed.stdout
    tail = lines[-11:]
    assert tail[0].startswith("jobs: ") and tail[0].endswith(" wall time")
    assert tail[1] == f"report: {tmp_path / 'results/tiny/report.html'}"
    assert tail[2] == f"table:  {tmp_path / 'results/tiny/d/cka.csv'}"
    assert tail[3] == "d: per model pair, depth-aligned mean CKA (widest 95% interval half-width)"
    header = ["model", "A", "model", "B", "depth-aligned", "mean", "±", "CI", "architectures"]
    assert tail[4].split() == header
    # a and b: one factory (one architecture), 2 vs 3 layers: depth-aligned, not matched
    mlp = "ckapipe.demo.models:mlp"
    assert tail[5].split()[:3] == ["a", "a", "1.000"] and tail[5].endswith(f"  {mlp}")
    assert tail[6].split()[:2] == ["a", "b"] and tail[6].endswith(f"  {mlp}")
    assert tail[7].split()[:3] == ["b", "b", "1.000"] and tail[7].endswith(f"  {mlp}")
    assert tail[8].startswith("d: within vs across architectures")
    assert tail[9].split() == ["group", "mean", "CKA", "interval"]
    assert tail[10].split()[:2] == ["within", mlp]  # one architecture: no across rows

    # the same study under another name shares the cache: its cache jobs all find their entry
    study = yaml.safe_load(config.read_text())
    study["study"] = "tiny_again"
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(study))
    completed = _run(str(again), "--", "--cores", "1", workdir=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:]
    jobs = next(line for line in completed.stdout.splitlines() if line.startswith("jobs: "))
    # one job per model: each extract job found its store and its Gram cache in the cache
    assert jobs.startswith("jobs: extract 2 (2 reused from cache), analyze 1, "), jobs


def _broken_study(workdir: Path) -> Path:
    """One model whose factory raises: its extract job fails."""
    (workdir / "broken.py").write_text(
        "def model():\n    raise ValueError('this model factory is broken on purpose')\n"
    )
    config = yaml.safe_load(_tiny_study(workdir).read_text())
    config["study"] = "broken"
    config["models"] = {"bad": {"spec": {"factory": "broken.py:model"}, "layers": ["relu1"]}}
    path = workdir / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_failed_job_is_named_with_its_log_tail(tmp_path: Path) -> None:
    config = _broken_study(tmp_path)
    completed = _run(str(config), "--", "--cores", "1", workdir=tmp_path)
    assert completed.returncode == 1, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    (job_log,) = tmp_path.glob("results/broken/logs/extract/*.log")
    snakemake_log = next(tmp_path.glob("results/broken/logs/snakemake-*Z.log"))
    failed = lines.index(f"FAILED extract {job_log.stem}: last lines of {job_log}")
    tail = lines[failed + 1 : -1]
    assert 5 <= len(tail) <= 15 and all(line.startswith("  | ") for line in tail), lines
    assert "  | ValueError: this model factory is broken on purpose" in tail
    assert [line[4:] for line in tail] == job_log.read_text().splitlines()[-len(tail) :]
    assert lines[-1] == f"Snakemake's full log: {snakemake_log}"
    assert any(line.endswith(f"] FAILED extract {job_log.stem}") for line in lines[:failed])
    assert len(lines) < 25, completed.stdout
