"""Plots of CKA results: files are written and not blank, cells carry the colour of their value,
the redundant half of a self-comparison is really blank, NaN cells are marked, bad input is
refused, and pyplot's global state is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib import colormaps
from matplotlib.image import imread

from ckapipe.analyze.cli_plot import plot as plot_command
from ckapipe.analyze.plots import (
    MIRROR_CELL_COLOR,
    MIRROR_HATCH_COLOR,
    correspondence_groups,
    plot_correspondence,
    plot_correspondence_groups,
    plot_heatmap,
    plot_result,
    plot_study_grid,
    save_figure,
)
from ckapipe.analyze.study import PairResult, StudyResult, load_result

RESNET18 = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
RESNET34 = [
    f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for j in range(n)
]


def make_pair(
    model_a: str,
    model_b: str,
    layers_a: list[str],
    layers_b: list[str],
    *,
    seed: int = 0,
    cka: np.ndarray | None = None,
    diagnostics: list[str] | None = None,
) -> PairResult:
    """A pair with a plausible CKA pattern (high near the matched diagonal)."""
    if cka is None:
        rng = np.random.default_rng(seed)
        depth_a = np.linspace(0.0, 1.0, len(layers_a))[:, None]
        depth_b = np.linspace(0.0, 1.0, len(layers_b))[None, :]
        cka = 0.9 * np.exp(-3.0 * (depth_a - depth_b) ** 2) + 0.05 * rng.random(
            (len(layers_a), len(layers_b))
        )
        if model_a == model_b:
            cka = (cka + cka.T) / 2.0
            np.fill_diagonal(cka, 1.0)
    n_batches = 3
    return PairResult(
        model_a=model_a,
        model_b=model_b,
        layers_a=list(layers_a),
        layers_b=list(layers_b),
        cka=cka,
        ci_low=cka - 0.04,
        ci_high=cka + 0.03,
        p_value=None,
        diagnostics=list(diagnostics or []),
        hsic_per_batch=np.repeat(cka[None], n_batches, axis=0),
        self_a_per_batch=np.ones((n_batches, len(layers_a))),
        self_b_per_batch=np.ones((n_batches, len(layers_b))),
    )


def make_study(pairs: list[PairResult], models: list[str]) -> StudyResult:
    layers = {}
    for p in pairs:
        layers.setdefault(p.model_a, p.layers_a)
        layers.setdefault(p.model_b, p.layers_b)
    return StudyResult(
        models=models,
        pairs={(p.model_a, p.model_b): p for p in pairs},
        # the root attributes plots read (see ckapipe.analyze.result)
        provenance={
            "format": "ckapipe.cka-result",
            "format_version": 2,
            "estimator": "minibatch",
            "ci_level": 0.95,
            "models": {m: {"layers": layers.get(m, [])} for m in models},
            "pairs": [[p.model_a, p.model_b] for p in pairs],
        },
    )


def assert_not_blank(path: Path) -> np.ndarray:
    assert path.is_file(), path
    image = imread(path)
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.1, f"{path} looks blank (pixel std {rgb.std():.3f})"
    distinct = np.unique((rgb * 255).round().astype(np.uint8), axis=0)
    assert len(distinct) > 20, f"{path} has only {len(distinct)} distinct colours"
    return image


def cell_rgb(image: np.ndarray, ax, row: int, col: int) -> np.ndarray:
    """RGB of the saved PNG at the centre of heatmap cell (row, col)."""
    x, y = ax.transData.transform((col, row))
    # display coordinates start bottom-left, image rows top-left
    return image[int(image.shape[0] - y), int(x), :3]


def scale_rgb(value: float, cmap: str = "magma") -> np.ndarray:
    return np.asarray(colormaps[cmap](value)[:3])


def heatmap_axes(fig):
    return next(ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>")


# --------------------------------------------------------------------------- heatmap


def test_heatmap_cells_have_the_colour_of_their_value(tmp_path):
    # distinct, asymmetric values: a transposed or flipped matrix would not match
    cka = np.array([[0.05, 0.30, 0.55], [0.80, 0.95, 0.15], [0.40, 0.65, 0.90], [0.20, 0.70, 0.10]])
    pair = make_pair("a", "b", ["l0", "l1", "l2", "l3"], ["m0", "m1", "m2"], cka=cka)
    fig = plot_heatmap(pair, annotate=False)
    image = assert_not_blank(save_figure(fig, tmp_path / "heatmap.png"))
    ax = heatmap_axes(fig)
    for row in range(4):
        for col in range(3):
            np.testing.assert_allclose(
                cell_rgb(image, ax, row, col), scale_rgb(cka[row, col]), atol=2.5 / 255
            )
    # documented orientation: first layer of model a at the top, of model b at the left
    assert ax.transData.transform((0, 0))[1] > ax.transData.transform((0, 3))[1]
    assert ax.transData.transform((0, 0))[0] < ax.transData.transform((2, 0))[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l0", "l1", "l2", "l3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["m0", "m1", "m2"]
    assert "a" in ax.get_title() and "b" in ax.get_title()


def test_self_comparison_masks_the_upper_half(tmp_path):
    layers = [f"block{i}" for i in range(6)]
    pair = make_pair("net", "net", layers, layers, seed=3)
    fig = plot_heatmap(pair, annotate=False)
    image = assert_not_blank(save_figure(fig, tmp_path / "self.png"))
    ax = heatmap_axes(fig)
    mirror = np.asarray(matplotlib.colors.to_rgb(MIRROR_CELL_COLOR))
    hatch = np.asarray(matplotlib.colors.to_rgb(MIRROR_HATCH_COLOR))
    for row in range(6):
        for col in range(6):
            pixel = cell_rgb(image, ax, row, col)
            if col > row:
                # hatched light grey: neither white (the page) nor the pale colour of CKA 1
                assert np.abs(pixel - scale_rgb(1.0)).max() > 0.1, (row, col, pixel)
                assert np.abs(pixel - np.ones(3)).max() > 0.02, (row, col, pixel)
                assert min(np.abs(pixel - c).max() for c in (mirror, hatch)) < 0.12
            else:
                np.testing.assert_allclose(pixel, scale_rgb(pair.cka[row, col]), atol=2.5 / 255)


def test_nan_cells_are_hatched_grey_and_listed_in_a_footnote(tmp_path):
    layers = ["conv1", "layer1.0", "layer1.1", "fc"]
    cka = make_pair("m", "m", layers, layers).cka
    cka[2, :] = np.nan
    cka[:, 2] = np.nan
    message = "layer 'layer1.1' of m: self-HSIC1 = -3.1e-06 <= 0, CKA undefined"
    pair = make_pair("m", "m", layers, layers, cka=cka, diagnostics=[message])
    fig = plot_heatmap(pair, annotate=False)
    image = save_figure(fig, tmp_path / "nan.png")
    image = imread(image)
    ax = heatmap_axes(fig)
    for row, col in [(2, 0), (2, 1), (2, 2), (3, 2)]:
        pixel = cell_rgb(image, ax, row, col)
        # neutral grey (the face or the hatch lines), neither background nor a scale colour
        assert np.ptp(pixel) < 0.02, pixel
        assert 0.3 < pixel.mean() < 0.85, pixel
    texts = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
    assert "self-HSIC1 = -3.1e-06" in texts
    assert "m:layer1.1" in texts


def test_out_of_scale_values_extend_the_colorbar_and_annotations_show_values():
    cka = np.array([[1.0, -0.04], [-0.04, 1.0]])
    pair = make_pair("a", "b", ["x", "y"], ["x", "y"], cka=cka)
    fig = plot_heatmap(pair, annotate=True)
    ax = heatmap_axes(fig)
    assert ax.images[0].colorbar.extend == "min"
    # each value with "±" the half-width of its interval (make_pair: [cka − 0.04, cka + 0.03])
    values = sorted(t.get_text().split("\n")[0] for t in ax.texts)
    assert values == ["-0.04", "-0.04", "1.00", "1.00"]
    assert {t.get_text().split("\n")[1] for t in ax.texts} == {f"±{0.035:.2f}"}


def test_annotate_auto_depends_on_layer_count():
    small = [f"l{i}" for i in range(4)]
    fig = plot_heatmap(make_pair("a", "a", small, small), annotate="auto")
    ax = heatmap_axes(fig)
    # lower half with diagonal of a 4-layer self-comparison: 10 numbers
    assert len(ax.texts) == 10
    big = [f"l{i}" for i in range(20)]
    assert not heatmap_axes(plot_heatmap(make_pair("a", "b", big, big), annotate="auto")).texts
    with pytest.raises(ValueError, match="annotate"):
        plot_heatmap(make_pair("a", "b", small, small), annotate="yes")  # type: ignore[arg-type]


def test_long_layer_names_are_shortened_and_the_figure_grows(tmp_path):
    long_names = [
        f"model.encoder.layers.{i}.self_attention.output.dense_projection" for i in range(30)
    ]
    pair = make_pair("bert", "bert", long_names, long_names)
    fig = plot_heatmap(pair, max_label_chars=24)
    assert_not_blank(save_figure(fig, tmp_path / "long.png", dpi=40))
    ax = heatmap_axes(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels and all(len(label) <= 24 for label in labels)
    # the shared prefix moves, intact, into the axis label; the distinguishing index stays
    assert "model.encoder.layers." in ax.get_ylabel()
    assert labels[0].startswith("0.")
    small = plot_heatmap(make_pair("a", "b", ["x", "y"], ["x", "y"]))
    assert fig.get_figwidth() > small.get_figwidth()
    assert fig.get_figheight() > small.get_figheight()


def test_heatmap_refuses_a_matrix_that_does_not_match_the_layers():
    pair = make_pair("a", "b", ["x", "y"], ["x", "y", "z"], cka=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"a--b: cka has shape \(2, 2\).*expected \(2, 3\)"):
        plot_heatmap(pair)


def test_heatmap_draws_into_a_given_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    assert plot_heatmap(make_pair("a", "b", RESNET18, RESNET34), ax=ax) is fig
    assert ax.images


# --------------------------------------------------------------------------- study grid


def test_study_grid_shows_every_pair_with_transposes_and_gaps(tmp_path):
    models = ["resnet18", "resnet18_b", "resnet34"]
    layers = {"resnet18": RESNET18, "resnet18_b": RESNET18, "resnet34": RESNET34}
    pairs = [
        make_pair(a, b, layers[a], layers[b], seed=k)
        for k, (a, b) in enumerate(
            [
                ("resnet18", "resnet18"),
                ("resnet18", "resnet18_b"),
                ("resnet18", "resnet34"),
                ("resnet18_b", "resnet18_b"),
                ("resnet34", "resnet34"),
            ]  # fmt: skip
        )
    ]  # resnet18_b--resnet34 is missing on purpose
    study = make_study(pairs, models)
    fig = plot_study_grid(study)
    assert_not_blank(save_figure(fig, tmp_path / "grid.png", dpi=50))
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 9
    grid = np.array(panels).reshape(3, 3)
    # the (resnet34, resnet18) panel is the stored (resnet18, resnet34) pair transposed
    drawn = np.ma.filled(grid[2, 0].images[0].get_array(), np.nan)
    np.testing.assert_array_equal(drawn, study.pairs[("resnet18", "resnet34")].cka.T)
    for i, j in [(1, 2), (2, 1)]:
        assert not grid[i, j].images
        assert any(t.get_text() == "not computed" for t in grid[i, j].texts)
    assert grid[0, 1].get_title() == "resnet18_b"
    assert grid[2, 0].get_ylabel() == "resnet34"


def test_study_grid_prints_values_and_interval_half_widths_where_they_fit():
    layers = ["relu1", "relu2", "relu3"]
    pairs = [
        make_pair("a", "a", layers, layers),
        make_pair("a", "b", layers, layers, seed=1),
        make_pair("b", "b", layers, layers, seed=2),
    ]
    pairs[1].ci_low[0, 2] = pairs[1].ci_high[0, 2] = np.nan  # no interval for one cell
    fig = plot_study_grid(make_study(pairs, ["a", "b"]))
    panels = np.array([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]).reshape(2, 2)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in panels[0, 1].texts}  # fmt: skip
    pair = pairs[1]
    half = (pair.ci_high - pair.ci_low) / 2
    assert texts[(1, 0)] == f"{pair.cka[1, 0]:.2f}\n±{half[1, 0]:.2f}"
    assert texts[(0, 2)] == f"{pair.cka[0, 2]:.2f}"  # no interval: the value alone
    # the (b, a) panel is the transpose, numbers and half-widths alike
    texts_ba = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
                for t in panels[1, 0].texts}  # fmt: skip
    assert texts_ba[(0, 1)] == texts[(1, 0)]
    # a self-comparison shows its lower half only; the upper half is a hatched mirror patch
    assert len(panels[0, 0].texts) == 6
    mirror = matplotlib.colors.to_rgba(MIRROR_CELL_COLOR)
    assert any(
        np.allclose(c.get_facecolor()[0], mirror) and len(c.get_paths()) == 3
        for c in panels[0, 0].collections
    )
    legend = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert legend == ["mirror of the lower half (not repeated)"]
    # eight layers per model: the numbers would not fit, so "auto" leaves them out
    big = [make_pair("a", "b", RESNET18, RESNET18)]
    grid = plot_study_grid(make_study(big, ["a", "b"]))
    assert [t.get_text() for ax in grid.axes for t in ax.texts] == ["not computed"] * 2


def test_study_grid_is_readable_for_eight_models(tmp_path):
    models = [f"model{k}" for k in range(8)]
    pairs = [
        make_pair(a, b, RESNET18, RESNET18, seed=i * 8 + j)
        for i, a in enumerate(models)
        for j, b in enumerate(models)
        if j >= i
    ]
    fig = plot_study_grid(make_study(pairs, models))
    assert_not_blank(save_figure(fig, tmp_path / "grid8.png", dpi=30))
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 64
    # each panel at least ~1.5 inches wide so that 8 layers stay legible
    width = panels[0].get_window_extent().width / fig.dpi
    assert width > 1.4


# --------------------------------------------------------------------------- correspondence


def test_correspondence_curve_is_the_diagonal_with_its_band(tmp_path):
    first = make_pair("resnet18", "resnet18_b", RESNET18, RESNET18, seed=1)
    second = make_pair("resnet18", "resnet18_c", RESNET18, RESNET18, seed=2)
    fig = plot_correspondence([first, second], ci_level=0.9)
    assert_not_blank(save_figure(fig, tmp_path / "corr.png", dpi=60))
    ax = fig.axes[0]
    assert len(ax.lines) >= 2
    for line, pair in zip(ax.lines[:2], (first, second), strict=True):
        expected = np.array([pair.cka[i, i] for i in range(len(RESNET18))])
        np.testing.assert_array_equal(line.get_ydata(), expected)
    low, high = ax.get_ylim()
    assert low <= min(p.ci_low[i, i] for p in (first, second) for i in range(8))
    assert high >= max(p.ci_high[i, i] for p in (first, second) for i in range(8))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "resnet18 vs resnet18_b (band: 90% CI)",
        "resnet18 vs resnet18_c (band: 90% CI)",
    ]


def test_correspondence_marks_undefined_layers_and_missing_intervals():
    pair = make_pair("a", "b", RESNET18, RESNET18)
    pair.cka[3, 3] = np.nan
    # full-mode results have no bootstrap interval: NaN everywhere
    pair.ci_low[:] = np.nan
    pair.ci_high[:] = np.nan
    fig = plot_correspondence(pair)
    ax = fig.axes[0]
    assert not ax.collections  # no band drawn from NaN bounds
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["a vs b (no CI)", "undefined (NaN)"]
    marker = ax.lines[1]
    np.testing.assert_array_equal(marker.get_xdata(), [3])
    texts = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
    assert "a vs b at layer2.1" in texts


def test_correspondence_refuses_pairs_with_different_layers():
    with pytest.raises(ValueError, match="resnet18 has 8 layers, resnet34 has 16"):
        plot_correspondence(make_pair("resnet18", "resnet34", RESNET18, RESNET34))
    renamed = [*RESNET18[:3], "layer2.1_renamed", *RESNET18[4:]]
    with pytest.raises(ValueError, match=r"layer 3 is 'layer2.1' in a but 'layer2.1_renamed' in b"):
        plot_correspondence(make_pair("a", "b", RESNET18, renamed))
    with pytest.raises(ValueError, match="cannot overlay pair c--d on a--b"):
        plot_correspondence(
            [make_pair("a", "b", RESNET18, RESNET18), make_pair("c", "d", RESNET34, RESNET34)]
        )
    with pytest.raises(ValueError, match="at least one pair"):
        plot_correspondence([])


# --------------------------------------------------------------------------- files and CLI


def test_plot_result_writes_every_figure(tmp_path):
    models = ["r18", "r18_b", "r34"]
    layers = {"r18": RESNET18, "r18_b": RESNET18, "r34": RESNET34}
    # one self pair, one same-architecture pair, one cross-architecture pair; the rest of the
    # grid is "not computed"
    pairs = [
        make_pair(a, b, layers[a], layers[b], seed=k)
        for k, (a, b) in enumerate([("r18", "r18"), ("r18", "r18_b"), ("r18", "r34")])
    ]
    written = plot_result(make_study(pairs, models), tmp_path / "figs", dpi=40)
    names = sorted(p.name for p in written)
    expected = sorted(
        [f"heatmap_{p.model_a}--{p.model_b}.png" for p in pairs]
        + ["study_grid.png", "correspondence.png"]
    )
    assert names == expected
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == expected
    for path in written:
        assert_not_blank(path)


def test_plot_result_draws_one_correspondence_figure_for_all_same_architecture_pairs(tmp_path):
    models = ["a", "b", "c"]
    layers = ["x", "y", "z"]
    pairs = [make_pair("a", "b", layers, layers), make_pair("a", "c", layers, layers)]
    written = plot_result(make_study(pairs, models), tmp_path, dpi=30)
    assert {p.name for p in written} == {
        "heatmap_a--b.png",
        "heatmap_a--c.png",
        "correspondence.png",
        "study_grid.png",
    }


def _seeded_study(**factories):
    """mlp0/mlp1 built by one factory with different seeds (kwargs), cnn0 by another."""
    layers = ["relu1", "relu2", "relu3"]
    pairs = [
        make_pair("mlp0", "mlp1", layers, layers),
        make_pair("mlp0", "cnn0", layers, layers, seed=2),
        make_pair("mlp1", "cnn0", layers, layers, seed=3),
    ]
    study = make_study(pairs, ["mlp0", "mlp1", "cnn0"])
    for k, (name, factory) in enumerate(factories.items()):
        study.provenance["models"][name]["identity"] = {
            "model": {"factory": factory, "kwargs": {"seed": k}}
        }
    return study


def test_architecture_is_the_factory_not_its_arguments():
    # an MLP and a CNN may share layer names (relu1..relu3); matching them layer by layer is
    # meaningless, but two seeds passed as a constructor argument are one architecture
    study = _seeded_study(mlp0="demo:mlp", mlp1="demo:mlp", cnn0="demo:cnn")
    groups = correspondence_groups(study)
    assert list(groups) == ["demo:mlp"]
    assert [(p.model_a, p.model_b) for p in groups["demo:mlp"]] == [("mlp0", "mlp1")]


def test_declared_architecture_overrides_the_factory():
    # three factories, but mlp0 and cnn0 are declared one architecture (e.g. two wrappers)
    study = _seeded_study(mlp0="pkg:a", mlp1="pkg:b", cnn0="pkg:c")
    assert correspondence_groups(study) == {}
    groups = correspondence_groups(study, {"mlp0": "net", "cnn0": "net"})
    assert [(p.model_a, p.model_b) for p in groups["net"]] == [("mlp0", "cnn0")]
    with pytest.raises(ValueError, match="names model.s. nope that the result does not have"):
        correspondence_groups(study, {"nope": "net"})


def test_correspondence_groups_figure_has_a_panel_per_architecture_with_bands_and_null():
    short, deep = ["l1", "l2", "l3"], [f"b{i}" for i in range(6)]
    first = make_pair("m0", "m1", short, short)
    first.null_threshold = np.full((3, 3), 0.12)
    second = make_pair("c0", "c1", deep, deep, seed=5)
    fig = plot_correspondence_groups({"mlp": [first], "cnn": [second]}, ci_level=0.95)
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(axes) == 2
    titles = [ax.get_legend().get_title().get_text() for ax in axes]
    assert titles[0].startswith("mlp:") and titles[1].startswith("cnn:")
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["m0 vs m1 (band: 95% CI)", "m0 vs m1: null threshold (p = 0.05)"]
    np.testing.assert_array_equal(axes[0].lines[1].get_ydata(), [0.12] * 3)  # the null line
    assert len(axes[0].collections) == 1 and len(axes[1].collections) == 1  # one band each
    # the legend sits above the axes, never over a curve
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        legend_box = ax.get_legend().get_window_extent(renderer)
        assert legend_box.y0 >= ax.get_window_extent(renderer).y1 - 1


def test_cli_plots_a_result_written_by_the_study_writer(tmp_path):
    # the real writer and reader of RESULT.zarr, so the CLI sees exactly what `analyze` writes
    from ckapipe.analyze.study import write_result

    models = ["r18", "r18_b"]
    pairs = [
        make_pair("r18", "r18", RESNET18, RESNET18),
        make_pair("r18", "r18_b", RESNET18, RESNET18, seed=4),
    ]
    result_path = tmp_path / "RESULT.zarr"
    write_result(make_study(pairs, models), result_path, overwrite=False)
    assert load_result(result_path).models == models
    out = tmp_path / "figs"
    run = CliRunner().invoke(plot_command, [str(result_path), "--out", str(out), "--dpi", "40"])
    assert run.exit_code == 0, run.output
    expected = {
        "heatmap_r18--r18.png",
        "heatmap_r18--r18_b.png",
        "correspondence.png",
        "study_grid.png",
    }
    assert {p.name for p in out.iterdir()} == expected
    assert {Path(line).name for line in run.output.split()} == expected
    for name in expected:
        assert_not_blank(out / name)


def test_plotting_and_the_report_do_not_import_torch(tmp_path):
    """The plot and report jobs only read a result: importing torch would cost each of them
    ~2 s of CPU on the demo's critical path. A fresh interpreter plots a real RESULT.zarr and
    imports every module the report uses, and torch stays out."""
    from ckapipe.analyze.study import write_result

    pairs = [make_pair("r18", "r18_b", RESNET18, RESNET18, seed=4)]
    result_path = tmp_path / "RESULT.zarr"
    write_result(make_study(pairs, ["r18", "r18_b"]), result_path, overwrite=False)
    script = textwrap.dedent(
        f"""
        import sys
        from ckapipe.cli import main
        try:
            main(["plot", {str(result_path)!r}, "--out", {str(tmp_path / "figs")!r},
                  "--dpi", "30"])
        except SystemExit as stop:
            assert stop.code in (0, None), stop.code
        import ckapipe.analyze.architecture_summary, ckapipe.analyze.measure_agreement
        import ckapipe.analyze.measures, ckapipe.analyze.summary, ckapipe.workflow.html_report
        print("TORCH", "torch" in sys.modules)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "TORCH False" in completed.stdout
    assert (tmp_path / "figs" / "study_grid.png").is_file()


def test_cli_refuses_a_directory_that_is_not_a_result(tmp_path):
    (tmp_path / "not_a_result").mkdir()
    run = CliRunner().invoke(
        plot_command, [str(tmp_path / "not_a_result"), "--out", str(tmp_path / "figs")]
    )
    assert run.exit_code == 1
    assert "not_a_result" in run.output and "zarr" in run.output


def test_cli_reports_a_missing_result(tmp_path):
    result = CliRunner().invoke(plot_command, [str(tmp_path / "nope.zarr"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope.zarr" in result.output
    help_text = CliRunner().invoke(plot_command, ["--help"])
    assert help_text.exit_code == 0 and "--annotate / --no-annotate" in help_text.output


# --------------------------------------------------------------------------- no global state


def test_no_pyplot_state_is_touched(tmp_path):
    """In a fresh interpreter, rendering every kind of figure never imports pyplot."""
    script = textwrap.dedent(
        f"""
        import sys
        from types import SimpleNamespace
        import numpy as np
        from ckapipe.analyze import plots

        layers = ["a.0", "a.1", "a.2"]
        cka = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.6], [0.2, 0.6, 1.0]])
        def pair(a, b):
            return SimpleNamespace(model_a=a, model_b=b, layers_a=layers, layers_b=layers,
                                   cka=cka, ci_low=cka - 0.1, ci_high=cka + 0.1, p_value=None,
                                   diagnostics=[])
        study = SimpleNamespace(models=["x", "y"], provenance={{}},
                                pairs={{("x", "x"): pair("x", "x"), ("x", "y"): pair("x", "y")}})
        plots.plot_result(study, {str(tmp_path)!r}, dpi=30)
        print("PYPLOT", "matplotlib.pyplot" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "PYPLOT False" in completed.stdout
    assert len(list(tmp_path.glob("*.png"))) == 4
    # and in this process: if anything else imported pyplot, our figures are not registered
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_cli_architecture_option_is_checked_and_explained(tmp_path):
    run = CliRunner().invoke(
        plot_command, [str(tmp_path), "--out", str(tmp_path), "--architecture", "mlp_s0"]
    )
    assert run.exit_code == 2 and "'mlp_s0' is not MODEL=NAME" in run.output
    run = CliRunner().invoke(
        plot_command,
        [str(tmp_path), "--out", str(tmp_path), "--architecture", "m=a", "--architecture", "m=b"],
    )
    assert run.exit_code == 2 and "model 'm' is given two architectures" in run.output
    help_text = CliRunner().invoke(plot_command, ["--help"]).output
    assert "--architecture MODEL=NAME" in help_text
    assert "constructor arguments" in " ".join(help_text.split())
