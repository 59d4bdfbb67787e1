"""Every CLI command answers a user's mistake with one line (what is wrong, what to do), never a traceback.

Each case runs the real command on real files (stores, caches, results made here, by real
``ckapipe`` processes) and checks: non-zero exit, an ``Error:`` line, no traceback, and no
exception other than the CLI's own exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckapipe.cli import main

TESTS = Path(__file__).parent


def ckapipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ckapipe.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A complete store, an incomplete store, a Gram cache, a result, and some non-ckapipe files."""
    root = tmp_path_factory.mktemp("cli_errors")
    store = root / "store.zarr"
    extract = ckapipe(
        "extract", "--model", "models:make_mlp", "--dataset", "models:vector_dataset",
        "--layers", "1", "--layers", "3", "--out", str(store), "--batch-size", "8",
        "--dtype", "float32", "--no-progress", cwd=root,
    )  # fmt: skip
    assert extract.returncode == 0, extract.stdout + extract.stderr
    cache = root / "cache.zarr"
    gram = ckapipe("gram", str(store), "--batch-size", "8", "--out", str(cache), cwd=root)
    assert gram.returncode == 0, gram.stdout + gram.stderr
    result = root / "result.zarr"
    analyze = ckapipe("analyze", str(cache), "--out", str(result), cwd=root)
    assert analyze.returncode == 0, analyze.stdout + analyze.stderr
    incomplete = root / "incomplete.zarr"
    incomplete.mkdir()
    (incomplete / "zarr.json").write_text(
        (store / "zarr.json").read_text().replace('"complete": true', '"complete": false')
    )
    not_zarr = root / "plain_dir"
    not_zarr.mkdir()
    (not_zarr / "readme.txt").write_text("a folder of the user's, not a store\n")
    text_file = root / "notes.txt"
    text_file.write_text("not an HDF5 file\n")
    bad_config = root / "bad.yaml"
    bad_config.write_text("study: demo\nmodels: 3\n")
    model_typo = root / "model.json"
    model_typo.write_text(json.dumps({"factory": "models:make_mlp", "kwargs": {"hiden": 4}}))
    return {
        "root": root,
        "store": store,
        "cache": cache,
        "result": result,
        "incomplete": incomplete,
        "not_zarr": not_zarr,
        "text_file": text_file,
        "bad_config": bad_config,
        "model_typo": model_typo,
    }


CASES = {
    "extract: misspelled model kwarg": (
        "extract --model @{model_typo} --dataset models:vector_dataset --layers 1 "
        "--out {root}/x1.zarr",
        "hiden",
    ),
    "extract: unknown layer": (
        "extract --model models:make_mlp --dataset models:vector_dataset --layers nope "
        "--out {root}/x2.zarr",
        "nope",
    ),
    "extract: --out is an existing non-store folder": (
        "extract --model models:make_mlp --dataset models:vector_dataset --layers 1 "
        "--out {not_zarr}",
        "plain_dir",
    ),
    "layers: wrong --input-shape": ("layers models:make_mlp --input-shape 5", "input"),
    "info: not a store": ("info {not_zarr}", "plain_dir"),
    "info: a Gram cache": ("info {cache}", "cache.zarr"),
    "gram: not a store": ("gram {not_zarr} --out {root}/g1.zarr", "plain_dir"),
    "gram: incomplete store": ("gram {incomplete} --out {root}/g2.zarr", "incomplete"),
    "gram: a Gram cache instead of a store": ("gram {cache} --out {root}/g3.zarr", "cache.zarr"),
    "gram: batch larger than n": ("gram {store} --batch-size 100000 --out {root}/g4.zarr", "batch"),
    "gram: batch of 3": ("gram {store} --batch-size 3 --out {root}/g5.zarr", "batch"),
    "gram: not a device": ("gram {store} --device gpu0 --out {root}/g6.zarr", "gpu0"),
    "gram: threshold 0": ("gram {store} --threshold 0 --out {root}/g7.zarr", "--threshold"),
    "gram: unknown kernel": ("gram {store} --kernel poly --out {root}/g8.zarr", "poly"),
    "extract: negative seed": (
        "extract --model models:make_mlp --dataset models:vector_dataset --layers 1 "
        "--seed -1 --out {root}/x3.zarr",
        "--seed",
    ),
    "extract: unknown reduction": (
        "extract --model models:make_mlp --dataset models:vector_dataset --layers 1 "
        "--reduce max --out {root}/x4.zarr",
        "max",
    ),
    "layers: unknown --input-dtype": (
        "layers models:make_mlp --input-shape 12 --input-dtype int8",
        "int8",
    ),
    "analyze: unknown --interval-method": (
        "analyze {cache} --interval-method normal --out {root}/r4.zarr",
        "normal",
    ),
    "analyze: an activation store": ("analyze {store} --out {root}/r1.zarr", "store.zarr"),
    "analyze: incomplete cache": ("analyze {incomplete} --out {root}/r2.zarr", "incomplete"),
    "analyze: not zarr": ("analyze {not_zarr} --out {root}/r3.zarr", "plain_dir"),
    "analyze: existing result without --overwrite": (
        "analyze {cache} --out {result}",
        "result.zarr",
    ),
    "merge-grams: one cache with itself": ("merge-grams {cache} {cache} --out {root}/m.zarr", ""),
    "plot: not a result": ("plot {cache} --out {root}/figs", "cache.zarr"),
    "import-h5: not HDF5": ("import-h5 {text_file} --out {root}/h.zarr", "notes.txt"),
    "import-h5: unknown --dtype": (
        "import-h5 {text_file} --dtype int8 --out {root}/h2.zarr",
        "int8",
    ),
    "export-h5: not a store": ("export-h5 {not_zarr} --out {root}/e.h5", "plain_dir"),
    "run: invalid config": ("run {bad_config} -- --dry-run", "models"),
    "run: missing config": ("run {root}/nope.yaml", "nope.yaml"),
    # /sys refuses new files even to root: a file-system condition, not a bug
    "gram: --out where nothing may be written": (
        "gram {store} --batch-size 8 --out /sys/ckapipe-cannot-write.zarr",
        "/sys/",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line(
    files: dict[str, Path], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, needle = CASES[case]
    args = template.format(**{k: str(v) for k, v in files.items()}).split()
    # in this process (a subprocess per case would spend most of the suite importing torch): a
    # bug would surface as an exception the runner caught, a user error as SystemExit
    monkeypatch.chdir(files["root"])
    result = CliRunner().invoke(main, args)
    output = result.output
    assert result.exit_code != 0, f"{case}: exit 0\n{output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{case}: {type(result.exception).__name__} escaped: {result.exception}\n{output}"
    )
    assert "Traceback" not in output, f"{case}: traceback\n{output}"
    assert "Error" in output, f"{case}: no error line\n{output}"
    assert needle in output, f"{case}: message does not name {needle!r}\n{output}"
