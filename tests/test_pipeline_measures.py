"""The demo study with ``analysis: {mode: full, estimator: debiased, measures: [cka, rsa,
procrustes, cca]}`` through the installed ``ckapipe run``: the measures reach the result, the
CSV and the report (a grid per measure and the agreement table)."""

from __future__ import annotations

import csv
import shutil
import subprocess

import numpy as np
import pytest
import yaml

import ckapipe
from ckapipe.run import DEFAULT_CONFIG

pytestmark = pytest.mark.slow

MEASURES = ["cka", "rsa", "procrustes", "cca"]


def test_demo_study_with_measures_shows_them_side_by_side(tmp_path):
    executable = shutil.which("ckapipe")
    assert executable, "the ckapipe console script is not installed"
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["study"] = "measures"
    config["analysis"].update(mode="full", estimator="debiased", measures=MEASURES)
    path = tmp_path / "measures.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    completed = subprocess.run(
        [executable, "run", str(path), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1500,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    results = tmp_path / "results/measures"
    result = ckapipe.load_result(results / "gratings/cka.zarr")
    assert result.provenance["measures"] == MEASURES
    for pair in result.pairs.values():
        assert list(pair.measures) == MEASURES
        np.testing.assert_array_equal(pair.measures["cka"], pair.cka)
        for name in ("rsa", "procrustes", "cca"):
            assert np.isfinite(pair.measures[name]).all(), (pair.model_a, pair.model_b, name)
    with (results / "gratings/cka.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[-3:] == ["rsa", "procrustes", "cca"]

    report = (results / "report.html").read_text()
    assert "<h3>Similarity measures</h3>" in report
    assert 'alt="measure grid"' in report
    assert "Agreement on the ranking of layer pairs" in report
    for name in MEASURES:
        assert f"<th>{name}</th>" in report
