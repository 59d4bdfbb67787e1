"""The demo study end to end through the installed `ckapipe run`, and what Snakemake must then
(not) redo: nothing on a second run, one model's jobs after its weights change, only the new
model in a second study sharing the cache; an extraction killed mid-way resumes; a bad config
fails naming its fields.

The tests in this module share one demo run and must run in file order (pytest's default).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import job_counts
from reference import minibatch_linear_cka

import ckapipe
from ckapipe.demo.models import small_cnn
from ckapipe.run import DEFAULT_CONFIG
from ckapipe.store import ActivationStore

pytestmark = pytest.mark.slow

CKAPIPE = shutil.which("ckapipe")


def run_ckapipe(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    assert CKAPIPE, "the ckapipe console script is not installed"
    return subprocess.run(
        [CKAPIPE, "run", *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The shipped demo study (no config), run once in a fresh working directory: the working
    directory and what `ckapipe run` printed (not on a terminal: the plain view)."""
    workdir = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    completed = run_ckapipe("--workdir", str(workdir))
    seconds = time.perf_counter() - started
    print(f"\ndemo study wall time: {seconds:.1f} s")
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return workdir, completed


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[0]


def test_demo_run_prints_a_compact_view_then_the_report_and_the_headline_table(demo_run):
    workdir, completed = demo_run
    lines = completed.stdout.strip().splitlines()
    assert completed.stderr == ""
    # first: where Snakemake's full output went (none of it on screen)
    assert lines[0].startswith("ckapipe: Snakemake's full log: ")
    log = Path(lines[0].split(": ", 2)[2])
    assert log.parent == workdir / "results/demo/logs" and log.name.startswith("snakemake-")
    # demo_data, 4 train, 4 extract (each also writes its Gram cache), analyze, plot, report, all
    assert log.read_text().count("Finished jobid") == 13
    assert "Finished jobid" not in completed.stdout and "Shell command" not in completed.stdout
    # last: jobs, report, table, then the headline table, one row per model pair, then the
    # within- vs across-architecture rows
    from ckapipe.analyze.architecture_summary import architecture_similarity, depth_aligned

    result = ckapipe.load_result(workdir / "results/demo/gratings/cka.zarr")
    pairs = list(result.pairs)
    architectures = {"mlp_s0": "mlp", "mlp_s1": "mlp", "cnn_s0": "cnn", "cnn_s1": "cnn"}
    groups = architecture_similarity(result, architectures)
    assert len(groups) == 6  # within mlp, within cnn, across, all within, all across, difference
    tail = lines[-(len(pairs) + len(groups) + 7) :]
    assert len(lines) - len(tail) < 25, completed.stdout  # the compact view before the summary
    jobs = dict(
        part.split()[:2] for part in tail[0].removeprefix("jobs: ").split("; ")[0].split(", ")
    )
    assert jobs == {
        "demo_data": "1",
        "train": "4",
        "extract": "4",
        "analyze": "1",
        "plot": "1",
        "report": "1",
    }, tail[0]
    assert "reused" not in tail[0] and tail[0].endswith(" wall time")
    assert tail[1] == f"report: {workdir / 'results/demo/report.html'}"
    assert tail[2] == f"table:  {workdir / 'results/demo/gratings/cka.csv'}"
    assert tail[3] == (
        "gratings: per model pair, depth-aligned mean CKA (widest 95% interval half-width)"
    )
    header = ["model", "A", "model", "B", "depth-aligned", "mean", "±", "CI", "architectures"]
    assert tail[4].split() == header
    # each row: the stored result's numbers over the depth-aligned layer pairs (the diagonal
    # here: every demo model has 3 layers), and the pair's architectures
    rows = tail[5 : 5 + len(pairs)]
    for (a, b), row in zip(pairs, rows, strict=True):
        pair = result.pair(a, b)
        aligned = depth_aligned(len(pair.layers_a), len(pair.layers_b))
        half = (pair.ci_high - pair.ci_low) / 2
        kinds = architectures[a] if a[:3] == b[:3] else "cnn × mlp"
        assert row.split() == [
            a,
            b,
            f"{np.mean(pair.cka[aligned]):.3f}",
            f"{np.max(half[aligned]):.3f}",
            *kinds.split(),
        ]
    assert tail[5 + len(pairs)] == (
        "gratings: within vs across architectures, mean of the pairs' depth-aligned means "
        "(95% jackknife interval)"
    )
    assert tail[6 + len(pairs)].split() == ["group", "mean", "CKA", "interval"]
    for group, row in zip(groups, tail[7 + len(pairs) :], strict=True):
        value = f"{group.value:+.3f}" if group.kind == "difference" else f"{group.value:.3f}"
        assert group.reason is None, group  # 8 batches: every interval is reported
        assert row.split() == [
            *group.label.split(),
            value,
            f"[{group.low:.3f},",
            f"{group.high:.3f}]",
        ]
    # the story the demo tells: seeds of one architecture are more alike than architectures
    assert groups[-1].label == "within − across" and groups[-1].value > 0


def trained_weights(workdir: Path, factory: str, seed: int) -> Path:
    for metrics in (workdir / ".cache/ckapipe/demo/models").glob("*/metrics.json"):
        record = json.loads(metrics.read_text())
        if record["factory"] == factory and record["seed"] == seed:
            return metrics.parent / "weights.pt"
    raise AssertionError(f"no trained {factory} seed {seed}")


def test_demo_study_end_to_end(demo):
    report = demo / "results/demo/report.html"
    assert report.is_file()
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 5  # grid, heatmaps, correspondence curves
    for section in ("Study grid", "Layer correspondence", "Per-pair heatmaps", "Provenance"):
        assert section in page, section
    # the declared architectures group the seeds: one correspondence figure, and the table of
    # within- vs across-architecture similarity with its intervals
    plots = demo / "results/demo/gratings/plots"
    assert sorted(p.name for p in plots.glob("correspondence*.png")) == ["correspondence.png"]
    assert "mlp <small>(declared)</small>" in page and "cnn <small>(declared)</small>" in page
    for label in ("within mlp", "within cnn", "across cnn × mlp", "within − across"):
        assert f"<td>{label}</td>" in page or f"<td><b>{label}</b></td>" in page, label
    assert "interval withheld" not in page  # 8 batches: every interval is reported
    assert "<details><summary>The resolved study config</summary>" in page
    # every demo model is clearly above chance (1/6) and the report says so
    for factory in ("ckapipe.demo.models:mlp", "ckapipe.demo.models:small_cnn"):
        for seed in (0, 1):
            metrics = json.loads(
                trained_weights(demo, factory, seed).with_name("metrics.json").read_text()
            )
            assert metrics["chance_accuracy"] == pytest.approx(1 / 6)
            assert metrics["probe_accuracy"] > 0.8, metrics
            assert f"{metrics['probe_accuracy']:.1%} on 1024 held-out images" in page

    result = ckapipe.load_result(demo / "results/demo/gratings/cka.zarr")
    assert result.models == ["mlp_s0", "mlp_s1", "cnn_s0", "cnn_s1"]
    assert (demo / "results/demo/gratings/cka.csv").is_file()
    # the known structure: across seeds of one architecture, each layer is most similar to the
    # corresponding layer (the diagonal is the maximum of its row and of its column)
    for a, b in (("mlp_s0", "mlp_s1"), ("cnn_s0", "cnn_s1")):
        pair = result.pair(a, b)
        assert pair.layers_a == pair.layers_b == ["relu1", "relu2", "relu3"]
        for i in range(3):
            others_in_row = np.delete(pair.cka[i], i)
            others_in_column = np.delete(pair.cka[:, i], i)
            assert pair.cka[i, i] > others_in_row.max(), (a, b, pair.cka)
            assert pair.cka[i, i] > others_in_column.max(), (a, b, pair.cka)
        assert np.all(pair.ci_low <= pair.cka) and np.all(pair.cka <= pair.ci_high)
    # the demo's story: two seeds of one architecture are more alike than two architectures,
    # beyond the jackknife interval of the difference
    from ckapipe.analyze.architecture_summary import architecture_similarity

    groups = {"mlp_s0": "mlp", "mlp_s1": "mlp", "cnn_s0": "cnn", "cnn_s1": "cnn"}
    assert result.provenance["architectures"] == groups  # recorded: a bare `plot` finds them
    difference = architecture_similarity(result, groups)[-1]
    assert difference.label == "within − across" and difference.low > 0.05, difference
    # a model against itself: exactly 1 on the diagonal
    assert np.allclose(np.diag(result.pair("cnn_s1", "cnn_s1").cka), 1.0, atol=1e-9)

    # the workflow wired each name to its own store: recompute one cross-architecture value
    # from the stores in float64 (epoch 0 = consecutive blocks of m store rows)
    stores = {name: result.provenance["models"][name]["store"] for name in ("mlp_s1", "cnn_s0")}
    mlp_store = ActivationStore.open(demo / stores["mlp_s1"])
    cnn_store = ActivationStore.open(demo / stores["cnn_s0"])
    assert mlp_store.identity()["weights_sha256"] != cnn_store.identity()["weights_sha256"]
    m = yaml.safe_load(DEFAULT_CONFIG.read_text())["analysis"]["batch_size"]
    assert 1024 // m >= 4  # the demo reports intervals
    reference = minibatch_linear_cka(mlp_store.read("relu2"), cnn_store.read("relu3"), m)
    assert result.pair("mlp_s1", "cnn_s0").cka[1, 2] == pytest.approx(reference, abs=1e-9)


def test_second_run_does_nothing(demo):
    completed = run_ckapipe("--workdir", str(demo), "--", "--dry-run")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Nothing to be done" in completed.stdout + completed.stderr


def test_invalid_config_fails_naming_the_fields(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["analysis"]["batch_size"] = "big"
    config["storage"]["dtype"] = "int8"
    del config["models"]["cnn_s0"]["layers"]
    completed = run_ckapipe(
        str(write_config(tmp_path / "bad.yaml", config)), "--workdir", str(tmp_path), "--", "-n"
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "analysis.batch_size: 'big' is not of type 'integer'" in output
    assert "storage.dtype: 'int8' is not one of" in output
    assert "models.cnn_s0: 'layers' is a required property" in output
    assert not (tmp_path / "results").exists()


def _planned_outputs(output: str) -> set[str]:
    """Every output file a dry run plans (an extract job has two: store and Gram receipts)."""
    return {
        path
        for line in output.splitlines()
        if line.strip().startswith("output: ")
        for path in line.strip().removeprefix("output: ").split(", ")
    }


def test_second_study_reuses_the_shared_cache(demo):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["study"] = "plus_one"
    config["models"]["mlp_s2"] = {
        **config["models"]["mlp_s0"],
        "train": {"seed": 2, "learning_rate": 0.01},
    }
    own_weights = demo / "own_weights.pt"
    shutil.copyfile(trained_weights(demo, "ckapipe.demo.models:mlp", 0), own_weights)
    config["models"]["own"] = {
        "spec": {"factory": "ckapipe.demo.models:mlp", "kwargs": {}, "weights": str(own_weights)},
        "layers": ["relu1", "relu2", "relu3"],
    }
    path = write_config(demo / "plus_one.yaml", config)
    completed = run_ckapipe(str(path), "--workdir", str(demo), "--", "--dry-run")
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    # every cache job runs for the new study (its receipts are its own), but only the two new
    # models' stores are not in the cache yet: the four demo stores are reused, not redone
    planned = _planned_outputs(output)
    stores = demo / ".cache/ckapipe/stores"
    planned_stores = {Path(p).stem for p in planned if "/receipts/stores/" in p}
    assert len(planned_stores) == 6, output
    assert len({key for key in planned_stores if not (stores / f"{key}.zarr").exists()}) == 2

    # a changed weights file is new content: a new store key, so nothing stale can be reused
    state = torch.load(own_weights, weights_only=True)
    state["fc1.bias"] = state["fc1.bias"] + 0.01
    torch.save(state, own_weights)
    again = run_ckapipe(str(path), "--workdir", str(demo), "--", "--dry-run")
    assert again.returncode == 0, again.stderr[-3000:]
    replanned = _planned_outputs(again.stdout + again.stderr)
    new_stores = {p for p in replanned - planned if "/receipts/stores/" in p}
    assert len(new_stores) == 1, (planned, replanned)


def test_changed_weights_rerun_exactly_that_model_and_the_study(demo):
    weights = trained_weights(demo, "ckapipe.demo.models:mlp", 1)
    state = torch.load(weights, weights_only=True)
    state["fc2.weight"] = state["fc2.weight"] * 1.01
    torch.save(state, weights)
    dry = run_ckapipe("--workdir", str(demo), "--", "--dry-run")
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-3000:]
    assert job_counts(output) == {
        "extract": 1,  # writes the store and its Gram cache
        "analyze": 1,
        "plot": 1,
        "report": 1,
        "all": 1,
    }, output
    extract_block = output[output.index("rule extract:") :].split("\n\n")[0]
    assert str(weights.relative_to(demo)) in extract_block

    completed = run_ckapipe("--workdir", str(demo))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    jobs = next(line for line in completed.stdout.splitlines() if line.startswith("jobs: "))
    assert jobs.startswith("jobs: extract 1, analyze 1, plot 1, report 1; "), jobs
    result = ckapipe.load_result(demo / "results/demo/gratings/cka.zarr")
    store = ActivationStore.open(demo / result.provenance["models"]["mlp_s1"]["store"])
    assert store.identity()["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "Nothing to be done" in (lambda c: c.stdout + c.stderr)(
        run_ckapipe("--workdir", str(demo), "--", "-n")
    )


def _incomplete_store(stores: Path, before: set[Path]) -> Path | None:
    """A new store with some row blocks written but not complete."""
    for path in set(stores.glob("*.zarr")) - before:
        try:
            store = ActivationStore.open(path, allow_incomplete=True)
            arrays = [store.array(name) for name in store.layer_names]
        except Exception:  # noqa: BLE001 - still being created
            continue
        if arrays and 0 < store.rows_complete < store.n_samples:
            return path
    return None


def test_killed_extraction_resumes(demo, tmp_path):
    cache = demo / ".cache/ckapipe"
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["study"] = "resume"
    config["storage"]["cache_root"] = str(cache)  # reuse the demo data, not its stores
    # an untrained wide CNN: relu1 (32768 features) and relu2 (16384) make chunks of 256 and 512
    # rows, so the store's resume points are rows 512 and 1024 and a kill can land between them
    torch.manual_seed(0)
    weights = tmp_path / "wide.pt"
    torch.save(small_cnn(width=128).state_dict(), weights)
    config["models"] = {
        "wide": {
            "spec": {
                "factory": "ckapipe.demo.models:small_cnn",
                "kwargs": {"width": 128},
                "weights": str(weights),
            },
            "layers": ["relu1", "relu2"],
        }
    }
    config["extraction"]["batch_size"] = 16
    path = write_config(tmp_path / "resume.yaml", config)
    before = set((cache / "stores").glob("*.zarr"))
    process = subprocess.Popen(
        [CKAPIPE, "run", str(path), "--workdir", str(tmp_path), "--", "--until", "extract"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    store = None
    while store is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        store = _incomplete_store(cache / "stores", before)
    if store is None:
        process.kill()
        pytest.fail("the extraction finished or never started before it could be interrupted")
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: Snakemake and the extract job
    process.wait()
    rows_at_kill = ActivationStore.open(store, allow_incomplete=True).rows_complete
    assert not (tmp_path / "results/resume/receipts/stores" / f"{store.stem}.json").exists()

    # a killed Snakemake leaves its lock behind; --unlock is the documented way out
    unlock = run_ckapipe(str(path), "--workdir", str(tmp_path), "--", "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    rerun = run_ckapipe(str(path), "--workdir", str(tmp_path), "--", "--until", "extract")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = (tmp_path / "results/resume/logs/extract" / f"{store.stem}.log").read_text()
    assert "found interrupted store" in log, log  # kept by the guard, resumed by ckapipe extract
    resumed = ActivationStore.open(store)
    assert resumed.is_complete and resumed.n_samples == 1024 and 0 < rows_at_kill < 1024
    print(f"\nkilled the extraction at {rows_at_kill} of 1024 rows; resumed to completion")

    # the resumed store equals an uninterrupted extraction with the same arguments
    fresh = tmp_path / "fresh.zarr"
    identity = resumed.identity()
    subprocess.run(
        [
            CKAPIPE,
            "extract",
            "--model",
            json.dumps(identity["model"]),
            "--dataset",
            json.dumps(identity["dataset"]),
            "--layers",
            "relu1",
            "--layers",
            "relu2",
            "--out",
            str(fresh),
            "--batch-size",
            "16",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    reference = ActivationStore.open(fresh)
    assert np.array_equal(resumed.sample_ids, reference.sample_ids)
    for layer in ("relu1", "relu2"):
        assert np.array_equal(resumed.read(layer), reference.read(layer)), layer
