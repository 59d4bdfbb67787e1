"""Pipeline pieces that need no Snakemake run: content keys, the store guard, config checks,
the `ckapipe run` command line, the demo data and models, and the report's dominance check."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import job_counts

from ckapipe.demo.data import make_gratings
from ckapipe.demo.models import mlp, small_cnn
from ckapipe.run import DEFAULT_CONFIG, SNAKEFILE, snakemake_command
from ckapipe.run import split_config_argument as _split_config
from ckapipe.store import ActivationStore, LayerRecord
from ckapipe.workflow import keys
from ckapipe.workflow.config_check import config_errors
from ckapipe.workflow.guard import LockTimeoutError, store_verdict, wait_for_writer
from ckapipe.workflow.html_report import diagonal_dominance
from ckapipe.workflow.keys import FileHasher, code_identity, gram_key, store_key


def demo_config() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


# -- content keys ---------------------------------------------------------------------------------
def _key(**changes):
    arguments = {
        "model_spec": {"factory": "m:f", "kwargs": {"width": 8}, "weights": "a/w.pt"},
        "code": {"model": {"sources": {"factory": {"sha256": "4" * 64}}, "files": {}}},
        "weights_identity": {"sha256": "0" * 64},
        "dataset_identity": {"array_sha256": "1" * 64, "limit": None},
        "layers": ["relu1", "relu2"],
        "reduction": "flatten",
        "dtype": "float16",
        "codec": "none",
        "order": "random",
        "order_seed": 0,
    }
    arguments.update(changes)
    return store_key(**arguments)


def test_store_key_changes_with_every_content_field_and_not_with_the_weights_path():
    base = _key()
    assert len(base) == 16 and int(base, 16) >= 0
    assert (
        _key(model_spec={"factory": "m:f", "kwargs": {"width": 8}, "weights": "elsewhere.pt"})
        == base
    )
    variants = [
        _key(model_spec={"factory": "m:f", "kwargs": {"width": 9}}),
        _key(weights_identity={"sha256": "2" * 64}),
        _key(dataset_identity={"array_sha256": "3" * 64, "limit": None}),
        _key(dataset_identity={"array_sha256": "1" * 64, "limit": 10}),
        _key(layers=["relu2", "relu1"]),
        _key(reduction="mean"),
        _key(dtype="float32"),
        _key(codec="zstd"),
        _key(order_seed=1),
        _key(order="dataset"),
        _key(code={"model": {"sources": {"factory": {"sha256": "5" * 64}}, "files": {}}}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # the order seed means nothing in dataset order
    assert _key(order="dataset", order_seed=1) == _key(order="dataset", order_seed=2)


def test_gram_key_depends_on_store_and_partition():
    partition = {
        "mode": "minibatch",
        "batch_size": 256,
        "epochs": 1,
        "seed": 0,
        "kernel": "linear",
        "threshold": 1.0,
        "precision": "float32",
        "storage": "float32",
    }
    base = gram_key("a" * 16, partition)
    assert gram_key("b" * 16, partition) != base
    for name, value in [
        ("batch_size", 128),
        ("epochs", 2),
        ("seed", 1),
        ("mode", "full"),
        ("kernel", "rbf"),
        ("precision", "float64"),
        ("storage", "float64"),
    ]:
        assert gram_key("a" * 16, {**partition, name: value}) != base, name


def test_gram_storage_enters_the_key_of_both_modes_and_old_minibatch_keys_are_not_reused():
    """analysis.gram_storage: auto = float32 for CKA only (minibatch always), float64 for the
    spectral measures; a float64 cache never answers a float32 key, and the keys of caches from
    before storage entered minibatch keys (float64, keyed without it) match neither."""
    analysis = {
        "mode": "minibatch",
        "batch_size": 128,
        "epochs": 1,
        "seed": 0,
        "kernel": "linear",
        "threshold": 1.0,
        "precision": "auto",
        "measures": ["cka"],
    }
    auto = keys.gram_partition(analysis)
    assert auto["storage"] == "float32" and auto["precision"] == "float32"
    exact = keys.gram_partition({**analysis, "gram_storage": "float64"})
    assert exact["storage"] == "float64"
    assert keys.gram_partition({**analysis, "gram_storage": "float32"}) == auto
    old = {name: value for name, value in exact.items() if name != "storage"}
    assert len({gram_key("a" * 16, p) for p in (auto, exact, old)}) == 3
    full = {**analysis, "mode": "full", "estimator": "debiased"}
    assert keys.gram_partition(full)["storage"] == "float32"
    assert keys.gram_partition({**full, "measures": ["cka", "cca"]})["storage"] == "float64"


def test_file_hasher_matches_hashlib_and_remembers_until_the_file_changes(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first")
    index = tmp_path / "cache" / "index.json"
    hasher = FileHasher(index)
    assert hasher.sha256(weights) == hashlib.sha256(b"first").hexdigest()
    hasher.save()
    assert (
        json.loads(index.read_text())[str(weights.resolve())]["sha256"]
        == hashlib.sha256(b"first").hexdigest()
    )
    weights.write_bytes(b"second, longer")  # new size -> re-hashed even with a stale index entry
    assert FileHasher(index).sha256(weights) == hashlib.sha256(b"second, longer").hexdigest()
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x").write_bytes(b"x")
    first = FileHasher(None).sha256(folder)
    (folder / "sub" / "x").write_bytes(b"y")
    assert FileHasher(None).sha256(folder) != first
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        FileHasher(None).sha256(tmp_path / "missing.pt")


# -- the store guard ------------------------------------------------------------------------------
def _store(path: Path, weights_sha256: str | None, *, complete: bool) -> None:
    layer = LayerRecord(name="relu1", shape=(4,), reduction="flatten", n_features=4)
    store = ActivationStore.create(
        path,
        layers=[layer],
        sample_ids=np.arange(8),
        attrs={"weights_sha256": weights_sha256},
        row_block=4,
    )
    store.write_rows(0, {"relu1": np.ones((4, 4), np.float32)})
    store.set_rows_complete(4)
    if complete:
        store.write_rows(4, {"relu1": np.ones((4, 4), np.float32)})
        store.set_rows_complete(8)
        store.mark_complete()
    store.close()


def _guard(store: Path, weights: Path) -> subprocess.CompletedProcess[str]:
    """``python -m ckapipe.workflow.guard STORE --weights WEIGHTS``; fails the test on an error."""
    return subprocess.run(
        [sys.executable, "-m", "ckapipe.workflow.guard", str(store), "--weights", str(weights)],
        capture_output=True,
        text=True,
        check=True,
    )


def test_guard_keeps_only_an_interrupted_store_of_the_same_weights(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert store_verdict(tmp_path / "absent.zarr", weights) == "absent"
    _store(tmp_path / "interrupted.zarr", digest, complete=False)
    assert store_verdict(tmp_path / "interrupted.zarr", weights) == "resume"
    assert store_verdict(tmp_path / "interrupted.zarr", None) == "stale"  # no weights: unverifiable
    _store(tmp_path / "other.zarr", "f" * 64, complete=False)
    assert store_verdict(tmp_path / "other.zarr", weights) == "stale"
    _store(tmp_path / "complete.zarr", digest, complete=True)
    assert store_verdict(tmp_path / "complete.zarr", weights) == "reuse"  # another study made it
    assert store_verdict(tmp_path / "complete.zarr", None) == "reuse"
    _store(tmp_path / "complete_other.zarr", "f" * 64, complete=True)
    assert store_verdict(tmp_path / "complete_other.zarr", weights) == "stale"
    (tmp_path / "half").mkdir()
    assert store_verdict(tmp_path / "half", weights) == "stale"
    (tmp_path / "half" / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {}}'
    )
    assert store_verdict(tmp_path / "half", weights) == "stale"  # killed while being created
    completed = _guard(tmp_path / "other.zarr", weights)
    assert "removed stale store" in completed.stderr and not (tmp_path / "other.zarr").exists()
    _guard(tmp_path / "interrupted.zarr", weights)
    assert (tmp_path / "interrupted.zarr" / "zarr.json").is_file()


# -- config validation ----------------------------------------------------------------------------
def test_the_demo_config_is_valid():
    assert config_errors(demo_config()) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["analysis"].update(batch_size="big"),
            "analysis.batch_size: 'big' is not of type 'integer'",
        ),
        (lambda c: c["analysis"].update(kernel="poly"), "analysis.kernel: 'poly' is not one of"),
        (
            lambda c: c["models"]["mlp_s0"].pop("layers"),
            "models.mlp_s0: 'layers' is a required property",
        ),
        (
            lambda c: c["storage"].update(dtpye="float16"),
            "storage: Additional properties are not allowed ('dtpye'",
        ),
        (lambda c: c["storage"].update(dtype="int8"), "storage.dtype: 'int8' is not one of"),
        (
            lambda c: c["analysis"].update(gram_storage="float16"),
            "analysis.gram_storage: 'float16' is not one of",
        ),
        (
            lambda c: c["analysis"].update(
                mode="full", estimator="debiased", measures=["cka", "cca"], gram_storage="float32"
            ),
            "analysis.gram_storage: float32 Grams do not suit cca",
        ),
        (
            lambda c: c["analysis"].update(ci_level=1.5),
            "analysis.ci_level: 1.5 is greater than or equal to the maximum",
        ),
        (
            lambda c: c["models"]["cnn_s1"]["spec"].update(weights="w.pt"),
            "models.cnn_s1: give either spec.weights",
        ),
        (
            lambda c: c["datasets"]["gratings"].update(spec={"array": "x.npy"}),
            "datasets.gratings: give exactly one of spec",
        ),
        (lambda c: c.update(pairs=["mlp_s0:nope"]), "pairs.0: unknown model 'nope'"),
        (
            lambda c: c["analysis"].update(mode="full"),
            "analysis.estimator: 'minibatch' does not go with",
        ),
        (
            lambda c: c["models"].update({"a--b": c["models"]["mlp_s0"]}),
            "models: 'a--b' does not match",
        ),
        (
            lambda c: c["models"]["mlp_s0"]["spec"].update(factory="no colon"),
            "models.mlp_s0.spec.factory: 'no colon' does not match",
        ),
    ],
)
def test_every_invalid_field_is_named(edit, expected):
    config = copy.deepcopy(demo_config())
    edit(config)
    errors = config_errors(config)
    assert any(message.startswith(expected) for message in errors), errors


def test_all_problems_are_listed_at_once():
    config = copy.deepcopy(demo_config())
    config["analysis"]["batch_size"] = 0
    config["storage"]["codec"] = "gzip"
    errors = config_errors(config)
    assert [e.split(":")[0] for e in errors] == ["analysis.batch_size", "storage.codec"]


# -- ckapipe run's command line -------------------------------------------------------------------
def test_split_config_tells_a_config_from_snakemake_arguments(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: x\n")
    assert _split_config(["-n"]) == (None, ["-n"])
    assert _split_config([str(study), "-n"]) == (study, ["-n"])
    assert _split_config(["missing.yaml"]) == (Path("missing.yaml"), [])
    assert _split_config(["all", "-n"]) == (None, ["all", "-n"])  # a target, not a config


def test_snakemake_command_runs_the_packaged_workflow_in_a_subprocess(tmp_path):
    command = snakemake_command(None, workdir=tmp_path, snakemake_args=["-n"])
    assert command[:3] == [sys.executable, "-m", "snakemake"]
    assert command[command.index("--snakefile") + 1] == str(SNAKEFILE)
    assert command[command.index("--configfile") + 1] == str(DEFAULT_CONFIG.resolve())
    assert command[command.index("--directory") + 1] == str(tmp_path.resolve())
    assert command[command.index("--cores") + 1] == "all" and command[-1] == "-n"
    assert "--cores" not in snakemake_command(None, snakemake_args=["-j", "4"])
    assert SNAKEFILE.is_file() and DEFAULT_CONFIG.is_file()


# -- demo data and models -------------------------------------------------------------------------
def test_demo_data_is_deterministic_balanced_and_not_linearly_trivial():
    images, labels = make_gratings(600, n_classes=6, seed=3)
    again, labels_again = make_gratings(600, n_classes=6, seed=3)
    assert images.shape == (600, 1, 16, 16) and images.dtype == np.float32
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, make_gratings(600, n_classes=6, seed=4)[0])
    assert np.bincount(labels).tolist() == [100] * 6
    # random phases: every class's mean image is close to zero (a linear read-out of pixels fails)
    class_means = np.stack([images[labels == c].astype(np.float64).mean(0) for c in range(6)])
    assert np.abs(class_means).max() < 0.5
    with pytest.raises(ValueError, match="n_classes"):
        make_gratings(10, n_classes=1)


def test_demo_models_share_layer_names_and_shapes():
    x = torch.zeros(2, 1, 16, 16)
    for model in (mlp(), small_cnn()):
        names = dict(model.named_children())
        assert {"relu1", "relu2", "relu3", "logits"} <= set(names)
        assert model(x).shape == (2, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        small_cnn(image_size=18)


# -- the report's structure check -----------------------------------------------------------------
def test_diagonal_dominance():
    assert diagonal_dominance(np.array([[0.9, 0.5], [0.4, 0.8]]))
    assert not diagonal_dominance(np.array([[0.9, 0.95], [0.4, 0.8]]))  # row 0
    assert not diagonal_dominance(np.array([[0.7, 0.5], [0.8, 0.9]]))  # column 0
    assert not diagonal_dominance(np.array([[np.nan, 0.5], [0.4, 0.8]]))
    assert not diagonal_dominance(np.ones((2, 3)))


def test_report_section_reads_a_written_result_and_its_csv(tmp_path):
    from ckapipe.analyze.result import PairResult, StudyResult, csv_path_for, write_result
    from ckapipe.workflow.html_report import _dataset_section

    layers = ["l0", "l1"]
    cka = np.array([[0.91, 0.2], [0.3, 0.82]])

    def pair(a: str, b: str) -> PairResult:
        return PairResult(
            a, b, layers, layers, cka, cka - 0.05, cka + 0.04,
            diagnostics=[f"note on {a}"],
            hsic_per_batch=np.repeat(cka[None], 3, axis=0),
            self_a_per_batch=np.ones((3, 2)),
            self_b_per_batch=np.ones((3, 2)),
        )  # fmt: skip

    result = tmp_path / "cka.zarr"
    study = StudyResult(
        models=["m0", "m1"],
        pairs={("m0", "m0"): pair("m0", "m0"), ("m0", "m1"): pair("m0", "m1")},
        provenance={"estimator": "minibatch", "ci_level": 0.95, "models": {"m0": {}, "m1": {}}},
    )
    write_result(study, result, overwrite=False)
    table = csv_path_for(result)
    good = table.read_bytes()
    table.write_text("stale\n")  # as a killed run may leave it
    spec = {"factory": "demo:mlp", "kwargs": {}}
    plan = {
        "models": {name: {"spec": spec} for name in ("m0", "m1")},
        "config": {"models": {name: {"layers": layers} for name in ("m0", "m1")}},
    }
    dataset = {"spec": {}, "result": str(result), "table": str(table), "plots": str(tmp_path)}
    dataset["caches"] = {}
    with pytest.warns(UserWarning, match="rewritten from the result"):
        page = _dataset_section(plan, "gratings", dataset)
    assert "m0 vs m1" in page and "l0: 0.910 [0.860, 0.950]" in page
    assert "note on m0" in page
    assert table.read_bytes() == good


def test_report_groups_models_by_the_architectures_recorded_in_the_result(tmp_path):
    from ckapipe.analyze.result import PairResult, StudyResult, csv_path_for, write_result
    from ckapipe.workflow.html_report import _architecture_section, _dataset_view

    layers = ["l0", "l1"]
    cka = np.array([[0.9, 0.2], [0.3, 0.8]])
    pair = PairResult(
        "m0", "m1", layers, layers, cka, cka - 0.05, cka + 0.05,
        hsic_per_batch=np.repeat(cka[None], 4, axis=0) + np.arange(4)[:, None, None] * 0.01,
        self_a_per_batch=np.ones((4, 2)),
        self_b_per_batch=np.ones((4, 2)),
    )  # fmt: skip
    spec = {"factory": "demo:mlp", "kwargs": {}}
    plan = {
        "models": {name: {"spec": spec} for name in ("m0", "m1")},
        "config": {"models": {name: {"layers": layers} for name in ("m0", "m1")}},
    }
    sections = {}
    for recorded in (None, {"m0": "x", "m1": "y"}):
        result = tmp_path / f"{bool(recorded)}.zarr"
        provenance = {"estimator": "minibatch", "ci_level": 0.95, "models": {"m0": {}, "m1": {}}}
        if recorded:
            provenance["architectures"] = recorded
        write_result(
            StudyResult(["m0", "m1"], {("m0", "m1"): pair}, provenance), result, overwrite=False
        )
        dataset = {"result": str(result), "table": str(csv_path_for(result)), "plots": "-"}
        view = _dataset_view(plan, "d", dataset)
        sections[bool(recorded)] = (view.architectures, _architecture_section(view))
    # without a record, the plan's factory makes the two one architecture; the recorded
    # declaration (what `ckapipe analyze --architecture` stored) wins
    assert sections[False][0] == {"m0": "demo:mlp", "m1": "demo:mlp"}
    assert "<td>within demo:mlp</td>" in sections[False][1]
    assert "<td>across" not in sections[False][1]
    assert sections[True][0] == {"m0": "x", "m1": "y"}
    assert "<td>across x × y</td>" in sections[True][1]
    assert "<td>within" not in sections[True][1]


def test_batch_advice_names_a_batch_size_with_enough_whole_batches():
    from ckapipe.analyze.summary import batches_per_epoch, interval_batch_warning

    def partition(n: int, m: int) -> dict:
        return {"n_samples": n, "batch_size": m, "batches_per_epoch": batches_per_epoch(n, m)}

    assert batches_per_epoch(1024, 128) == 8 and batches_per_epoch(40, 12) == 4  # 12, 12, 12, 4
    assert batches_per_epoch(42, 20) == 2  # a remainder of 2 rows is dropped
    assert interval_batch_warning(partition(1024, 256)) is None
    advice = interval_batch_warning(partition(1024, 512))
    assert "2 batch(es) per epoch" in advice and "--batch-size 256 or smaller" in advice
    assert "--batch-size 256" in interval_batch_warning(partition(1024, 512), "jackknife")
    assert "--batch-size 8 or smaller" in interval_batch_warning(partition(1024, 512), "bootstrap")
    assert "too small" in interval_batch_warning(partition(12, 8))
    assert interval_batch_warning({"n_samples": 10, "batch_size": None}) is None  # full mode


def test_report_shows_intervals_withheld_reasons_and_null_thresholds():
    import html

    from ckapipe.analyze.result import PairResult, StudyResult
    from ckapipe.workflow.html_report import _diagonal_cell, _pairs_table

    layers = ["l0", "l1"]
    cka = np.array([[0.91, 0.2], [0.3, 0.82]])
    nan = np.full((2, 2), np.nan)
    reason = "interval withheld: 2 batches < 4 needed for validated 95% coverage (jackknife)"
    withheld = PairResult(
        "m0", "m1", layers, layers, cka, nan, nan, null_threshold=np.full((2, 2), 0.25),
        interval_method="none", interval_note=reason,
    )  # fmt: skip
    reported = PairResult(
        "m0", "m0", layers, layers, cka, cka - 0.05, cka + 0.04,
        interval_method="jackknife over 8 batches, t quantile on 7 df",
    )  # fmt: skip
    study = StudyResult(
        models=["m0", "m1"], pairs={("m0", "m0"): reported, ("m0", "m1"): withheld}, provenance={}
    )
    table = _pairs_table(study, 0.95)
    assert html.escape(reason) in table and "jackknife over 8 batches" in table
    assert "0.250" in table and "3/4" in table  # largest null threshold, layer pairs above it
    assert _diagonal_cell(withheld, 0) == "0.910 <small>(null 0.250)</small>"
    assert _diagonal_cell(reported, 1) == "0.820 [0.770, 0.860]"


# -- Snakemake: lint and dry run ------------------------------------------------------------------
def _snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_workflow_is_lint_clean(tmp_path):
    repo_root = Path(__file__).resolve().parents[1]
    for snakefile in (SNAKEFILE, repo_root / "Snakefile"):
        completed = _snakemake("--snakefile", str(snakefile), "--lint", cwd=tmp_path)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert "Lints for" not in completed.stdout + completed.stderr


def _ckapipe_run(*args: str) -> str:
    """``ckapipe run ARGS`` through the installed console script; its output, once it succeeded."""
    ckapipe = shutil.which("ckapipe")
    assert ckapipe, "the ckapipe console script is not installed"
    completed = subprocess.run([ckapipe, "run", *args], capture_output=True, text=True, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


def test_dry_run_plans_the_whole_demo(tmp_path):
    output = _ckapipe_run("--workdir", str(tmp_path), "--", "--dry-run")
    counts = job_counts(output)
    # a minibatch study of one epoch: each extract job also writes its store's Gram cache
    assert counts == {
        "demo_data": 1,
        "train": 4,
        "extract": 4,
        "analyze": 1,
        "plot": 1,
        "report": 1,
        "all": 1,
    }, output
    # the declared architectures go into the result (analyze), not only into the plots
    analyze = next(line for line in output.splitlines() if "ckapipe analyze " in line)
    declared = ["mlp_s0=mlp", "mlp_s1=mlp", "cnn_s0=cnn", "cnn_s1=cnn"]
    assert all(f"--architecture {option}" in analyze for option in declared), analyze
    assert not (tmp_path / "results").exists()


def test_full_mode_tile_jobs_are_planned_as_separate_jobs_and_a_merge(tmp_path):
    """analysis.full_tiles = 3: three tile jobs (`--tiles K/3`) and one merge per model."""
    config = demo_config()
    config["analysis"].update({"mode": "full", "estimator": "debiased", "full_tiles": 3})
    study = tmp_path / "tiles.yaml"
    study.write_text(yaml.safe_dump(config))
    output = _ckapipe_run(str(study), "--workdir", str(tmp_path), "--", "--dry-run")
    counts = job_counts(output)
    assert (counts.get("gram_tile"), counts.get("gram_merge"), counts.get("gram")) == (12, 4, None)
    for k in (1, 2, 3):
        assert output.count(f"--tiles {k}/3 ") == 4, output
    assert output.count("ckapipe merge-grams ") == 4, output


def test_heavy_jobs_declare_the_configured_threads(tmp_path):
    """resources.threads becomes the `threads:` of extract (plus one per DataLoader worker), gram
    and analyze, and gram's reader threads; training stays at 1 thread."""
    import re

    config = demo_config()
    config["resources"]["threads"] = 3
    config["extraction"]["num_workers"] = 2
    config["analysis"]["epochs"] = 2  # more than epoch 0: the gram rule builds the caches
    study = tmp_path / "threads.yaml"
    study.write_text(yaml.safe_dump(config))
    # --cores above every job's threads: a local run caps a job's threads at --cores
    output = _ckapipe_run(str(study), "--workdir", str(tmp_path), "--", "-n", "--cores", "16")
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(.*?)\n(?=\S)", output, re.M | re.S)
    threads = {}
    for rule, block in jobs:
        found = re.search(r"^\s+threads: (\d+)$", block, re.M)
        threads.setdefault(rule, set()).add(int(found.group(1)) if found else 1)
    assert threads["extract"] == {5}, output
    assert threads["gram"] == {3} and threads["analyze"] == {3}, output
    assert threads["train"] == {1}, output
    assert output.count("ckapipe gram ") == 4 and output.count("--threads 3 ") == 4, output


def test_two_datasets_make_one_study_each_from_shared_models(tmp_path):
    config = demo_config()
    config["datasets"]["train_subset"] = {"demo": "train", "limit": 512}
    config["analysis"]["epochs"] = 2  # so that the gram rule runs too
    study = tmp_path / "two.yaml"
    study.write_text(yaml.safe_dump(config))
    output = _ckapipe_run(str(study), "--workdir", str(tmp_path), "--", "-n")
    counts = job_counts(output)
    # models are trained once; each is extracted on both datasets; one analysis per dataset
    assert (
        counts["train"],
        counts["extract"],
        counts["gram"],
        counts["analyze"],
        counts["plot"],
    ) == (4, 8, 8, 2, 2)
    assert "--limit 512" in output


def test_repository_snakefile_defaults_to_the_demo(tmp_path):
    repo_root = Path(__file__).resolve().parents[1]
    completed = _snakemake(
        "--snakefile", str(repo_root / "Snakefile"), "--dry-run", "--cores", "1", cwd=tmp_path
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert job_counts(output).get("report") == 1, output


# -- code and format versions in the cache key -----------------------------------------------------
def test_store_and_gram_keys_cover_the_format_versions(monkeypatch):
    store, gram = _key(), gram_key("0" * 16, {"mode": "minibatch"})
    monkeypatch.setattr(keys, "STORE_FORMAT_VERSION", keys.STORE_FORMAT_VERSION + 1)
    assert _key() != store
    monkeypatch.setattr(keys, "GRAM_FORMAT_VERSION", keys.GRAM_FORMAT_VERSION + 1)
    assert gram_key("0" * 16, {"mode": "minibatch"}) != gram


def test_code_identity_follows_the_source_of_every_named_callable(tmp_path, monkeypatch):
    module = tmp_path / "usercode_for_keys.py"
    module.write_text("def make():\n    return 1\n\ndef transform(x):\n    return x\n")
    helper = tmp_path / "helper.txt"
    helper.write_text("v1")
    monkeypatch.chdir(tmp_path)  # found the way ckapipe extract finds it: the current directory
    hasher = FileHasher(tmp_path / "index.json")
    spec = {"factory": "usercode_for_keys:make", "transform": "usercode_for_keys:transform"}
    first = code_identity(spec, ["helper.txt"], hasher, "datasets.d.spec")
    assert set(first["sources"]) == {"factory", "transform"}
    assert first["sources"]["factory"]["sha256"] == hashlib.sha256(module.read_bytes()).hexdigest()
    # a file.py:callable reference and an optional package's constructor
    by_path = code_identity({"factory": "usercode_for_keys.py:make"}, [], hasher, "m")
    assert by_path["sources"]["factory"] == first["sources"]["factory"]
    assert (
        "version"
        in code_identity({"factory": "timm:resnet18"}, [], hasher, "m")["sources"]["factory"]
    )
    hasher.save()

    # an edit that keeps the size and the mtime still changes the identity (and so the key)
    stat = module.stat()
    module.write_text(module.read_text().replace("return x", "return 2"))
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = code_identity(spec, ["helper.txt"], FileHasher(tmp_path / "index.json"), "d")
    assert edited["sources"]["transform"] != first["sources"]["transform"]
    helper.write_text("v2")
    assert code_identity(spec, ["helper.txt"], hasher, "d")["files"] != first["files"]

    with pytest.raises(keys.CodeSourceError, match="models.m.spec.factory.*no_such_module_xyz"):
        code_identity({"factory": "no_such_module_xyz:f"}, [], hasher, "models.m.spec")


def test_file_hasher_sees_a_replaced_file_with_the_same_size_and_mtime(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"AAAA")
    index = tmp_path / "index.json"
    hasher = FileHasher(index)
    assert hasher.sha256(weights) == hashlib.sha256(b"AAAA").hexdigest()
    hasher.save()
    stat = weights.stat()
    replacement = tmp_path / "new.pt"
    replacement.write_bytes(b"BBBB")
    os.replace(replacement, weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert FileHasher(index).sha256(weights) == hashlib.sha256(b"BBBB").hexdigest()
    weights.write_bytes(b"CCCC")  # in place: same inode
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert FileHasher(index).sha256(weights) == hashlib.sha256(b"CCCC").hexdigest()


# -- live writers ---------------------------------------------------------------------------------
_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(lock: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_wait_for_writer_waits_for_a_live_writer_inside_or_beside_the_entry(tmp_path):
    import time

    store = tmp_path / "stores" / "abc.zarr"
    _store(store, None, complete=False)
    wait_for_writer(store, timeout=0)  # nobody writes it
    wait_for_writer(tmp_path / "absent.zarr", timeout=0)
    for lock in (store / ".writer.lock", store.parent / ".abc.zarr.lock"):
        holder = _hold_lock(lock, 1.5)
        with pytest.raises(LockTimeoutError, match=f"locked by pid {holder.pid}"):
            wait_for_writer(store, timeout=0.2)
        started = time.monotonic()
        wait_for_writer(store)
        assert holder.poll() == 0 and time.monotonic() - started > 0.5
    # a dead writer's lock file holds nothing
    wait_for_writer(store, timeout=0)


def test_guard_never_removes_a_store_being_written(tmp_path):
    store = tmp_path / "live.zarr"
    _store(store, None, complete=False)  # without weights: the guard would remove it
    holder = _hold_lock(store / ".writer.lock", 30)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "ckapipe.workflow.guard", str(store), "--timeout", "1"],
            capture_output=True,
            text=True,
        )
        assert completed.returncode != 0
        assert "being written" in completed.stderr and "locked by pid" in completed.stderr
        assert (store / "zarr.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    subprocess.run(
        [sys.executable, "-m", "ckapipe.workflow.guard", str(store)],
        check=True,
        capture_output=True,
    )
    assert not store.exists()  # unlocked and unverifiable: removed


# -- cache jobs ----------------------------------------------------------------------------------
_BUILD = (
    "import os, sys, time; out = sys.argv[1]; time.sleep(1.0); "
    "open(os.path.join(out, 'made.txt'), 'w').write(str(os.getpid())); "
    "open(sys.argv[2], 'a').write('built\\n')"
)


def _build_job(target: Path, receipt: Path, runs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "ckapipe.workflow.jobs", "build",
            "--target", str(target), "--receipt", str(receipt), *extra,
            "--", sys.executable, "-c", _BUILD, "{out}", str(runs),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def test_two_build_jobs_for_one_entry_build_it_once_and_publish_it_whole(tmp_path):
    target, runs = tmp_path / "cache" / "entry", tmp_path / "runs.txt"
    jobs = [_build_job(target, tmp_path / f"study{i}" / "receipt.json", runs) for i in (1, 2)]
    outputs = [job.communicate(timeout=60)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert runs.read_text() == "built\n"  # the second job waited, then reused
    assert sum("reusing it" in output for output in outputs) == 1, outputs
    assert (target / "made.txt").is_file()
    assert [p.name for p in target.parent.iterdir() if "building" in p.name] == []
    receipts = [json.loads((tmp_path / f"study{i}" / "receipt.json").read_text()) for i in (1, 2)]
    # each receipt says whether its job built the entry or found it complete
    assert sorted(receipt["reused"] for receipt in receipts) == [False, True]
    assert [receipt["path"] for receipt in receipts] == [str(target)] * 2
    reused = [json.loads(r.read_text())["reused"] for r in sorted(tmp_path.glob("study*/*.json"))]
    assert reused == ["reusing it" in output for output in outputs]


@pytest.mark.slow
def test_a_gram_cache_made_from_an_earlier_store_is_rebuilt(tmp_path):
    store, gram = tmp_path / "s.zarr", tmp_path / "g.zarr"
    _store(store, None, complete=True)
    subprocess.run(
        ["ckapipe", "gram", str(store), "--batch-size", "4", "--out", str(gram)],
        check=True,
        capture_output=True,
    )
    runs = tmp_path / "runs.txt"
    job = _build_job(gram, tmp_path / "r.json", runs, "--source", str(store))
    assert "reusing it" in job.communicate(timeout=60)[0] and not runs.exists()
    shutil.rmtree(store)
    _store(store, "e" * 64, complete=True)  # re-extracted under the same key
    job = _build_job(gram, tmp_path / "r.json", runs, "--source", str(store))
    output = job.communicate(timeout=60)[0]
    assert "removed incomplete or stale" in output and runs.read_text() == "built\n", output


# -- fused extract + Gram: one job per model x dataset ---------------------------------------------
def test_a_minibatch_study_extracts_and_builds_grams_in_one_job_with_its_resources(tmp_path):
    """Epoch 0 only: the extract job writes the Gram cache (its key unchanged, so shared with
    `ckapipe gram`-built caches), analyze waits for its receipts, and mem_mb/runtime come from
    the config's resources."""
    import re

    config = demo_config()
    config["resources"]["mem_mb"] = {"extract": 1234, "analyze": 777}
    config["resources"]["runtime"] = {"extract": 7}
    study = tmp_path / "fused.yaml"
    study.write_text(yaml.safe_dump(config))
    output = _ckapipe_run(str(study), "--workdir", str(tmp_path), "--", "-n")
    counts = job_counts(output)
    assert counts["extract"] == 4 and "gram" not in counts, counts
    jobs = dict(re.findall(r"^(?:local)?rule (\w+):\n(.*?)\n(?=\S)", output, re.M | re.S))
    resources = re.search(r"resources: (.*)", jobs["extract"]).group(1).split(", ")
    assert "mem_mb=1234" in resources and "runtime=7" in resources, resources
    analyze = re.search(r"resources: (.*)", jobs["analyze"]).group(1).split(", ")
    assert "mem_mb=777" in analyze and "runtime=120" in analyze, analyze
    assert output.count("--gram-target ") == 4 and "fused-grams/" in output
    partition = keys.gram_partition(config["analysis"])
    for target in re.findall(r"--gram-target (\S+)", output):
        assert Path(target).parent.name == "grams" and Path(target).suffix == ".zarr"
    assert partition["precision"] in output
    # the demo stores exact Grams: the fused extraction is asked for them
    assert partition["storage"] == "float64"
    assert output.count("--gram-storage float64") == 4, output


def _store_job(tmp_path: Path, store: Path, target: Path, *extract: str) -> str:
    """``python -m ckapipe.workflow.jobs store`` with a fused Gram cache; its stderr."""
    dataset = json.dumps({"factory": "models:vector_dataset", "kwargs": {"n": 40}})
    completed = subprocess.run(
        [
            sys.executable, "-m", "ckapipe.workflow.jobs", "store", "--store", str(store),
            "--receipt", str(tmp_path / "r" / "store.json"),
            "--gram-target", str(target), "--gram-receipt", str(tmp_path / "r" / "gram.json"),
            "--gram-extract-args", "--gram-batch-size 8 --gram-precision float64",
            "--gram-build-args", "--batch-size 8 --precision float64 --device cpu",
            "--", "--model", "models:make_mlp", "--dataset", dataset, "--layers", "0,4",
            "--batch-size", "4", "--no-progress", *extract,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1"),
        timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stderr


@pytest.mark.slow
def test_store_job_writes_the_gram_cache_once_and_rebuilds_it_from_a_reused_store(tmp_path):
    from ckapipe.analyze.gram_cache import GramCache, build_gram_cache

    store, target = tmp_path / "cache/stores/s.zarr", tmp_path / "cache/grams/g.zarr"
    _store_job(tmp_path, store, target)
    fused = GramCache.open(target)
    receipt = tmp_path / "r/gram.json"
    assert json.loads(receipt.read_text()) == {"path": str(target), "reused": False}
    assert sorted(p.name for p in target.parent.iterdir() if "building" in p.name) == []
    built = build_gram_cache(store, tmp_path / "built", batch_size=8, precision="float64")
    for b in built.batches:
        for name in built.layer_names:
            assert np.array_equal(fused.batch_gram(name, b), built.batch_gram(name, b))
    # both complete and made from the store as it is: nothing is done
    again = _store_job(tmp_path, store, target)
    assert "found complete" in again and "reusing it" in again
    assert json.loads(receipt.read_text()) == {"path": str(target), "reused": True}
    # the Gram cache lost: the complete store is reused and `ckapipe gram` rebuilds the cache
    shutil.rmtree(target)
    rebuilt = _store_job(tmp_path, store, target)
    assert "found complete store" in rebuilt
    assert json.loads(receipt.read_text())["reused"] is False
    for b in built.batches:
        assert np.array_equal(GramCache.open(target).batch_gram("4", b), built.batch_gram("4", b))
