"""The study report in a real headless Chromium, at a phone width (390 px) and a desktop width
(1280 px): the page never scrolls sideways (wide tables and the study grid scroll inside their
own box), every embedded figure decodes, and the screenshots are real pictures of the page.

Skipped when no Chromium is on PATH; CI installs Debian's (`.ci/run`) and sets
CKAPIPE_REQUIRE_CHROMIUM=1, which turns the skip into an error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import load_file_module
from matplotlib.image import imread

from ckapipe.analyze.plots import plot_result
from ckapipe.analyze.result import PairResult, StudyResult, csv_path_for, write_result
from ckapipe.workflow.html_report import write_report

TOOL = Path(__file__).resolve().parents[1] / "tools" / "screenshot_report.py"


screenshot_report = load_file_module(TOOL, "screenshot_report")
BROWSER = screenshot_report.find_chromium()
if BROWSER is None and os.environ.get("CKAPIPE_REQUIRE_CHROMIUM") == "1":
    # CI installs Chromium (.ci/run): a missing browser there is a failure, not a skip
    raise RuntimeError("CKAPIPE_REQUIRE_CHROMIUM=1 but no Chromium is on PATH")
pytestmark = [
    pytest.mark.slow,  # about 1 min on 2 loaded cores (figures, then 5 Chromium runs)
    pytest.mark.skipif(
        BROWSER is None,
        reason="no Chromium on PATH (chromium, chromium-browser or google-chrome); on Debian: "
        "apt-get install -y --no-install-recommends chromium",
    ),
]

# a long factory and long layer names: the widest content a real study puts in the tables
FACTORY = "my_lab.experiments.vision.models:build_wide_residual_network_with_long_name"
LAYERS = [f"encoder.stage{i}.block{j}.activation_output" for i in (1, 2) for j in (0, 1)]
MODELS = {"wrn_seed0": "wrn", "wrn_seed1": "wrn", "mlp_seed0": "mlp"}


def _pair(a: str, b: str, rng: np.random.Generator, n_batches: int = 8) -> PairResult:
    n = len(LAYERS)
    hsic = rng.uniform(0.2, 0.9, size=(n_batches, n, n))
    if a == b:
        hsic = (hsic + hsic.transpose(0, 2, 1)) / 2
        hsic[:, np.arange(n), np.arange(n)] = 1.0
    ones = np.ones((n_batches, n))
    cka = hsic.sum(0) / n_batches
    return PairResult(
        a, b, LAYERS, LAYERS, cka, cka - 0.02, cka + 0.02,
        hsic_per_batch=hsic, self_a_per_batch=ones, self_b_per_batch=ones,
        interval_method="jackknife over 8 batches, t quantile on 7 df",
    )  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    names = list(MODELS)
    pairs = {(a, b): _pair(a, b, rng) for i, a in enumerate(names) for b in names[i:]}
    study = StudyResult(
        models=names,
        pairs=pairs,
        provenance={
            "estimator": "minibatch",
            "ci_level": 0.95,
            "mode": "minibatch",
            "partition": {"epochs": 1},
            "models": {name: {} for name in names},
        },
    )
    result = folder / "cka.zarr"
    write_result(study, result, overwrite=False)
    plots = folder / "plots"
    plot_result(result, plots, dpi=60, architectures=MODELS)
    spec = {"factory": FACTORY, "kwargs": {"depth": 28, "widen_factor": 10}}
    plan = {
        "study": "browser-check",
        "config": {
            "analysis": {
                "estimator": "minibatch",
                "kernel": "linear",
                "mode": "minibatch",
                "batch_size": 128,
                "epochs": 1,
                "permutations": 0,
            },
            "models": {
                name: {"layers": LAYERS, "architecture": arch} for name, arch in MODELS.items()
            },
        },
        "models": {
            name: {"spec": spec, "weights_identity": {}, "metrics": None, "architecture": arch}
            for name, arch in MODELS.items()
        },
        "datasets": {
            "probe": {
                "spec": {"array": "data/probe_images_with_a_long_file_name.npy"},
                "result": str(result),
                "table": str(csv_path_for(result)),
                "plots": str(plots),
                "caches": {
                    name: {
                        "store": f".cache/ckapipe/stores/{k:016x}.zarr",
                        "gram": f".cache/ckapipe/grams/{k:016x}.zarr",
                    }
                    for k, name in enumerate(names)
                },
            }
        },
    }
    return write_report(plan, folder / "report.html")


@pytest.mark.parametrize("width", [390, 1280])
def test_report_fits_the_screen_and_every_figure_decodes(report, width, tmp_path):
    layout = screenshot_report.measure(report, width, browser=BROWSER)
    assert layout["inner_width"] == width
    # nothing makes the page wider than the screen: the page never scrolls sideways
    assert layout["scroll_width"] <= width, layout
    figures = len(list((report.parent / "plots").glob("*.png")))
    assert layout["images"] == figures and layout["broken_images"] == 0, layout

    height = min(layout["scroll_height"], 4000)
    png = screenshot_report.screenshot(
        report, tmp_path / "shot.png", width, height, browser=BROWSER
    )
    image = imread(png)[..., :3]
    assert image.shape[:2] == (height, width)
    # a real picture of the page: mostly white paper, with text, table rules and figures
    assert 0.5 < image.mean() < 0.99 and image.std() > 0.1
    assert len(np.unique((image.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 50


def test_tool_reports_a_page_that_overflows(tmp_path):
    page = tmp_path / "wide.html"
    page.write_text("<html><body><div style='width:700px'>wide</div></body></html>")
    assert screenshot_report.main([str(page), "--out-dir", str(tmp_path), "--widths", "390"]) == 1
    assert (tmp_path / "report_390px.png").is_file()
    assert screenshot_report.main([str(page), "--out-dir", str(tmp_path), "--widths", "800"]) == 0
