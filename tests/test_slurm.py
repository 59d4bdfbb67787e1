"""The shipped SLURM profile, checked statically, by a dry run, and against a real SLURM.

The live tests use the ``slurm_cluster`` fixture (tests/slurm_cluster.py): a real slurmctld +
slurmd + munged on 127.0.0.1 started by ``.ci/slurm-up.sh``. They skip only when that cluster
cannot be started (not root, no apt); CI sets CKAPIPE_REQUIRE_SLURM=1 so they fail instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from reference import minibatch_linear_cka
from slurm_cluster import PROFILE_DIR, SlurmCluster, slurm_available

# Two rules, each run as its own SLURM job; `all` stays local. Each job writes SLURM_JOB_ID so
# the test can tell that the rule really ran inside a SLURM allocation.
TWO_RULE_SNAKEFILE = """
localrules: all

rule all:
    input: "help.txt"

rule version:
    output: "version.txt"
    resources: runtime=5, mem_mb=600
    shell: "ckapipe --version > {output} && echo job=$SLURM_JOB_ID >> {output}"

rule help:
    input: "version.txt"
    output: "help.txt"
    threads: 2
    shell: "python -m ckapipe.cli --help > {output} && echo job=$SLURM_JOB_ID >> {output}"
"""

GPU_SNAKEFILE = """
localrules: all

rule all:
    input: "report.txt"

rule embed:
    output: "embed.txt"
    resources: gpu=1, runtime=30, mem_mb=2048
    threads: 2
    shell: "echo gpu job > {output}"

rule report:
    input: "embed.txt"
    output: "report.txt"
    shell: "cat {input} > {output}"
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "Snakefile").write_text(textwrap.dedent(text))
    return tmp_path


# ---------------------------------------------------------------------------- the profile itself


def test_profile_is_valid_yaml_with_a_comment_on_every_entry():
    config_file = PROFILE_DIR / "config.yaml"
    assert config_file.is_file(), f"profile missing at {config_file} (package data not installed?)"
    profile = yaml.safe_load(config_file.read_text())
    assert profile["executor"] == "slurm"
    assert profile["set-resources"] == {"extract": {"gpu": 1}, "gram": {"gpu": 1}}
    # GPU needs belong in rule resources (gpu=1); the plugin rejects --gres/--gpus in slurm_extra.
    active = [
        line for line in config_file.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    assert not any("--gres" in line or "--gpus" in line for line in active), active
    # Every top-level entry is directly preceded by a comment line saying why it is there.
    lines = config_file.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_-]+:", line):
            previous = lines[i - 1].strip() if i else ""
            key = line.split(":")[0].strip()
            assert previous.startswith("#"), f"profile entry {key!r} has no comment above it"


# ---------------------------------------------------------------------------- dry run, no SLURM


def test_dry_run_maps_rule_resources_and_profile_defaults(tmp_path):
    """`--executor slurm --dry-run` works without a cluster and plans the declared resources."""
    workdir = _write(tmp_path, GPU_SNAKEFILE)
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(PROFILE_DIR), "--dry-run"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"rule (\w+):\n(.*?)\n(?=\S)", log, re.S)}
    assert set(blocks) == {"all", "embed", "report"}, log
    embed = re.search(r"resources: (.*)", blocks["embed"]).group(1)
    report = re.search(r"resources: (.*)", blocks["report"]).group(1)
    # Rule-declared resources win over the profile defaults ...
    for item in ("gpu=1", "runtime=30", "mem_mb=2048"):
        assert item in embed.split(", "), embed
    # ... and a rule without its own gets the profile's defaults, and no GPU.
    for item in ("runtime=120", "mem_mb=16000"):
        assert item in report.split(", "), report
    assert "gpu" not in report, report
    assert re.search(r"^total\s+3$", log, re.M), log
    assert "dry-run" in log


@pytest.mark.slow
def test_dry_run_of_the_ckapipe_workflow_asks_gpus_for_extract_and_gram_only(tmp_path):
    """With the shipped profile, the packaged study workflow plans gpu=1 for every extract and
    gram job and for nothing else (the demo config, whose extract jobs write the Gram caches,
    and the same with two epochs, which the gram jobs build)."""
    import importlib.util

    snakefile = Path(importlib.util.find_spec("ckapipe.workflow").origin).parent / "Snakefile"
    from ckapipe.run import DEFAULT_CONFIG

    jobs = []
    for epochs, expected in ((1, {"extract"}), (2, {"extract", "gram"})):
        config = yaml.safe_load(DEFAULT_CONFIG.read_text())
        config["analysis"]["epochs"] = epochs
        study = tmp_path / f"epochs{epochs}.yaml"
        study.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(snakefile)]
            + ["--profile", str(PROFILE_DIR), "--directory", str(tmp_path), "--dry-run"]
            + ["--configfile", str(study)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        planned = re.findall(r"^(?:local)?rule (\w+):\n(.*?)\n(?=\S)", log, re.M | re.S)
        assert expected <= {rule for rule, _ in planned}, sorted(planned)
        assert epochs == 2 or "gram" not in {rule for rule, _ in planned}
        jobs += planned
    for rule, block in jobs:
        resources = re.search(r"resources: (.*)", block)
        items = resources.group(1).split(", ") if resources else []
        if rule in ("extract", "gram"):
            assert "gpu=1" in items, (rule, items)
        else:
            assert not any(item.startswith("gpu=") for item in items), (rule, items)


# ---------------------------------------------------------------------------- real SLURM


@pytest.mark.slurm
@pytest.mark.slow
def test_two_rule_workflow_runs_through_slurm(slurm_cluster: SlurmCluster, tmp_path):
    """Two jobs go through sbatch with the shipped profile and finish; SLURM saw both."""
    workdir = _write(tmp_path, TWO_RULE_SNAKEFILE)
    cmd = [sys.executable, "-m", "snakemake", *slurm_cluster.snakemake_args(), "--verbose"]
    result = slurm_cluster.run(cmd, cwd=workdir, timeout=240)
    assert not result.timed_out, result.output[-4000:]
    assert result.returncode == 0, result.output[-4000:]

    import ckapipe

    version = (workdir / "version.txt").read_text()
    helptext = (workdir / "help.txt").read_text()
    assert ckapipe.__version__ in version
    assert "Usage:" in helptext

    # Both rules were submitted, each as its own SLURM job, and ran inside it.
    assert len(result.job_ids) == 2, result.output[-4000:]
    ran_in = {re.search(r"job=(\d+)", text).group(1) for text in (version, helptext)}
    assert ran_in == set(result.job_ids)

    # SLURM itself (scontrol and squeue) knows the jobs as completed, with the mapped resources.
    jobs = [slurm_cluster.job_info(job_id) for job_id in ran_in]
    info = {job["Comment"].strip(): job for job in jobs}
    assert set(info) == {"rule_version", "rule_help"}, info
    for job in info.values():
        assert job["JobState"] == "COMPLETED", job
        assert job["Partition"] == slurm_cluster.partition
        assert job["Account"] == slurm_cluster.account
    assert info["rule_version"]["TimeLimit"] == "00:05:00"
    assert info["rule_version"]["MinMemoryNode"] == "600M"
    assert info["rule_help"]["NumCPUs"] == "2"  # threads: 2 -> --cpus-per-task=2
    assert info["rule_help"]["TimeLimit"] == "00:10:00"  # the fixture's default runtime
    squeue = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(result.job_ids), "-o", "%i %T"],
        capture_output=True,
        text=True,
        env=slurm_cluster.env,
        timeout=30,
    )
    assert squeue.returncode == 0, squeue.stderr
    states = dict(line.split() for line in squeue.stdout.splitlines())
    assert states == dict.fromkeys(result.job_ids, "COMPLETED")

    # The sbatch calls carry no --gres, and the cluster is usable for the next test.
    sbatch_calls = [line for line in result.output.splitlines() if line.startswith("sbatch call:")]
    assert len(sbatch_calls) == 2 and not any("--gres" in c for c in sbatch_calls)
    assert slurm_available()


@pytest.mark.slurm
@pytest.mark.slow
def test_gpu_resource_reaches_sbatch_as_gpus(slurm_cluster: SlurmCluster, tmp_path):
    """`resources: gpu=1` becomes `sbatch --gpus=1` (no --gres), which this GPU-less node
    rejects; `cpu_only_rules` turns the request off so the same workflow runs."""
    workdir = _write(tmp_path, GPU_SNAKEFILE)
    cmd = [sys.executable, "-m", "snakemake", *slurm_cluster.snakemake_args()]
    rejected = slurm_cluster.run(cmd, cwd=workdir, timeout=120)
    assert rejected.returncode != 0 and not rejected.timed_out, rejected.output[-4000:]
    call = re.search(r"^\s*sbatch .*--comment rule_embed.*$", rejected.output, re.M)
    assert call, rejected.output[-4000:]
    assert "--gpus=1" in call.group(0) and "--gres" not in call.group(0)
    assert "sbatch: error" in rejected.output  # SLURM itself refused: no GPU on this node

    # Only the GPU rule's job, to keep the test short.
    args = slurm_cluster.snakemake_args(cpu_only_rules=["embed"])
    cmd = [sys.executable, "-m", "snakemake", *args, "embed.txt"]
    accepted = slurm_cluster.run(cmd, cwd=workdir, timeout=180)
    assert accepted.returncode == 0, accepted.output[-4000:]
    assert (workdir / "embed.txt").read_text().strip() == "gpu job"
    assert len(accepted.job_ids) == 1
    assert slurm_cluster.job_info(accepted.job_ids[0])["JobState"] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_small_study_runs_through_slurm_with_ckapipe_run(slurm_cluster: SlurmCluster, tmp_path):
    """`ckapipe run STUDY -- <SLURM args>`: a small demo study (two architectures) whose
    demo_data, train, extract (with its fused Gram cache) and analyze steps each run as SLURM jobs on the node, while
    the cheap plot and report steps stay local; the result is complete and its numbers are
    right."""
    import ckapipe
    from ckapipe.run import DEFAULT_CONFIG
    from ckapipe.store import ActivationStore

    ckapipe_script = shutil.which("ckapipe", path=slurm_cluster.env["PATH"])
    assert ckapipe_script, "the ckapipe console script is not installed"

    # The demo, shrunk: one model per architecture, one training epoch, 512 probe images in
    # 4 minibatches of 128, 50 bootstrap draws; its own (relative) cache root in the workdir.
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["study"] = "on_slurm"
    config["models"] = {name: config["models"][name] for name in ("mlp_s0", "cnn_s0")}
    for model in config["models"].values():
        model["train"]["epochs"] = 1
    config["demo"].update(n_train=1024, n_probe=512)
    config["storage"]["cache_root"] = "cache"
    config["analysis"].update(batch_size=128, n_bootstrap=50)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config, sort_keys=False))

    # The node has no GPU: extract and gram ask for gpu=0 instead of the profile's gpu=1.
    args = slurm_cluster.snakemake_args(cpu_only_rules=["extract", "gram"])
    # --verbose: Snakemake's own output, where the submitted SLURM job ids are
    cmd = [ckapipe_script, "run", "--verbose", str(study), "--workdir", str(tmp_path), "--", *args]
    started = time.perf_counter()
    result = slurm_cluster.run(cmd, cwd=tmp_path, timeout=420)
    print(f"\nsmall study through SLURM: {time.perf_counter() - started:.1f} s")
    assert not result.timed_out, result.output[-6000:]
    assert result.returncode == 0, result.output[-6000:]

    # Every job except the local rules went through sbatch, one SLURM job each, and finished.
    jobs = {job_id: slurm_cluster.job_info(job_id) for job_id in result.job_ids}
    forgotten = [job_id for job_id, job in jobs.items() if not job]
    assert not forgotten, f"SLURM no longer knows jobs {forgotten} (run longer than MinJobAge?)"
    rules = Counter(
        re.fullmatch(r"rule_(\w+?)_wildcards_\S+", job["Comment"].strip()).group(1)
        for job in jobs.values()
    )
    # one epoch of minibatches: each extract job writes its store's Gram cache too (no gram jobs)
    assert rules == {"demo_data": 1, "train": 2, "extract": 2, "analyze": 1}, jobs
    for job in jobs.values():
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["Partition"] == slurm_cluster.partition, job
        assert job["Account"] == slurm_cluster.account, job
        # relative paths in the rules resolve against the study's workdir on the node
        assert Path(job["WorkDir"]) == tmp_path, job
        assert "gpu" not in job["TRES"], job  # gpu=0 reached sbatch: no GPU asked for
        assert Path(job["StdOut"]).is_file(), job  # the profile keeps successful job logs
    for rule in ("plot", "report", "all"):
        assert f"localrule {rule}:" in result.output, rule

    # The study's outputs, and the cache under its own root.
    results = tmp_path / "results/on_slurm"
    page = (results / "report.html").read_text()
    for text in ("Study grid", "Provenance", "mlp_s0", "cnn_s0"):
        assert text in page, text
    assert (results / "gratings/cka.zarr").is_dir()
    assert (results / "gratings/cka.csv").is_file()
    assert len(list((tmp_path / "cache/stores").glob("*.zarr"))) == 2
    assert len(list((tmp_path / "cache/grams").glob("*.zarr"))) == 2

    study_result = ckapipe.load_result(results / "gratings/cka.zarr")
    assert study_result.models == ["mlp_s0", "cnn_s0"]
    assert set(study_result.pairs) == {
        ("mlp_s0", "mlp_s0"),
        ("mlp_s0", "cnn_s0"),
        ("cnn_s0", "cnn_s0"),
    }
    for (a, b), pair in study_result.pairs.items():
        assert pair.cka.shape == (3, 3), (a, b)
        assert np.all(np.isfinite(pair.cka)), (a, b, pair.cka)
        # a model against itself: every estimate and interval on the diagonal is 1 (up to
        # rounding, which may put the point estimate an ulp below a degenerate interval) ...
        same_layer = np.eye(3, dtype=bool) if a == b else np.zeros((3, 3), dtype=bool)
        for values in (pair.cka, pair.ci_low, pair.ci_high):
            assert np.allclose(values[same_layer], 1.0, atol=1e-9), (a, b, values)
        # ... and everywhere else the interval brackets the estimate
        inside = (pair.ci_low <= pair.cka) & (pair.cka <= pair.ci_high)
        assert np.all(inside[~same_layer]), (a, b, pair.ci_low, pair.cka, pair.ci_high)
    # One cross-architecture value recomputed in float64 from the stores the SLURM jobs wrote
    # (epoch 0 = consecutive blocks of 128 store rows).
    stores = {
        name: ActivationStore.open(tmp_path / study_result.provenance["models"][name]["store"])
        for name in ("mlp_s0", "cnn_s0")
    }
    reference = minibatch_linear_cka(
        stores["mlp_s0"].read("relu2"), stores["cnn_s0"].read("relu3"), 128
    )
    assert study_result.pair("mlp_s0", "cnn_s0").cka[1, 2] == pytest.approx(reference, abs=1e-9)
