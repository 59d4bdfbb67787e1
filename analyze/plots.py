"""Figures of CKA results: layer × layer heatmaps, a study grid and layer-correspondence curves.

Every function builds a :class:`matplotlib.figure.Figure` with an Agg canvas attached and returns
it; :mod:`matplotlib.pyplot` is never imported, so no global figure registry, backend switch or
interactive state is touched and the functions are safe in headless jobs, threads and notebooks.

Conventions shared by the figures:

- A heatmap's rows are the layers of ``model_a`` (y axis, first layer at the top) and its
  columns the layers of ``model_b`` (x axis), exactly like the ``(layer_a, layer_b)`` arrays of
  a :class:`~ckapipe.analyze.study.PairResult`.
- Undefined entries (NaN: a degenerate layer whose self-HSIC is zero or negative) are drawn as
  hatched grey cells and the pair's ``diagnostics`` are printed in a footnote; they are never
  given a colour of the scale.
- Values outside ``[vmin, vmax]`` (the unbiased estimator can go slightly below 0) are not
  hidden: the colour bar gets an extension arrow and annotations print the value itself.
- Long layer names: a dotted prefix shared by all layers of a model is moved into the axis label
  (lossless), and names still longer than ``max_label_chars`` are shortened in the middle with
  "…", keeping the start and the (more specific) end.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ckapipe.utils import same_architecture  # re-exported: which pairs get correspondence curves

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

    from ckapipe.analyze.study import PairResult, StudyResult

__all__ = [
    "MIRROR_CELL_COLOR",
    "NAN_CELL_COLOR",
    "correspondence_groups",
    "plot_correspondence",
    "plot_correspondence_groups",
    "plot_heatmap",
    "plot_measure_grid",
    "plot_result",
    "plot_study_grid",
    "same_architecture",
    "save_figure",
]

#: face colour of undefined (NaN) cells; hatched with :data:`NAN_HATCH_COLOR`
NAN_CELL_COLOR = "#b8b8b8"
NAN_HATCH_COLOR = "#6e6e6e"
#: face colour of the blank (redundant) half of a self-comparison: light grey, hatched the other
#: way, so that it reads as "not a value" next to the pale end of the colour scale (CKA 1)
MIRROR_CELL_COLOR = "#ececec"
MIRROR_HATCH_COLOR = "#c2c2c2"
# auto annotation only while the numbers still fit in their cells
_AUTO_ANNOTATE_MAX_LAYERS = 12
_TICK_FONTSIZE = 8.0
_GRID_TICK_FONTSIZE = 6.5
# smallest font of the study grid's cell numbers (points); below it "auto" leaves them out
_GRID_MIN_CELL_FONTSIZE = 5.0
_FOOTNOTE_FONTSIZE = 7.0
_MAX_FOOTNOTE_LINES = 8

AnnotateOption = bool | Literal["auto"]


# --------------------------------------------------------------------------- helpers


def _new_figure(figsize: tuple[float, float], *, constrained: bool = True) -> Figure:
    """A figure with its own Agg canvas, outside pyplot's registry."""
    fig = Figure(figsize=figsize, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _as_matrix(value: Any, name: str, pair: PairResult) -> np.ndarray:
    shape = (len(pair.layers_a), len(pair.layers_b))
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != shape:
        raise ValueError(
            f"pair {pair.model_a}--{pair.model_b}: {name} has shape {matrix.shape} but the pair "
            f"has {shape[0]} layers_a and {shape[1]} layers_b; expected {shape}. "
            "Rebuild the PairResult from one consistent result file."
        )
    return matrix


def _pair_label(pair: PairResult) -> str:
    return f"{pair.model_a}--{pair.model_b}"


def _is_self(pair: PairResult) -> bool:
    return pair.model_a == pair.model_b


def _common_prefix(names: Sequence[str]) -> str:
    """Longest dotted prefix shared by all names that leaves every name non-empty.

    E.g. ``["encoder.layer.0.out", "encoder.layer.1.out"]`` → ``"encoder.layer."``.
    """
    if len(names) < 2:
        return ""
    split = [name.split(".") for name in names]
    prefix: list[str] = []
    for parts in zip(*split, strict=False):
        if all(part == parts[0] for part in parts):
            prefix.append(parts[0])
        else:
            break
    # keep at least one component of every name
    shortest = min(len(parts) for parts in split)
    prefix = prefix[: shortest - 1]
    return ".".join(prefix) + "." if prefix else ""


def _ellipsize(name: str, max_chars: int) -> str:
    """Shorten ``name`` to at most ``max_chars`` by replacing its middle with "…"."""
    if len(name) <= max_chars:
        return name
    keep = max_chars - 1
    # the end of a module path (block index, sublayer) tells layers apart: keep more of it
    head = keep // 3
    tail = keep - head
    return name[:head] + "…" + name[len(name) - tail :]


def _tick_labels(names: Sequence[str], max_chars: int) -> tuple[list[str], str]:
    """Display labels for ``names`` and the common prefix that was stripped from them."""
    prefix = _common_prefix(names)
    labels = [_ellipsize(name[len(prefix) :], max_chars) for name in names]
    return labels, prefix


def _tick_step(n_labels: int, axis_inches: float, fontsize: float) -> int:
    """Show every k-th label so that neighbouring labels do not overlap."""
    line_inches = fontsize * 1.35 / 72.0
    fits = max(1, int(axis_inches / line_inches))
    return max(1, math.ceil(n_labels / fits))


def _axis_title(model: str, prefix: str) -> str:
    return f"layer of {model}" + (f'  (after "{prefix}")' if prefix else "")


def _set_layer_ticks(
    ax: Axes,
    *,
    layers_x: Sequence[str] | None,
    layers_y: Sequence[str] | None,
    max_chars: int,
    fontsize: float,
    axis_inches: tuple[float, float],
) -> tuple[str, str]:
    """Put (thinned, shortened) layer names on the axes; returns the stripped prefixes (x, y)."""
    prefix_x = prefix_y = ""
    if layers_x is not None:
        labels, prefix_x = _tick_labels(layers_x, max_chars)
        step = _tick_step(len(labels), axis_inches[0], fontsize)
        positions = np.arange(0, len(labels), step)
        ax.set_xticks(positions, [labels[i] for i in positions], fontsize=fontsize)
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    if layers_y is not None:
        labels, prefix_y = _tick_labels(layers_y, max_chars)
        step = _tick_step(len(labels), axis_inches[1], fontsize)
        positions = np.arange(0, len(labels), step)
        ax.set_yticks(positions, [labels[i] for i in positions], fontsize=fontsize)
    return prefix_x, prefix_y


def _resolve_cmap(cmap: str | Colormap) -> Colormap:
    base = colormaps[cmap] if isinstance(cmap, str) else cmap
    # masked cells (the hidden half of a self-comparison, and NaN cells, which get their own
    # hatched patch on top) must show the axes background, not a colour of the scale
    return base.with_extremes(bad=(0.0, 0.0, 0.0, 0.0))


def _extend(
    values: np.ndarray, vmin: float, vmax: float
) -> Literal["neither", "both", "min", "max"]:
    finite = values[np.isfinite(values)]
    below = finite.size > 0 and bool(finite.min() < vmin)
    above = finite.size > 0 and bool(finite.max() > vmax)
    if below and above:
        return "both"
    if below:
        return "min"
    if above:
        return "max"
    return "neither"


def _self_mask(n_layers: int) -> np.ndarray:
    """True above the diagonal: the redundant half of a symmetric self-comparison."""
    return np.triu(np.ones((n_layers, n_layers), dtype=bool), k=1)


def _draw_matrix(
    ax: Axes,
    pair: PairResult,
    *,
    transpose: bool,
    annotate: bool,
    vmin: float,
    vmax: float,
    cmap: Colormap,
    fontsize: float | None = None,
) -> tuple[AxesImage, np.ndarray]:
    """Draw one pair's CKA matrix into ``ax``; returns the image and the matrix as drawn.

    Annotated cells show the CKA and, where the pair has an interval, "±" its half-width.

    ``transpose=True`` draws pair (b, a) from the stored pair (a, b) (study grid lower half).
    """
    matrix = _as_matrix(pair.cka, "cka", pair)
    if transpose:
        matrix = matrix.T
    hidden = _self_mask(matrix.shape[0]) if _is_self(pair) else np.zeros(matrix.shape, dtype=bool)
    undefined = ~np.isfinite(matrix) & ~hidden
    shown = np.ma.masked_array(matrix, mask=hidden | undefined)
    image = ax.imshow(
        shown,
        cmap=cmap,
        norm=Normalize(vmin=vmin, vmax=vmax),
        aspect="auto",
        interpolation="nearest",
        origin="upper",
    )
    _hatch_cells(ax, undefined, NAN_CELL_COLOR, NAN_HATCH_COLOR, "////")
    _hatch_cells(ax, hidden, MIRROR_CELL_COLOR, MIRROR_HATCH_COLOR, "\\\\")
    if annotate:
        half = _half_widths(pair)
        _annotate_cells(
            ax, matrix, half.T if transpose else half, hidden | undefined, image, fontsize
        )
    ax.set_xlim(-0.5, matrix.shape[1] - 0.5)
    ax.set_ylim(matrix.shape[0] - 0.5, -0.5)
    return image, matrix


def _hatch_cells(ax: Axes, cells: np.ndarray, face: str, edge: str, hatch: str) -> None:
    """Cover the True cells of a (rows, cols) mask with hatched patches."""
    if not cells.any():
        return
    rows, cols = np.nonzero(cells)
    patches = [Rectangle((c - 0.5, r - 0.5), 1.0, 1.0) for r, c in zip(rows, cols, strict=True)]
    ax.add_collection(
        PatchCollection(patches, facecolor=face, edgecolor=edge, hatch=hatch, linewidth=0.0)
    )


def _half_widths(pair: PairResult) -> np.ndarray:
    """Half the width of each layer pair's confidence interval (NaN where none)."""
    low = _as_matrix(pair.ci_low, "ci_low", pair)
    high = _as_matrix(pair.ci_high, "ci_high", pair)
    return (high - low) / 2.0


def _annotate_cells(
    ax: Axes,
    matrix: np.ndarray,
    half: np.ndarray,
    skip: np.ndarray,
    image: AxesImage,
    fontsize: float | None = None,
) -> None:
    n_rows, n_cols = matrix.shape
    if fontsize is None:
        fontsize = float(np.clip(10.0 - 0.2 * max(n_rows, n_cols), 6.0, 8.5))
    for r in range(n_rows):
        for c in range(n_cols):
            if skip[r, c]:
                continue
            value = float(matrix[r, c])
            text = f"{value:.2f}"
            if np.isfinite(half[r, c]):
                text += f"\n±{half[r, c]:.2f}"
            red, green, blue, _ = image.cmap(image.norm(value))
            # relative luminance (ITU-R BT.709): dark text on light cells and vice versa
            light = 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.5
            ax.text(
                c,
                r,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                linespacing=1.0,
                color="black" if light else "white",
            )


def _footnote(
    diagnostics: Iterable[str], undefined_layers: Sequence[str], width_inches: float
) -> str:
    """Footnote text: why cells are undefined (the pair's diagnostics), wrapped to the figure."""
    lines: list[str] = []
    if undefined_layers:
        lines.append(
            "Hatched grey cells are undefined (NaN): degenerate layer(s) "
            + ", ".join(undefined_layers)
            + "."
        )
    lines.extend(diagnostics)
    if not lines:
        return ""
    width_chars = max(40, int(width_inches * 72.0 / (_FOOTNOTE_FONTSIZE * 0.55)))
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(textwrap.wrap(line, width=width_chars, subsequent_indent="  ") or [""])
    if len(wrapped) > _MAX_FOOTNOTE_LINES:
        left = len(wrapped) - (_MAX_FOOTNOTE_LINES - 1)
        wrapped = wrapped[: _MAX_FOOTNOTE_LINES - 1] + [
            f"… {left} more line(s): see the result's diagnostics"
        ]
    return "\n".join(wrapped)


def _undefined_layers(pair: PairResult) -> list[str]:
    """Layers whose whole row / column is NaN (degenerate self-HSIC), named with their model."""
    matrix = _as_matrix(pair.cka, "cka", pair)
    bad = ~np.isfinite(matrix)
    names = [
        f"{pair.model_a}:{name}" for name, row in zip(pair.layers_a, bad, strict=True) if row.all()
    ]
    if not _is_self(pair):
        names += [
            f"{pair.model_b}:{name}"
            for name, col in zip(pair.layers_b, bad.T, strict=True)
            if col.all()
        ]
    if bad.any() and not names:
        names = [f"{int(bad.sum())} isolated cell(s) of {_pair_label(pair)}"]
    return names


def _resolve_annotate(annotate: AnnotateOption, n_rows: int, n_cols: int) -> bool:
    if annotate == "auto":
        return max(n_rows, n_cols) <= _AUTO_ANNOTATE_MAX_LAYERS
    if isinstance(annotate, bool):
        return annotate
    raise ValueError(f"annotate must be True, False or 'auto', got {annotate!r}")


def _blank_handles(*, undefined: bool, mirror: bool) -> list[Patch]:
    """Legend entries of the two kinds of cell that are not a value."""
    handles = []
    if undefined:
        handles.append(
            Patch(
                facecolor=NAN_CELL_COLOR,
                edgecolor=NAN_HATCH_COLOR,
                hatch="////",
                label="undefined (NaN)",
            )
        )
    if mirror:
        handles.append(
            Patch(
                facecolor=MIRROR_CELL_COLOR,
                edgecolor=MIRROR_HATCH_COLOR,
                hatch="\\\\",
                label="mirror of the lower half (not repeated)",
            )
        )
    return handles


def _nan_legend(ax: Axes, *, undefined: bool = True, mirror: bool = False) -> None:
    handles = _blank_handles(undefined=undefined, mirror=mirror)
    if not handles:
        return
    ax.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        fontsize=7,
        frameon=False,
        borderaxespad=0.2,
        ncols=len(handles),
    )


# --------------------------------------------------------------------------- heatmap


def plot_heatmap(
    pair: PairResult,
    *,
    annotate: AnnotateOption = "auto",
    ax: Axes | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str | Colormap = "magma",
    max_label_chars: int = 32,
    title: str | None = None,
) -> Figure:
    """Layer × layer CKA heatmap of one model pair.

    Parameters
    ----------
    pair
        A :class:`~ckapipe.analyze.study.PairResult`; ``pair.cka`` is (La, Lb) with rows the
        layers of ``model_a`` (y axis) and columns the layers of ``model_b`` (x axis).
    annotate
        Print each value in its cell. ``"auto"``: only when both models have at most 12 layers.
    ax
        Draw into this axes (of a figure you own) instead of a new figure. The colour bar is
        still added next to it; the diagnostics footnote is only added to a new figure.
    vmin, vmax
        Colour scale limits. Values outside get the end colours and an arrow on the colour bar.
    cmap
        Matplotlib colormap (name or object).
    max_label_chars
        Layer names longer than this (after stripping the prefix all layers share) are shortened
        in the middle.
    title
        Overrides the default title (the model names).

    Returns
    -------
    Figure
        The figure holding the heatmap (``ax.figure`` when ``ax`` was given). For a
        self-comparison (``model_a == model_b``) the redundant upper half (column > row) is
        left blank. NaN cells are hatched grey and listed in a footnote.
    """
    n_rows, n_cols = len(pair.layers_a), len(pair.layers_b)
    matrix = _as_matrix(pair.cka, "cka", pair)
    do_annotate = _resolve_annotate(annotate, n_rows, n_cols)
    colormap = _resolve_cmap(cmap)

    labels_x, _ = _tick_labels(pair.layers_b, max_label_chars)
    labels_y, _ = _tick_labels(pair.layers_a, max_label_chars)
    char_inches = 0.6 * _TICK_FONTSIZE / 72.0
    cell = 0.42 if do_annotate else 0.26
    axes_w = float(np.clip(n_cols * cell, 3.0, 22.0))
    axes_h = float(np.clip(n_rows * cell, 3.0, 22.0))

    undefined = _undefined_layers(pair)
    own_figure = ax is None
    if ax is None:
        x_label_depth = max(map(len, labels_x)) * char_inches * 0.75
        y_label_width = max(map(len, labels_y)) * char_inches
        fig_w = axes_w + y_label_width + 2.2
        footnote_w = max(fig_w, 5.0)
        note = _footnote(pair.diagnostics, undefined, footnote_w - 0.3)
        note_h = (note.count("\n") + 1) * _FOOTNOTE_FONTSIZE * 1.4 / 72.0 if note else 0.0
        fig_h = axes_h + x_label_depth + 1.5 + note_h
        fig = _new_figure((max(fig_w, 5.0), max(fig_h, 4.0)))
        ax = fig.add_subplot()
    else:
        fig = ax.figure  # type: ignore[assignment]
        bbox = ax.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
        axes_w, axes_h = bbox.width, bbox.height
        note = ""

    image, _ = _draw_matrix(
        ax,
        pair,
        transpose=False,
        annotate=do_annotate,
        vmin=vmin,
        vmax=vmax,
        cmap=colormap,
    )
    prefix_x, prefix_y = _set_layer_ticks(
        ax,
        layers_x=pair.layers_b,
        layers_y=pair.layers_a,
        max_chars=max_label_chars,
        fontsize=_TICK_FONTSIZE,
        axis_inches=(axes_w, axes_h),
    )
    ax.set_xlabel(_axis_title(pair.model_b, prefix_x), fontsize=9)
    ax.set_ylabel(_axis_title(pair.model_a, prefix_y), fontsize=9)
    if title is None:
        title = (
            f"CKA: {pair.model_a} (self-comparison)"
            if _is_self(pair)
            else f"CKA: {pair.model_a} vs {pair.model_b}"
        )
    legend = bool(undefined) or _is_self(pair)
    ax.set_title(title, fontsize=11, pad=14 if legend else 6)
    colorbar = fig.colorbar(image, ax=ax, extend=_extend(matrix, vmin, vmax), shrink=0.85)
    colorbar.set_label("CKA", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    if legend:
        _nan_legend(ax, undefined=bool(undefined), mirror=_is_self(pair))
    if own_figure and note:
        fig.supxlabel(note, x=0.01, ha="left", fontsize=_FOOTNOTE_FONTSIZE, color="#333333")
    return fig


# --------------------------------------------------------------------------- study grid


def _model_layers(result: StudyResult) -> dict[str, list[str]]:
    """Layer names of every model, taken from any pair it appears in."""
    layers: dict[str, list[str]] = {}
    for pair in result.pairs.values():
        layers.setdefault(pair.model_a, list(pair.layers_a))
        layers.setdefault(pair.model_b, list(pair.layers_b))
    for model in result.models:
        if model not in layers:
            info = result.provenance.get("models", {}).get(model, {})
            layers[model] = list(info.get("layers", []))
    return layers


def _find_pair(result: StudyResult, model_a: str, model_b: str) -> tuple[PairResult | None, bool]:
    """The pair (a, b) as stored, or the stored (b, a) with ``transpose=True``; else None."""
    if (model_a, model_b) in result.pairs:
        return result.pairs[(model_a, model_b)], False
    if (model_b, model_a) in result.pairs:
        return result.pairs[(model_b, model_a)], True
    return None, False


def plot_study_grid(
    result: StudyResult,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str | Colormap = "magma",
    max_label_chars: int = 22,
    annotate: AnnotateOption = "auto",
) -> Figure:
    """All model pairs of a study as one grid of layer × layer heatmaps.

    Parameters
    ----------
    result
        A :class:`~ckapipe.analyze.study.StudyResult` with M models.
    annotate
        Print each CKA (and "±" its interval's half-width, where reported) in its cell.
        ``"auto"``: when the numbers fit in the cells at a legible size (up to about 5 layers
        per model).
    vmin, vmax, cmap
        One colour scale for every panel (one shared colour bar).
    max_label_chars
        Longer layer names are shortened in the middle.

    Returns
    -------
    Figure
        An M × M grid: row i shows ``result.models[i]`` on the y axis, column j shows
        ``result.models[j]`` on the x axis. The full grid is drawn so that every row and every
        column has one layer axis, labelled once on the outer edge; a pair stored only as (b, a)
        is drawn transposed in the (a, b) panel. Self-comparisons on the diagonal show their
        lower half; the upper half is hatched light grey (a mirror, not a value). Pairs not in the result are marked "not computed". NaN cells are hatched
        grey and listed in a footnote.
    """
    models = list(result.models)
    if not models:
        raise ValueError("the study result has no models; nothing to plot")
    layers = _model_layers(result)
    n_models = len(models)
    max_layers = max((len(v) for v in layers.values()), default=1)
    panel = float(np.clip(0.13 * max_layers, 1.6, 3.0))
    char_inches = 0.6 * _GRID_TICK_FONTSIZE / 72.0
    label_extent = max_label_chars * char_inches
    colormap = _resolve_cmap(cmap)
    # two short lines ("0.93", "±0.02") must fit a cell: about 3 font sizes wide
    cell_fontsize = min(8.0, panel * 72.0 / max_layers / 3.4)
    if annotate == "auto":
        do_annotate = cell_fontsize >= _GRID_MIN_CELL_FONTSIZE
    else:
        do_annotate = _resolve_annotate(annotate, max_layers, max_layers)

    undefined: list[str] = []
    diagnostics: list[str] = []
    for pair in result.pairs.values():
        undefined.extend(_undefined_layers(pair))
        diagnostics.extend(f"{_pair_label(pair)}: {d}" for d in pair.diagnostics)
    undefined = list(dict.fromkeys(undefined))
    fig_w = n_models * panel + label_extent + 2.4
    note = _footnote(diagnostics, undefined, fig_w - 0.3)
    note_h = (note.count("\n") + 1) * _FOOTNOTE_FONTSIZE * 1.4 / 72.0 if note else 0.0
    fig_h = n_models * panel + label_extent * 0.75 + 1.6 + note_h
    fig = _new_figure((fig_w, fig_h))
    axes = fig.subplots(n_models, n_models, squeeze=False)

    image: AxesImage | None = None
    all_values: list[np.ndarray] = []
    has_self = False
    for i, model_a in enumerate(models):
        for j, model_b in enumerate(models):
            ax = axes[i, j]
            pair, transpose = _find_pair(result, model_a, model_b)
            if pair is None:
                ax.set_facecolor("#f2f2f2")
                ax.text(
                    0.5,
                    0.5,
                    "not computed",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="#777777",
                    transform=ax.transAxes,
                )
                ax.set_xlim(-0.5, max(len(layers[model_b]), 1) - 0.5)
                ax.set_ylim(max(len(layers[model_a]), 1) - 0.5, -0.5)
            else:
                image, drawn = _draw_matrix(
                    ax,
                    pair,
                    transpose=transpose,
                    annotate=do_annotate,
                    vmin=vmin,
                    vmax=vmax,
                    cmap=colormap,
                    fontsize=cell_fontsize,
                )
                all_values.append(drawn.ravel())
                has_self = has_self or _is_self(pair)
            # layer names once per row (left column) and once per column (bottom row)
            _set_layer_ticks(
                ax,
                layers_x=layers[model_b] if i == n_models - 1 else None,
                layers_y=layers[model_a] if j == 0 else None,
                max_chars=max_label_chars,
                fontsize=_GRID_TICK_FONTSIZE,
                axis_inches=(panel, panel),
            )
            if i != n_models - 1:
                ax.set_xticks([])
            if j != 0:
                ax.set_yticks([])
            if i == 0:
                ax.set_title(model_b, fontsize=9, fontweight="bold")
            if j == 0:
                ax.set_ylabel(model_a, fontsize=9, fontweight="bold")
    fig.suptitle(
        "CKA of every model pair (rows: model a, y axis; columns: model b, x axis)", fontsize=11
    )
    if image is not None:
        values = np.concatenate(all_values)
        colorbar = fig.colorbar(
            image, ax=axes, extend=_extend(values, vmin, vmax), shrink=0.6, aspect=30
        )
        colorbar.set_label("CKA", fontsize=9)
        colorbar.ax.tick_params(labelsize=8)
    handles = _blank_handles(undefined=bool(undefined), mirror=has_self)
    if handles:
        fig.legend(handles=handles, loc="outside lower right", fontsize=7, frameon=False, ncols=2)
    if note:
        fig.supxlabel(note, x=0.01, ha="left", fontsize=_FOOTNOTE_FONTSIZE, color="#333333")
    return fig


# --------------------------------------------------------------------------- correspondence


def _check_same_architecture(pair: PairResult) -> None:
    layers_a, layers_b = list(pair.layers_a), list(pair.layers_b)
    if layers_a == layers_b:
        return
    if len(layers_a) != len(layers_b):
        detail = f"{pair.model_a} has {len(layers_a)} layers, {pair.model_b} has {len(layers_b)}"
    else:
        k = next(i for i, (a, b) in enumerate(zip(layers_a, layers_b, strict=True)) if a != b)
        detail = (
            f"layer {k} is {layers_a[k]!r} in {pair.model_a} but {layers_b[k]!r} in {pair.model_b}"
        )
    raise ValueError(
        f"pair {_pair_label(pair)}: a layer-correspondence curve needs the same layer list in "
        f"both models (matched layers = same name at the same position), but {detail}. "
        "Use plot_heatmap for models of different architectures."
    )


def plot_correspondence(
    pair_or_pairs: PairResult | Sequence[PairResult],
    *,
    labels: Sequence[str] | None = None,
    ci_level: float | None = None,
    ax: Axes | None = None,
    max_label_chars: int = 32,
    title: str | None = None,
) -> Figure:
    """CKA of matched layers (layer i of a vs layer i of b) with its confidence band.

    Parameters
    ----------
    pair_or_pairs
        One :class:`~ckapipe.analyze.study.PairResult` or several to overlay. Every pair must
        compare two models with the same layer list (``layers_a == layers_b``), and overlaid
        pairs must all share that list.
    labels
        Legend label per pair; default ``"a vs b"``.
    ci_level
        Confidence level of ``ci_low``/``ci_high`` for the legend (e.g. 0.95), if known.
    ax
        Draw into this axes instead of a new figure.
    max_label_chars
        Longer layer names are shortened in the middle.
    title
        Overrides the default title.

    Returns
    -------
    Figure
        x: layer (in order), y: ``cka[i, i]`` with the band ``ci_low[i, i]``…``ci_high[i, i]``.
        NaN entries leave a gap in the curve.

    Raises
    ------
    ValueError
        A pair whose two layer lists differ, overlaid pairs with different layer lists, no pairs,
        or a ``labels`` list of the wrong length.
    """
    pairs = [pair_or_pairs] if hasattr(pair_or_pairs, "cka") else list(pair_or_pairs)  # type: ignore[arg-type]
    if not pairs:
        raise ValueError("plot_correspondence needs at least one pair")
    for pair in pairs:
        _check_same_architecture(pair)
    reference = list(pairs[0].layers_a)
    for pair in pairs[1:]:
        if list(pair.layers_a) != reference:
            raise ValueError(
                f"cannot overlay pair {_pair_label(pair)} on {_pair_label(pairs[0])}: their layer "
                f"lists differ ({len(pair.layers_a)} vs {len(reference)} layers, or other names). "
                "Plot each architecture separately."
            )
    if labels is None:
        labels = [f"{p.model_a} vs {p.model_b}" for p in pairs]
    elif len(labels) != len(pairs):
        raise ValueError(f"labels has {len(labels)} entries but there are {len(pairs)} pairs")

    n_layers = len(reference)
    axis_w = float(np.clip(0.32 * n_layers, 4.5, 20.0))
    own_figure = ax is None
    if ax is None:
        tick_labels, _ = _tick_labels(reference, max_label_chars)
        depth = max(map(len, tick_labels)) * 0.6 * _TICK_FONTSIZE / 72.0 * 0.75
        fig = _new_figure((axis_w + 1.5, 3.8 + depth))
        ax = fig.add_subplot()
    else:
        fig = ax.figure  # type: ignore[assignment]

    x = np.arange(n_layers)
    band_label = f"band: {ci_level:.0%} CI" if ci_level is not None else "band: CI"
    colors = colormaps["tab10"]
    lowest, highest = 0.0, 1.0
    handles: list[Any] = []
    undefined: list[tuple[int, Any, str]] = []
    for k, (pair, label) in enumerate(zip(pairs, labels, strict=True)):
        color = colors(k % 10)
        matched = np.diagonal(_as_matrix(pair.cka, "cka", pair))
        low = np.diagonal(_as_matrix(pair.ci_low, "ci_low", pair))
        high = np.diagonal(_as_matrix(pair.ci_high, "ci_high", pair))
        (line,) = ax.plot(x, matched, marker="o", markersize=3.5, color=color, linewidth=1.5)
        if np.isfinite(low).any() and np.isfinite(high).any():
            band = ax.fill_between(x, low, high, color=color, alpha=0.25, linewidth=0)
            # one legend entry per pair: the line drawn over its band
            handles.append(((band, line), f"{label} ({band_label})"))
            lowest = min(lowest, float(np.nanmin(low)))
            highest = max(highest, float(np.nanmax(high)))
        else:
            handles.append((line, f"{label} (no CI)"))
        if np.isfinite(matched).any():
            lowest = min(lowest, float(np.nanmin(matched)))
            highest = max(highest, float(np.nanmax(matched)))
        undefined.extend((i, color, label) for i in np.flatnonzero(~np.isfinite(matched)))
        null_threshold = getattr(pair, "null_threshold", None)  # absent: no permutations
        if null_threshold is not None:
            null = np.diagonal(_as_matrix(null_threshold, "null_threshold", pair))
            if np.isfinite(null).any():
                (null_line,) = ax.plot(
                    x, null, color=color, linewidth=1.0, linestyle="--", drawstyle="steps-mid"
                )
                handles.append((null_line, f"{label}: null threshold (p = 0.05)"))
                highest = max(highest, float(np.nanmax(null)))
    margin = 0.05 * (highest - lowest)
    ax.set_ylim(lowest - margin, highest + margin)
    if undefined:
        # a NaN only leaves a gap in the line; mark it on the x axis so it is not overlooked
        (marker,) = ax.plot(
            [i for i, _, _ in undefined],
            [lowest - margin] * len(undefined),
            linestyle="none",
            marker="X",
            markersize=8,
            color=NAN_HATCH_COLOR,
            clip_on=False,
            zorder=5,
        )
        handles.append((marker, "undefined (NaN)"))
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle=":")
    ax.axhline(0.0, color="#999999", linewidth=0.8, linestyle=":")
    bbox = ax.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
    prefix_x, _ = _set_layer_ticks(
        ax,
        layers_x=reference,
        layers_y=None,
        max_chars=max_label_chars,
        fontsize=_TICK_FONTSIZE,
        axis_inches=(max(bbox.width, axis_w * 0.8), bbox.height),
    )
    ax.set_xlabel("matched layer" + (f'  (after "{prefix_x}")' if prefix_x else ""), fontsize=9)
    ax.set_ylabel("CKA of layer i of a vs layer i of b", fontsize=9)
    ax.grid(axis="y", color="#e0e0e0", linewidth=0.6)
    # above the axes, never over a curve; the title heads the legend
    ax.legend(
        [h for h, _ in handles],
        [t for _, t in handles],
        fontsize=8,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.01),
        borderaxespad=0.0,
        frameon=False,
        # wrapped to the figure: a long architecture name must not squeeze the axes away
        title=textwrap.fill(
            title or "Layer correspondence (matched layers)",
            width=max(28, int(fig.get_figwidth() * 72.0 / (10 * 0.62))),
        ),
        title_fontproperties={"size": 10, "weight": "bold"},
        alignment="left",
    )
    if undefined and own_figure:
        note = "Undefined (NaN) matched CKA: " + "; ".join(
            f"{label} at {reference[i]}" for i, _, label in undefined
        )
        note = _footnote([note], [], fig.get_figwidth() - 0.3)
        fig.supxlabel(note, x=0.01, ha="left", fontsize=_FOOTNOTE_FONTSIZE, color="#333333")
    return fig


# --------------------------------------------------------------------------- files


def save_figure(fig: Figure, path: str | Path, *, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, e.g. ``.png``) and return the path.

    The parent directory is created. ``dpi=None`` uses the figure's own dpi.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi="figure" if dpi is None else dpi, facecolor="white")
    return path


def _file_part(name: str) -> str:
    """A model name made safe for a file name (path separators and odd characters → "_")."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def plot_correspondence_groups(
    groups: dict[str, Sequence[PairResult]],
    *,
    ci_level: float | None = None,
    max_label_chars: int = 32,
) -> Figure:
    """One figure of layer-correspondence curves: a panel per architecture, stacked, each
    overlaying all its pairs of two different models with their confidence bands (and null
    thresholds, where computed). See :func:`plot_correspondence` for one panel.

    Parameters
    ----------
    groups
        Architecture name → its pairs (every pair of one group must share one layer list).
    ci_level
        Confidence level of the intervals, for the legends.
    """
    if not groups:
        raise ValueError("plot_correspondence_groups needs at least one architecture")
    panels = list(groups.items())
    widest = max(len(pairs[0].layers_a) for _, pairs in panels)
    longest = max(len(label) for _, pairs in panels for label in pairs[0].layers_a)
    depth = min(longest, max_label_chars) * 0.6 * _TICK_FONTSIZE / 72.0 * 0.75
    height = sum(2.8 + depth + 0.2 * len(pairs) for _, pairs in panels)
    fig = _new_figure((float(np.clip(0.32 * widest, 3.5, 20.0)) + 1.5, height))
    axes = fig.subplots(
        len(panels), 1, squeeze=False, height_ratios=[2.8 + 0.2 * len(p) for _, p in panels]
    )[:, 0]
    for ax, (name, pairs) in zip(axes, panels, strict=True):
        plot_correspondence(
            pairs,
            ci_level=ci_level,
            ax=ax,
            max_label_chars=max_label_chars,
            title=f"{name}: layer i of one model vs layer i of another",
        )
    return fig


def correspondence_groups(
    result: StudyResult, architectures: Mapping[str, str] | None = None
) -> dict[str, list[PairResult]]:
    """The pairs that get layer-correspondence curves, by architecture: two different models
    of one architecture (``architectures[name]`` where given, else the factory the result
    records: :data:`ckapipe.utils.ARCHITECTURE_RULE`) with the same layer list.

    Raises ``ValueError`` when ``architectures`` names a model the result does not have.
    """
    from ckapipe.analyze.architecture_summary import architectures_from_provenance

    unknown = sorted(set(architectures or {}) - set(result.models))
    if unknown:
        raise ValueError(
            f"--architecture names model(s) {', '.join(unknown)} that the result does not have; "
            f"its models are {', '.join(result.models)}"
        )
    arch = architectures_from_provenance(result, architectures)
    by_layers: dict[tuple[str, tuple[str, ...]], list[PairResult]] = {}
    for pair in result.pairs.values():
        architecture_a, architecture_b = arch.get(pair.model_a), arch.get(pair.model_b)
        matched = same_architecture(architecture_a, architecture_b, pair.layers_a, pair.layers_b)
        if not _is_self(pair) and matched:
            name = architecture_a or "architecture not recorded"
            by_layers.setdefault((name, tuple(pair.layers_a)), []).append(pair)
    # one architecture listed with two layer selections gets a panel per selection
    names = [name for name, _ in by_layers]
    return {
        (name if names.count(name) == 1 else f"{name} [{', '.join(layers)}]"): pairs
        for (name, layers), pairs in by_layers.items()
    }


def plot_result(
    result: str | Path | StudyResult,
    out_dir: str | Path,
    *,
    annotate: AnnotateOption = "auto",
    dpi: float = 150,
    architectures: dict[str, str] | None = None,
) -> list[Path]:
    """Write every figure of a study result as PNG files into ``out_dir``.

    Parameters
    ----------
    result
        Path of a ``RESULT.zarr`` (read with :func:`ckapipe.analyze.study.load_result`) or a
        loaded :class:`~ckapipe.analyze.study.StudyResult`.
    out_dir
        Output directory (created).
    annotate
        Per-cell numbers in the heatmaps and the study grid (see :func:`plot_heatmap`).
    dpi
        Resolution of the PNG files.
    architectures
        Model name → declared architecture. Models not named are of their factory's
        architecture, as the result records it (:data:`ckapipe.utils.ARCHITECTURE_RULE`).

    Returns
    -------
    list[Path]
        The files written: ``heatmap_<a>--<b>.png`` per pair, ``study_grid.png``, and
        ``correspondence.png`` when some pair compares two different models of one architecture
        with the same layer list: one panel per architecture with all such pairs overlaid.
    """
    if isinstance(result, str | Path):
        from ckapipe.analyze.result import load_result

        result = load_result(result)
    out = Path(out_dir)
    ci_level = result.provenance.get("ci_level")
    written: list[Path] = []
    groups = correspondence_groups(result, architectures)
    for pair in result.pairs.values():
        stem = f"{_file_part(pair.model_a)}--{_file_part(pair.model_b)}"
        fig = plot_heatmap(pair, annotate=annotate)
        written.append(save_figure(fig, out / f"heatmap_{stem}.png", dpi=dpi))
    grid = plot_study_grid(result, annotate=annotate)
    written.append(save_figure(grid, out / "study_grid.png", dpi=dpi))
    if groups:
        fig = plot_correspondence_groups(groups, ci_level=ci_level)
        written.append(save_figure(fig, out / "correspondence.png", dpi=dpi))
    return written


def plot_measure_grid(
    result: StudyResult,
    *,
    measures: Sequence[str] | None = None,
    cmap: str | Colormap = "magma",
) -> Figure:
    """Every similarity measure of every model pair side by side: one row per measure, one
    column per pair, each panel the (La, Lb) matrix of that measure (layer a down, layer b
    across). Each row has its own colour scale (measures differ in range: Pillai's trace goes
    up to the rank), shown by the row's colour bar; NaN cells are grey.

    Parameters
    ----------
    result : a study result holding measures (``ckapipe analyze --measure``).
    measures : which of them, in this order (default: all, in the result's order).
    cmap : colour map of every panel.
    """
    names = list(measures or result.provenance.get("measures") or [])
    pairs = [pair for pair in result.pairs.values() if pair.measures]
    if not names or not pairs:
        raise ValueError(
            "this result holds no similarity measures besides its CKA columns; run "
            "`ckapipe analyze --measure cka,rsa,...` on full-mode caches"
        )
    colormap = _resolve_cmap(cmap).with_extremes(bad=NAN_CELL_COLOR)
    fig = _new_figure((1.0 + 1.7 * len(pairs), 0.6 + 1.6 * len(names)))
    axes = fig.subplots(len(names), len(pairs), squeeze=False)
    for row, name in enumerate(names):
        values = [np.asarray(p.measures.get(name, np.full((1, 1), np.nan))) for p in pairs]
        finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(0)])
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1.0)
        image = None
        for column, (pair, matrix) in enumerate(zip(pairs, values, strict=True)):
            ax = axes[row, column]
            image = ax.imshow(matrix, cmap=colormap, norm=norm, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_pair_label(pair), fontsize=_GRID_TICK_FONTSIZE)
            if column == 0:
                ax.set_ylabel(name, fontsize=_TICK_FONTSIZE)
        colorbar = fig.colorbar(image, ax=list(axes[row]), fraction=0.02, pad=0.01)
        colorbar.ax.tick_params(labelsize=_GRID_TICK_FONTSIZE)
    fig.suptitle("similarity measures per model pair (rows: layers of a, columns: layers of b)")
    return fig
