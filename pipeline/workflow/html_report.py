"""The study report: one self-contained HTML page (figures embedded as base64 PNG).

Top to bottom: the models (architecture, accuracy of demo-trained ones); per dataset, the
similarity within vs across architectures (with jackknife intervals and, with permutations, the
null), every model pair in a few numbers, the study grid (numbers ± interval half-widths in the
cells), one layer-correspondence figure of all same-architecture pairs with bands and a table
of their corresponding layers, the per-pair heatmaps (folded) and diagnostics; last, folded,
the provenance: resolved config, caches, library versions.

A dataset's part is a sequence of section functions (:data:`DATASET_SECTIONS`), each taking a
:class:`DatasetView` and returning HTML ("" to leave itself out): a new section is one function.
The page is laid out for phones as well as desktops (tables scroll inside their box, figures
scale); ``tools/screenshot_report.py`` renders it in headless Chromium at both widths.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ckapipe.utils import ARCHITECTURE_RULE, architecture_of, same_architecture

__all__ = ["DATASET_SECTIONS", "DatasetView", "diagonal_dominance", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 12px;
       color: #222; line-height: 1.4; }
h1, h2, h3 { font-weight: 600; } h1 { font-size: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
.scroll { overflow-x: auto; margin-bottom: 1.2em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em;
         vertical-align: top; }
th { background: #f3f3f3; } td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 4px 0; }
@media (max-width: 700px) {
  body { font-size: 15px; } td.wide { min-width: 14em; }
  /* on a phone the study grid keeps a legible size and scrolls sideways inside its box */
  figure.grid { overflow-x: auto; } figure.grid img { max-width: none; width: 900px; }
}
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.8em; }
.ok { color: #176a1c; } .bad { color: #a31515; } .note { color: #555; font-size: 0.9em; }
figure { margin: 0 0 1em; } figcaption { font-size: 0.85em; color: #555; }
details { margin: 0.8em 0; border: 1px solid #ddd; border-radius: 4px; padding: 0.4em 0.8em; }
summary { cursor: pointer; font-weight: 600; }
code { overflow-wrap: anywhere; }
"""


def diagonal_dominance(cka: np.ndarray) -> bool:
    """Whether every diagonal entry of a square CKA matrix is the largest of its row and column.

    Parameters
    ----------
    cka:
        (L, L) matrix, layer i of one model against layer j of a same-architecture model.
    """
    cka = np.asarray(cka, dtype=np.float64)
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1] or not np.isfinite(cka).all():
        return False
    diagonal = np.diag(cka)
    return bool((diagonal >= cka.max(axis=0)).all() and (diagonal >= cka.max(axis=1)).all())


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _figure(path: Path, caption: str, kind: str = "") -> str:
    attribute = f' class="{kind}"' if kind else ""
    return f"<figure{attribute}>{_png(path)}<figcaption>{caption}</figcaption></figure>"


def _prose(text: str) -> str:
    """Plain text with `code` spans, as HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _table(
    header: list[str],
    rows: list[list[Any]],
    numeric: tuple[int, ...] = (),
    wide: tuple[int, ...] = (),
) -> str:
    """An HTML table in a box that scrolls sideways on a narrow screen (the page never does).
    Cells are HTML; columns in ``numeric`` do not wrap, columns in ``wide`` (long text) keep a
    readable width instead of wrapping into a tall narrow column on a phone."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)

    def cell(k: int, value: Any) -> str:
        kind = "num" if k in numeric else "wide" if k in wide else ""
        return f'<td class="{kind}">{value}</td>' if kind else f"<td>{value}</td>"

    body = "".join(
        "<tr>" + "".join(cell(k, value) for k, value in enumerate(row)) + "</tr>" for row in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _model_architecture(plan: Mapping[str, Any], name: str) -> str | None:
    """The model's architecture as the plan records it (declared, else the factory)."""
    model = plan["models"][name]
    if model.get("architecture"):
        return str(model["architecture"])
    declared = plan["config"]["models"].get(name, {}).get("architecture")
    return architecture_of(model.get("spec"), declared)


def _models_section(plan: Mapping[str, Any]) -> str:
    rows = []
    for name, model in plan["models"].items():
        config = plan["config"]["models"][name]
        spec = model["spec"]
        identity = model["weights_identity"]
        if "sha256" in identity:
            weights = f"{html.escape(spec['weights'])}<br>sha256 {identity['sha256'][:16]}…"
        elif "trained" in identity:
            weights = f"trained by the demo (seed {config['train']['seed']})"
        else:
            weights = "none (as constructed)"
        accuracy = "–"
        if model.get("metrics") and Path(model["metrics"]).is_file():
            metrics = json.loads(Path(model["metrics"]).read_text())
            accuracy = (
                f"{metrics['probe_accuracy']:.1%} on {metrics['n_probe']} held-out images "
                f"(chance {metrics['chance_accuracy']:.1%}; train {metrics['train_accuracy']:.1%})"
            )
        architecture = _model_architecture(plan, name) or "–"
        source = "declared" if config.get("architecture") else "factory"
        rows.append(
            [
                f"<b>{html.escape(name)}</b>",
                f"{html.escape(architecture)} <small>({source})</small>",
                html.escape(spec["factory"]),
                html.escape(json.dumps(spec.get("kwargs", {}))),
                html.escape(", ".join(config["layers"])),
                html.escape(config.get("reduction", "flatten")),
                weights,
                accuracy,
            ]
        )
    return (
        "<h2>Models</h2>"
        + _table(
            [
                "model",
                "architecture",
                "factory",
                "kwargs",
                "layers",
                "reduction",
                "weights",
                "accuracy",
            ],
            rows,
            numeric=(0,),
            wide=(6, 7),
        )
        + f'<p class="note">Architecture: {_prose(ARCHITECTURE_RULE)}.</p>'
    )


def _level(ci_level: Any) -> str:
    return f"{float(ci_level):.0%}" if ci_level else ""


def _number(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _cka_cell(value: float, low: float, high: float, null: float | None) -> str:
    """A CKA with its interval where reported and its null threshold where computed."""
    if not np.isfinite(value):
        return "–"
    text = f"{value:.3f}"
    if np.isfinite(low) and np.isfinite(high):
        text += f" [{low:.3f}, {high:.3f}]"
    if null is not None and np.isfinite(null):
        text += f" <small>(null {null:.3f})</small>"
    return text


def _diagonal_cell(pair: Any, i: int) -> str:
    null = None if pair.null_threshold is None else pair.null_threshold[i, i]
    return _cka_cell(pair.cka[i, i], pair.ci_low[i, i], pair.ci_high[i, i], null)


def _interval_cell(pair: Any, ci_level: Any) -> str:
    """How a pair's intervals were computed, or why they were withheld (highlighted)."""
    from ckapipe.analyze.summary import interval_text, summarize_pair

    summary = summarize_pair(pair, float(ci_level) if ci_level else None)
    text = html.escape(interval_text(summary))
    return text if summary.interval is not None else f'<span class="bad">{text}</span>'


def _pairs_table(result: Any, ci_level: Any) -> str:
    """Every model pair in a few numbers, with its interval (or why none) and null threshold."""
    from ckapipe.analyze.summary import summarize_pair

    rows = []
    with_null = any(pair.null_threshold is not None for pair in result.pairs.values())
    for (a, b), pair in sorted(result.pairs.items()):
        summary = summarize_pair(pair, float(ci_level) if ci_level else None)
        row = [
            html.escape(f"{a} vs {b}"),
            summary.layers,
            _number(summary.diagonal),
            _number(summary.best),
            f"{_number(summary.low)} – {_number(summary.high)}",
            _interval_cell(pair, ci_level),
        ]
        if with_null:
            above = (
                "–" if summary.above_null is None else f"{summary.above_null}/{summary.n_entries}"
            )
            row += [_number(summary.null_threshold), above]
        rows.append(row)
    header = ["pair", "layers", "mean diagonal CKA", "mean best match", "CKA range", "interval"]
    if with_null:
        header += ["null threshold (largest)", "layer pairs above null"]
    return (
        "<h3>Pairs</h3><p>Mean diagonal: mean CKA of layer i with layer i; mean best match: "
        "mean over model a's layers of the highest CKA with any layer of model b; interval: "
        "the largest half-width of the layer pairs' confidence intervals, or why they were "
        "withheld; null threshold: the CKA unrelated representations exceed with probability "
        "0.05 under the permutation null. Every layer pair, with its interval, is in the "
        "table linked above.</p>" + _table(header, rows, numeric=(0, 1, 2, 3, 4), wide=(5,))
    )


@dataclass(frozen=True)
class DatasetView:
    """What a dataset's report sections read: the plan, the dataset's entry in it, its loaded
    result, each model's architecture and the figures ``ckapipe plot`` wrote."""

    plan: Mapping[str, Any]
    name: str
    dataset: Mapping[str, Any]
    result: Any
    architectures: Mapping[str, str | None]
    ci_level: float | None

    @property
    def figures(self) -> list[Path]:
        return sorted(Path(self.dataset["plots"]).glob("*.png"))

    def figure(self, stem: str) -> Path | None:
        return next((path for path in self.figures if path.stem == stem), None)

    @property
    def permutations(self) -> bool:
        return any(pair.null_threshold is not None for pair in self.result.pairs.values())


def _null_note(view: DatasetView) -> str:
    if view.permutations:
        return ""
    return (
        " No permutation null was computed (<code>analysis.permutations: 0</code>); set it to "
        "e.g. 200 to see, beside each value, the CKA unrelated representations reach."
    )


def _intro_section(view: DatasetView) -> str:
    digest = (view.result.provenance.get("csv") or {}).get("sha256", "")
    return (
        f"<h2>Dataset {html.escape(view.name)}</h2>"
        f"<p>{len(view.result.models)} models, {len(view.result.pairs)} pairs. Table of every "
        f"layer pair: <code>{html.escape(str(view.dataset['table']))}</code> (SHA-256 "
        f"{html.escape(digest[:16])}…, as recorded in the result).</p>"
    )


def _architecture_section(view: DatasetView) -> str:
    """Similarity within vs across architectures, with intervals and the null."""
    from ckapipe.analyze.architecture_summary import SIMILARITY_DEFINITION, architecture_similarity

    groups = architecture_similarity(view.result, view.architectures, view.ci_level)
    if not groups:
        return ""
    level = _level(view.ci_level)
    rows = []
    for group in groups:
        interval = (
            f"[{group.low:.3f}, {group.high:.3f}]"
            if group.reason is None and np.isfinite(group.low)
            else f'<span class="bad">{html.escape(group.reason or "no interval")}</span>'
        )
        label = html.escape(group.label)
        rows.append(
            [
                f"<b>{label}</b>" if group.kind == "difference" else label,
                _number(group.value),
                interval,
                "–" if group.null_threshold is None else _number(group.null_threshold),
                str(len(group.pairs)) if group.pairs else "–",
                str(group.n_layer_pairs),
            ]
        )
    return (
        "<h3>Within vs across architectures</h3>"
        f"<p>Are two models of one architecture more alike than two different architectures? "
        f"Similarity: {html.escape(SIMILARITY_DEFINITION)}. {level} intervals: delete-one-batch "
        "jackknife over the minibatches the models share (t quantile), withheld under the rule "
        "of every interval in this report. Null: the largest permutation-null threshold "
        f"among the layer pairs averaged.{_null_note(view)}</p>"
        + _table(
            ["group", "mean CKA", f"{level} CI", "null", "model pairs", "layer pairs"],
            rows,
            numeric=(1, 3, 4, 5),
        )
    )


def _pairs_section(view: DatasetView) -> str:
    return _pairs_table(view.result, view.ci_level)


def _grid_section(view: DatasetView) -> str:
    path = view.figure("study_grid")
    if path is None:
        return ""
    return "<h3>Study grid</h3>" + _figure(
        path,
        f"Every model pair: CKA in each cell with ± the half-width of its {_level(view.ci_level)} "
        "confidence interval (where reported and where the numbers fit). The hatched light-grey "
        "upper half of a self-comparison is its mirror image, not a value; hatched dark grey "
        "marks an undefined CKA.",
        kind="grid",
    )


def _correspondence_section(view: DatasetView) -> str:
    """The one correspondence figure and the table of corresponding layers."""
    parts = []
    rows = []
    for (a, b), pair in sorted(view.result.pairs.items()):
        same = same_architecture(
            view.architectures.get(a), view.architectures.get(b), pair.layers_a, pair.layers_b
        )
        if a == b or not same:
            continue
        cells = "<br>".join(
            f"{html.escape(layer)}: {_diagonal_cell(pair, i)}"
            for i, layer in enumerate(pair.layers_a)
        )
        dominant = diagonal_dominance(pair.cka)
        verdict = '<span class="ok">yes</span>' if dominant else '<span class="bad">no</span>'
        rows.append(
            [
                html.escape(f"{a} vs {b}"),
                html.escape(view.architectures.get(a) or "not recorded"),
                cells,
                _interval_cell(pair, view.ci_level),
                verdict,
            ]
        )
    path = view.figure("correspondence")
    if path is None and not rows:
        return ""
    parts.append("<h3>Layer correspondence (with confidence intervals)</h3>")
    parts.append(
        "<p>Pairs of two models of one architecture (as the Models table lists them) with the "
        "same layers: the "
        f"CKA of layer i with layer i, with its {_level(view.ci_level)} confidence band"
        + (" and the permutation-null threshold (dashed)" if view.permutations else "")
        + ". The known structure is that each layer is most similar to the corresponding "
        f"layer of the other model (the diagonal dominates its row and column).{_null_note(view)}"
        "</p>"
    )
    if path is not None:
        parts.append(_figure(path, "All same-architecture pairs, a panel per architecture."))
    if rows:
        parts.append(
            _table(
                [
                    "pair",
                    "architecture",
                    "corresponding layers: CKA [CI]",
                    "interval",
                    "diagonal dominates",
                ],
                rows,
                numeric=(0, 2),
                wide=(3,),
            )
        )
    return "".join(parts)


def _heatmaps_section(view: DatasetView) -> str:
    paths = [path for path in view.figures if path.stem.startswith("heatmap")]
    known = ("study_grid", "correspondence", "heatmap")
    others = [path for path in view.figures if not path.stem.startswith(known)]
    if not paths and not others:
        return ""
    figures = "".join(_figure(path, html.escape(path.name)) for path in paths + others)
    return (
        f"<details><summary>Per-pair heatmaps ({len(paths)}): the grid's panels, larger, with "
        f"± interval half-widths</summary>{figures}</details>"
    )


def _diagnostics_section(view: DatasetView) -> str:
    diagnostics = sorted(
        {
            f"{a} vs {b}: {message}"
            for (a, b), pair in view.result.pairs.items()
            for message in pair.diagnostics
        }
    )
    if not diagnostics:
        return ""
    items = "".join(f"<li>{html.escape(message)}</li>" for message in diagnostics)
    return f"<h3>Diagnostics</h3><ul>{items}</ul>"


def _measures_section(view: DatasetView) -> str:
    return measures_section(view.result)


#: the sections of a dataset's part of the report, in order; each returns HTML or ""
DATASET_SECTIONS: tuple[Callable[[DatasetView], str], ...] = (
    _intro_section,
    _architecture_section,
    _pairs_section,
    _grid_section,
    _correspondence_section,
    _measures_section,
    _heatmaps_section,
    _diagnostics_section,
)


def _dataset_view(plan: Mapping[str, Any], name: str, dataset: Mapping[str, Any]) -> DatasetView:
    from ckapipe.analyze.architecture_summary import recorded_architectures
    from ckapipe.analyze.result import load_result

    # load_result rewrites a CSV that is not the one written with the result (a killed run),
    # so the table the report points to always holds the numbers shown here
    result = load_result(dataset["result"])
    # the architectures the result was analysed with win; the plan's serve older results
    architectures = {model: _model_architecture(plan, model) for model in plan["models"]}
    architectures.update(recorded_architectures(result))
    ci_level = result.provenance.get("ci_level")
    return DatasetView(
        plan, name, dataset, result, architectures, float(ci_level) if ci_level else None
    )


def _dataset_section(plan: Mapping[str, Any], name: str, dataset: Mapping[str, Any]) -> str:
    view = _dataset_view(plan, name, dataset)
    return "\n".join(section(view) for section in DATASET_SECTIONS)


def _provenance_section(plan: Mapping[str, Any]) -> str:
    """Folded at the bottom: the resolved config, the caches used and the library versions."""
    from ckapipe.analyze.result import load_result

    parts = [
        "<h2>Provenance</h2>",
        "<details><summary>The resolved study config</summary>"
        f"<pre>{html.escape(yaml.safe_dump(dict(plan['config']), sort_keys=False))}</pre>"
        "</details>",
    ]
    for name, dataset in plan["datasets"].items():
        caches = [
            [html.escape(model), html.escape(paths["store"]), html.escape(paths["gram"])]
            for model, paths in dataset["caches"].items()
        ]
        versions = load_result(dataset["result"]).provenance.get("versions")
        parts.append(
            f"<details><summary>Dataset {html.escape(name)}: spec, caches (content-keyed, "
            "shared by studies), versions</summary>"
            f"<p>Spec: <code>{html.escape(json.dumps(dataset['spec']))}</code></p>"
            + _table(["model", "activation store", "Gram cache"], caches)
            + (
                f"<p>Versions: <code>{html.escape(json.dumps(versions))}</code></p>"
                if versions
                else ""
            )
            + "</details>"
        )
    return "".join(parts)


def measures_section(result: Any) -> str:
    """The similarity measures of a study side by side (empty for a CKA-only result): their
    mean per pair, a grid per measure (:func:`~ckapipe.analyze.plots.plot_measure_grid`, drawn
    here and embedded) and how well they agree on the ranking of layer pairs (Spearman ρ and
    Kendall τ-b over every layer-pair entry, :mod:`ckapipe.analyze.measure_agreement`)."""
    if not any(pair.measures for pair in result.pairs.values()):
        return ""
    import io

    from ckapipe.analyze.measure_agreement import measure_agreement
    from ckapipe.analyze.measures import MEASURES
    from ckapipe.analyze.plots import plot_measure_grid

    names = list(result.provenance.get("measures") or [])
    parts = [
        "<h3>Similarity measures</h3><p>Every measure below is computed exactly from the cached "
        "n&times;n Grams (docs/MEASURES.md): "
        + "; ".join(f"<b>{html.escape(n)}</b>: {html.escape(MEASURES[n])}" for n in names)
        + ".</p>"
    ]
    if any(name in names for name in ("cca", "cca_pillai", "cca_mean_rho", "pwcca", "regression")):
        parts.append(
            "<p>Caveat: a layer whose centered features span all n&minus;1 sample directions "
            "(at least as many independent features as samples, e.g. a flattened conv map) "
            "makes every canonical correlation 1, so CCA, PWCCA and regression R&sup2; are 1 "
            "by construction for its pairs; SVCCA (top principal directions) or more samples "
            "avoid this (docs/MEASURES.md).</p>"
        )
    rows = [
        [html.escape(f"{a} vs {b}")] + [f"{float(np.nanmean(pair.measures[n])):.3f}" for n in names]
        for (a, b), pair in result.pairs.items()
    ]
    parts.append("<p>Mean over each pair's layer pairs:</p>")
    parts.append(_table(["pair", *names], rows))
    buffer = io.BytesIO()
    figure = plot_measure_grid(result)
    figure.savefig(buffer, format="png", dpi=90, facecolor="white")
    data = base64.b64encode(buffer.getvalue()).decode()
    parts.append(
        f'<figure><img alt="measure grid" src="data:image/png;base64,{data}">'
        "<figcaption>one row per measure, one column per model pair</figcaption></figure>"
    )
    agreement = measure_agreement(result)
    cells = [
        [html.escape(a)]
        + [
            "–"
            if np.isnan(agreement.spearman[i, j])
            else f"{agreement.spearman[i, j]:.2f} / {agreement.kendall[i, j]:.2f}"
            for j in range(len(agreement.names))
        ]
        for i, a in enumerate(agreement.names)
    ]
    parts.append(
        "<p>Agreement on the ranking of layer pairs: Spearman &rho; / Kendall &tau;-b between "
        f"measures over {agreement.n_values} layer-pair entries (every pair's entries; a model "
        "with itself only above the diagonal).</p>"
    )
    parts.append(_table(["", *agreement.names], cells))
    return "\n".join(parts)


def write_report(plan: Mapping[str, Any], out: str | Path) -> Path:
    """Write the study report.

    Parameters
    ----------
    plan:
        What the workflow knows about the study (``report_plan()`` in ``rules/common.smk``):
        ``study``, resolved ``config``, ``models`` (spec, weights identity, metrics path,
        architecture) and ``datasets`` (spec, result, table and plots paths, caches).
    out:
        The HTML file to write.
    """
    import ckapipe

    analysis = plan["config"]["analysis"]
    sections = [
        f"<h1>CKA study “{html.escape(plan['study'])}”</h1>",
        f"<p>Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by ckapipe "
        f"{ckapipe.__version__}. Estimator: {html.escape(analysis['estimator'])}, "
        f"kernel {html.escape(analysis['kernel'])}, mode {html.escape(analysis['mode'])}, batch "
        f"size {analysis['batch_size']}, epochs {analysis['epochs']}, permutations "
        f"{analysis.get('permutations', 0)}.</p>",
        _models_section(plan),
    ]
    for name, dataset in plan["datasets"].items():
        sections.append(_dataset_section(plan, name, dataset))
    sections.append(_provenance_section(plan))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>ckapipe study {html.escape(plan['study'])}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(sections)}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
