"""The study report: one self-contained HTML page (figures embedded as base64 PNG).

It shows, per dataset, a table of every model pair (summary CKA, confidence interval or why it
was withheld, null threshold), the study grid, every pair's heatmap and the layer-correspondence
curves with their confidence intervals (the PNGs `ckapipe plot` wrote), a table of
corresponding-layer CKA with intervals (and null thresholds) for same-architecture pairs, the models' accuracies (demo-trained models), and
the provenance: resolved config, cache keys, store identities and library versions.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ckapipe.utils import same_architecture

__all__ = ["diagonal_dominance", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1, h2, h3 { font-weight: 600; } table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em; }
th { background: #f3f3f3; } img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.8em; }
.ok { color: #176a1c; } .bad { color: #a31515; } figure { margin: 0 0 1em; }
figcaption { font-size: 0.85em; color: #555; }
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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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
        rows.append(
            [
                f"<b>{html.escape(name)}</b>",
                html.escape(spec["factory"]),
                html.escape(json.dumps(spec.get("kwargs", {}))),
                html.escape(", ".join(config["layers"])),
                html.escape(config.get("reduction", "flatten")),
                weights,
                accuracy,
            ]
        )
    return "<h2>Models</h2>" + _table(
        ["model", "factory", "kwargs", "layers", "reduction", "weights", "accuracy"], rows
    )


def _same_architecture(plan: Mapping[str, Any], a: str, b: str) -> bool:
    models, config = plan["models"], plan["config"]["models"]
    return a != b and same_architecture(
        models[a]["spec"], models[b]["spec"], config[a]["layers"], config[b]["layers"]
    )


def _level(ci_level: Any) -> str:
    return f"{float(ci_level):.0%}" if ci_level else ""


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

    def number(value: float | None) -> str:
        return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"

    rows = []
    with_null = any(pair.null_threshold is not None for pair in result.pairs.values())
    for (a, b), pair in sorted(result.pairs.items()):
        summary = summarize_pair(pair, float(ci_level) if ci_level else None)
        row = [
            html.escape(f"{a} vs {b}"),
            summary.layers,
            number(summary.diagonal),
            number(summary.best),
            f"{number(summary.low)} – {number(summary.high)}",
            _interval_cell(pair, ci_level),
        ]
        if with_null:
            above = (
                "–" if summary.above_null is None else f"{summary.above_null}/{summary.n_entries}"
            )
            row += [number(summary.null_threshold), above]
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
        "table linked above.</p>" + _table(header, rows)
    )


def _dataset_section(plan: Mapping[str, Any], name: str, dataset: Mapping[str, Any]) -> str:
    from ckapipe.analyze.result import load_result

    # load_result rewrites a CSV that is not the one written with the result (a killed run),
    # so the table the report points to always holds the numbers shown here
    result = load_result(dataset["result"])
    digest = (result.provenance.get("csv") or {}).get("sha256", "")
    parts = [f"<h2>Dataset {html.escape(name)}</h2>"]
    parts.append(
        f"<p>Spec: <code>{html.escape(json.dumps(dataset['spec']))}</code>; "
        f"{len(result.models)} models, {len(result.pairs)} pairs. "
        f"Table of every layer pair: <code>{html.escape(str(dataset['table']))}</code> "
        f"(SHA-256 {html.escape(digest[:16])}…, as recorded in the result).</p>"
    )
    ci_level = result.provenance.get("ci_level")
    parts.append(_pairs_table(result, ci_level))
    rows = []
    for (a, b), pair in sorted(result.pairs.items()):
        if not _same_architecture(plan, a, b):
            continue
        cells = ", ".join(
            f"{html.escape(layer)}: {_diagonal_cell(pair, i)}"
            for i, layer in enumerate(pair.layers_a)
        )
        dominant = diagonal_dominance(pair.cka)
        verdict = '<span class="ok">yes</span>' if dominant else '<span class="bad">no</span>'
        rows.append([html.escape(f"{a} vs {b}"), cells, _interval_cell(pair, ci_level), verdict])
    if rows:
        parts.append(
            "<h3>Same architecture, different seeds</h3><p>CKA of corresponding layers with "
            f"{_level(ci_level)} confidence intervals [low, high] where reported (and, with "
            "permutations, the null threshold: the CKA unrelated representations exceed with "
            "probability 0.05); the known structure is that each layer is most similar to the "
            "corresponding layer of the other seed (the diagonal dominates its row and "
            "column).</p>"
        )
        parts.append(
            _table(
                ["pair", "corresponding layers: CKA [CI]", "interval", "diagonal dominates"], rows
            )
        )
    diagnostics = sorted(
        {
            f"{a} vs {b}: {message}"
            for (a, b), pair in result.pairs.items()
            for message in pair.diagnostics
        }
    )
    if diagnostics:
        items = "".join(f"<li>{html.escape(message)}</li>" for message in diagnostics)
        parts.append(f"<h3>Diagnostics</h3><ul>{items}</ul>")
    parts.append(measures_section(result))
    plots = Path(dataset["plots"])
    figures = sorted(plots.glob("*.png"))
    order = ("study_grid", "correspondence", "heatmap")
    for prefix in order:
        selected = [path for path in figures if path.stem.startswith(prefix)]
        if not selected:
            continue
        title = {
            "study_grid": "Study grid",
            "correspondence": "Layer correspondence (with confidence intervals)",
            "heatmap": "Per-pair heatmaps",
        }[prefix]
        parts.append(f"<h3>{title}</h3>")
        for path in selected:
            parts.append(
                f"<figure>{_png(path)}<figcaption>{html.escape(path.name)}</figcaption></figure>"
            )
    others = [path for path in figures if not path.stem.startswith(order)]
    for path in others:
        parts.append(
            f"<figure>{_png(path)}<figcaption>{html.escape(path.name)}</figcaption></figure>"
        )
    caches = [
        [
            html.escape(model),
            html.escape(paths["store"]),
            html.escape(paths["gram"]),
        ]
        for model, paths in dataset["caches"].items()
    ]
    parts.append("<h3>Caches used (content-keyed, shared by studies)</h3>")
    parts.append(_table(["model", "activation store", "Gram cache"], caches))
    versions = result.provenance.get("versions")
    if versions:
        parts.append(f"<p>Versions: <code>{html.escape(json.dumps(versions))}</code></p>")
    return "\n".join(parts)


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
        ``study``, resolved ``config``, ``models`` (spec, weights identity, metrics path) and
        ``datasets`` (spec, result, table and plots paths, caches).
    out:
        The HTML file to write.
    """
    import ckapipe

    sections = [
        f"<h1>CKA study “{html.escape(plan['study'])}”</h1>",
        f"<p>Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by ckapipe "
        f"{ckapipe.__version__}. Estimator: {html.escape(plan['config']['analysis']['estimator'])}, "
        f"kernel {html.escape(plan['config']['analysis']['kernel'])}, mode "
        f"{html.escape(plan['config']['analysis']['mode'])}, batch size "
        f"{plan['config']['analysis']['batch_size']}, epochs {plan['config']['analysis']['epochs']}."
        "</p>",
        _models_section(plan),
    ]
    for name, dataset in plan["datasets"].items():
        sections.append(_dataset_section(plan, name, dataset))
    sections.append("<h2>Provenance: the resolved study config</h2>")
    sections.append(
        f"<pre>{html.escape(yaml.safe_dump(dict(plan['config']), sort_keys=False))}</pre>"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>ckapipe study {html.escape(plan['study'])}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(sections)}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
