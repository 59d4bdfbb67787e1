"""The study result format (``ckapipe.cka-result`` version 2) and its tidy CSV.

A result is one zarr v3 group ``RESULT.zarr`` and a CSV ``RESULT.csv`` beside it. The group
holds a few labelled arrays over named dimensions, so that ``xarray.open_zarr(path,
consolidated=False)`` gives labelled DataArrays without importing ckapipe:

==================  =================================  ==========================================
array               dimensions                         content
==================  =================================  ==========================================
``pair``            (pair,)                            ``"<model_a>--<model_b>"``: index coordinate
``model_a/_b``      (pair,)                            model names (coordinates)
``layer_name_a``    (pair, layer_a)                    layer names of model a, ``""`` as padding
``layer_name_b``    (pair, layer_b)                    layer names of model b, ``""`` as padding
``batch``           (batch,)                           batch numbers (full mode: one row, 0)
``cka``             (pair, layer_a, layer_b)           CKA; NaN as padding
``ci_low/ci_high``  (pair, layer_a, layer_b)           interval bounds; NaN where withheld
``p_value``         (pair, layer_a, layer_b)           optional: permutation p-values
``null_threshold``  (pair, layer_a, layer_b)           optional: CKA threshold of the null
``hsic_per_batch``  (pair, batch, layer_a, layer_b)    per-batch HSIC (full mode: one batch)
``self_a_per_batch`` (pair, batch, layer_a)            per-batch self-HSIC of model a's layers
``self_b_per_batch`` (pair, batch, layer_b)            per-batch self-HSIC of model b's layers
``measure``         (measure,)                         optional: names of the similarity measures
``measure_values``  (measure, pair, layer_a, layer_b)  optional: every measure (docs/MEASURES.md)
==================  =================================  ==========================================

Model pairs have different layer counts, so the layer dimensions are padded to the largest
count; each pair's true counts (``n_layers_a``, ``n_layers_b``, ``n_batches``), diagnostics and
interval method are in the root attribute ``pair_info`` (one entry per ``pair``, same order).
One padded layout instead of a group per pair keeps the write to a dozen arrays whatever the
number of pairs (a group per pair cost ~16 zarr files per pair). Optional per-layer-pair arrays
(:data:`OPTIONAL_LAYER_ARRAYS`) are written when any pair has them; the pairs that do not are
listed in the array's ``pairs_without`` attribute. ``measure_values`` is written when the study
was asked for measures besides CKA (``ckapipe analyze --measure``); results without it load as
before (``PairResult.measures`` empty), and the CSV then has one more column per measure.

The root attributes hold the provenance (estimator, caches, seeds, versions), ``pairs``,
``pair_info``, ``csv`` (file name, columns and SHA-256 of the CSV written with the group) and,
last, ``complete``. Writing follows :mod:`ckapipe.formats`: one writer, built in a staging
folder and renamed into place, every array checksummed, one metadata write for the root.

The CSV is a pure function of the group, so a CSV that does not match the recorded SHA-256
(left by a killed run, or edited) is rewritten from the group by :func:`load_result`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ckapipe.errors import FormatError, IncompleteError, IntegrityError, WriterLockedError
from ckapipe.formats import (
    WriterLock,
    check_chunks,
    check_format,
    create_array,
    sibling_lock_path,
    staged_directory,
    write_attrs,
)
from ckapipe.utils import jsonable  # re-exported: the result format's attributes

__all__ = [
    "CSV_COLUMNS",
    "OPTIONAL_LAYER_ARRAYS",
    "RESULT_FORMAT",
    "RESULT_FORMAT_VERSION",
    "IncompleteResultError",
    "PairResult",
    "ResultError",
    "StudyResult",
    "csv_path_for",
    "is_result",
    "load_result",
    "result_writer",
    "write_result",
]

RESULT_FORMAT = "ckapipe.cka-result"
RESULT_FORMAT_VERSION = 2
CSV_COLUMNS = (
    "model_a",
    "model_b",
    "layer_a",
    "layer_b",
    "cka",
    "ci_low",
    "ci_high",
    "p_value",
    "null_threshold",
    "estimator",
    "kernel",
    "n_samples",
    "batch_size",
    "samples_used",
    "n_batches",
    "interval_method",
    "interval_note",
)
#: (La, Lb) arrays a pair may or may not have; each is written as a (pair, layer_a, layer_b)
#: array when any pair has it. Adding a name here (and a field to PairResult) is all it takes.
OPTIONAL_LAYER_ARRAYS = ("p_value", "null_threshold")
REMEDY = "re-run `ckapipe analyze` (with --overwrite) to write a current result"
_LAYER_DIMS = ("pair", "layer_a", "layer_b")
# Largest chunk of a result array: a chunk holds whole pairs, as many as fit.
_CHUNK_BYTES = 16 << 20


class ResultError(FormatError):
    """A result is missing, of another format or version, or misused."""


class IncompleteResultError(ResultError, IncompleteError):
    """A result has no completion flag (written by a ckapipe that did not stage its results)."""


@dataclass
class PairResult:
    """CKA of every layer pair of one model pair, as labeled numpy arrays.

    Attributes
    ----------
    model_a, model_b : model names (equal for a self-comparison).
    layers_a, layers_b : layer names; rows / columns of the arrays.
    cka, ci_low, ci_high : (La, Lb) float64. NaN where a layer's self-HSIC is not positive, and
        intervals NaN where none can be computed (see ``diagnostics``).
    p_value : (La, Lb) float64 permutation p-values, or None when not computed.
    diagnostics : human-readable notes on degenerate layers and missing intervals.
    hsic_per_batch : (B, La, Lb) per-batch HSIC (full mode: one row, the exact HSIC).
    self_a_per_batch, self_b_per_batch : (B, La), (B, Lb) per-batch self-HSIC.
    null_threshold : (La, Lb) CKA threshold of a null distribution, or None when not computed.
    interval_method : how ci_low/ci_high were computed, e.g. "jackknife over 8 batches, t
        quantile on 7 df" ("none" when no interval was computed).
    interval_note : why intervals were withheld, when they were (None: not recorded).
    info : further JSON-serialisable per-pair facts, stored with the pair.
    measures : {measure name: (La, Lb) float64} of the similarity measures asked for besides
        the CKA columns (``ckapipe analyze --measure``, full mode; see docs/MEASURES.md); empty
        when none were.
    """

    model_a: str
    model_b: str
    layers_a: list[str]
    layers_b: list[str]
    cka: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray | None = None
    diagnostics: list[str] = field(default_factory=list)
    hsic_per_batch: np.ndarray | None = None
    self_a_per_batch: np.ndarray | None = None
    self_b_per_batch: np.ndarray | None = None
    null_threshold: np.ndarray | None = None
    interval_method: str | None = None
    interval_note: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    measures: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def is_self_comparison(self) -> bool:
        return self.model_a == self.model_b

    def transposed(self) -> PairResult:
        """The same comparison seen from model b: every (La, Lb) array becomes (Lb, La)."""

        def t(x: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray | None:
            return None if x is None else np.transpose(x, axes)

        return replace(
            self,
            model_a=self.model_b,
            model_b=self.model_a,
            layers_a=list(self.layers_b),
            layers_b=list(self.layers_a),
            cka=self.cka.T,
            ci_low=self.ci_low.T,
            ci_high=self.ci_high.T,
            p_value=t(self.p_value, (1, 0)),
            null_threshold=t(self.null_threshold, (1, 0)),
            hsic_per_batch=t(self.hsic_per_batch, (0, 2, 1)),
            self_a_per_batch=self.self_b_per_batch,
            self_b_per_batch=self.self_a_per_batch,
            measures=_transposed_measures(self.measures),
        )


def _transposed_measures(measures: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Measures seen from model b: the two regression directions swap, and ``pwcca`` (weighted
    by model a's layer, so not the same measure from b) is left out."""
    swap = {"regression": "regression_reverse", "regression_reverse": "regression"}
    return {swap.get(name, name): v.T for name, v in measures.items() if name != "pwcca"}


@dataclass
class StudyResult:
    """All model pairs of a study.

    Attributes
    ----------
    models : model names in study order.
    pairs : {(model_a, model_b): PairResult} for the computed pairs.
    provenance : the result's root attributes (estimator, caches, stores, seeds, versions …).
    path : the result group on disk, if any.
    """

    models: list[str]
    pairs: dict[tuple[str, str], PairResult]
    provenance: dict[str, Any]
    path: Path | None = None

    def pair(self, model_a: str, model_b: str) -> PairResult:
        """The comparison of ``model_a`` (rows) with ``model_b`` (columns).

        A pair stored as (b, a) is returned transposed. Raises ``KeyError`` naming the pairs
        the study holds.
        """
        if (model_a, model_b) in self.pairs:
            return self.pairs[(model_a, model_b)]
        if (model_b, model_a) in self.pairs:
            return self.pairs[(model_b, model_a)].transposed()
        held = ", ".join(f"{a}:{b}" for a, b in self.pairs)
        raise KeyError(f"no pair {model_a}:{model_b} in this study; it holds {held}")

    @property
    def measure_names(self) -> list[str]:
        """The similarity measures held besides the CKA columns (empty for CKA only)."""
        return measure_names(self)

    def measure(self, name: str, model_a: str, model_b: str) -> np.ndarray:
        """(La, Lb) values of measure ``name`` for ``model_a`` (rows) vs ``model_b`` (columns);
        ``KeyError`` naming the measures held (``pwcca`` only in the stored direction)."""
        pair = self.pair(model_a, model_b)
        if name not in pair.measures:
            held = ", ".join(pair.measures) or "none (run analyze with --measure)"
            raise KeyError(f"no measure {name!r} for {model_a}:{model_b}; held: {held}")
        return pair.measures[name]


def csv_path_for(result_path: str | os.PathLike[str]) -> Path:
    """The tidy CSV written beside a result: ``RESULT.zarr`` → ``RESULT.csv``."""
    path = Path(result_path)
    return path.with_suffix(".csv") if path.suffix else path.with_name(path.name + ".csv")


def pair_key(model_a: str, model_b: str) -> str:
    """The ``pair`` coordinate of a model pair (model names never contain ``--``)."""
    return f"{model_a}--{model_b}"


def is_result(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ckapipe result group of any version (safe to overwrite)."""
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == RESULT_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not a result
        return False


# ------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def result_writer(
    out: str | os.PathLike[str], *, overwrite: bool
) -> Iterator[Callable[[StudyResult], dict[str, Any]]]:
    """Hold the writer lock of ``out`` for the whole study and yield its write function.

    Taking the lock before the computation (not only around the write) makes a second
    ``ckapipe analyze --out`` of the same path fail at once with
    :class:`~ckapipe.errors.WriterLockedError` instead of computing for nothing. The yielded
    ``write(study)`` writes the group into the staging folder and the CSV beside ``out``; the
    group is renamed into place when the block ends. It returns the root attributes as stored.
    The group at ``out`` is replaced only when ``write`` was called and the block ended
    normally; the CSV is placed by ``write`` itself (a CSV that then does not match the group at
    ``out`` is rewritten by :func:`load_result`).
    """
    out = Path(out)
    written: list[bool] = []
    with staged_directory(
        out,
        overwrite=overwrite,
        what="CKA result",
        remedy="choose another --out or pass --overwrite to replace it",
    ) as staging:

        def write(study: StudyResult) -> dict[str, Any]:
            if out.exists() and not is_result(out):
                # checked again under the lock: only a result is ever replaced
                raise ResultError(
                    f"{out} exists and is not a ckapipe CKA result; refusing to overwrite it"
                )
            attrs = _write_group(study, staging, csv_path_for(out))
            written.append(True)
            return attrs

        yield write
        if not written:
            raise ResultError(f"internal error: nothing was written to {out}")


def write_result(study: StudyResult, out: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Write ``study`` as a result at ``out`` (and its CSV beside it) in one locked step.

    ``study.provenance`` becomes the root attributes as stored (what :func:`load_result` reads).
    """
    with result_writer(out, overwrite=overwrite) as write:
        study.provenance = write(study)


def _write_group(study: StudyResult, staging: Path, csv_path: Path) -> dict[str, Any]:
    """Arrays, then the CSV (renamed into place), then the root attributes with the flag last.

    The CSV goes into place before the group (both under the writer lock): a writer killed
    between the two renames leaves the old group beside the new CSV, which :func:`load_result`
    detects by its SHA-256 and rewrites from the group.
    """
    pairs = list(study.pairs.values())
    if not pairs:
        raise ResultError("a result needs at least one model pair")
    root = zarr.open_group(str(staging), mode="a", zarr_format=3)
    for name, (values, dims, attributes) in _arrays(study, pairs).items():
        _put(root, name, values, dims, attributes)
    provenance = jsonable(
        {key: value for key, value in study.provenance.items() if key != "complete"}
    )
    attrs: dict[str, Any] = {
        **provenance,
        "format": RESULT_FORMAT,
        "format_version": RESULT_FORMAT_VERSION,
        "pairs": [[pair.model_a, pair.model_b] for pair in pairs],
        "pair_info": [_pair_info(pair) for pair in pairs],
    }
    # JSON round trip: the CSV is made from exactly the values load_result will read back
    attrs = json.loads(json.dumps(attrs))
    text = _csv_text(StudyResult(study.models, study.pairs, attrs))
    digest = hashlib.sha256(text.encode()).hexdigest()
    attrs["csv"] = {"name": csv_path.name, "sha256": digest, "columns": csv_columns(study)}
    _place_csv(text, csv_path)
    attrs["complete"] = True
    write_attrs(root, attrs)
    return attrs


def _pair_info(pair: PairResult) -> dict[str, Any]:
    n_batches = 0 if pair.hsic_per_batch is None else int(pair.hsic_per_batch.shape[0])
    return jsonable(
        {
            **pair.info,
            "n_layers_a": len(pair.layers_a),
            "n_layers_b": len(pair.layers_b),
            "n_batches": n_batches,
            "diagnostics": list(pair.diagnostics),
            "interval_method": pair.interval_method,
            "interval_note": pair.interval_note,
        }
    )


def _arrays(
    study: StudyResult, pairs: Sequence[PairResult]
) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]]:
    """Every array of the group, padded: {name: (values, dimension names, attributes)}."""
    n_pairs = len(pairs)
    la = max(len(p.layers_a) for p in pairs)
    lb = max(len(p.layers_b) for p in pairs)
    nb = max(1 if p.hsic_per_batch is None else p.hsic_per_batch.shape[0] for p in pairs)
    names_a = np.full((n_pairs, la), "", dtype=object)
    names_b = np.full((n_pairs, lb), "", dtype=object)
    for index, pair in enumerate(pairs):
        names_a[index, : len(pair.layers_a)] = pair.layers_a
        names_b[index, : len(pair.layers_b)] = pair.layers_b
    batches = [int(b) for b in study.provenance.get("batches") or []]
    batch = np.asarray(batches if len(batches) == nb else range(nb), dtype=np.int64)

    def stack(get: Callable[[PairResult], np.ndarray | None], shape: tuple[int, ...]):
        values = np.full((n_pairs, *shape), np.nan)
        for index, pair in enumerate(pairs):
            got = get(pair)
            if got is not None:
                got = np.asarray(got, dtype=np.float64)
                values[(index, *(slice(0, s) for s in got.shape))] = got
        return values

    layer_coords = {"coordinates": "model_a model_b layer_name_a layer_name_b"}
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]] = {
        "pair": (
            np.array([pair_key(p.model_a, p.model_b) for p in pairs], dtype=object),
            ("pair",),
            {},
        ),
        "model_a": (np.array([p.model_a for p in pairs], dtype=object), ("pair",), {}),
        "model_b": (np.array([p.model_b for p in pairs], dtype=object), ("pair",), {}),
        "layer_name_a": (names_a, ("pair", "layer_a"), {}),
        "layer_name_b": (names_b, ("pair", "layer_b"), {}),
        "batch": (batch, ("batch",), {}),
    }
    for name in ("cka", "ci_low", "ci_high"):
        arrays[name] = (stack(lambda p, n=name: getattr(p, n), (la, lb)), _LAYER_DIMS, layer_coords)
    for name in OPTIONAL_LAYER_ARRAYS:
        without = [i for i, p in enumerate(pairs) if getattr(p, name) is None]
        if len(without) < n_pairs:
            values = stack(lambda p, n=name: getattr(p, n), (la, lb))
            arrays[name] = (values, _LAYER_DIMS, {**layer_coords, "pairs_without": without})
    arrays["hsic_per_batch"] = (
        stack(lambda p: p.hsic_per_batch, (nb, la, lb)),
        ("pair", "batch", "layer_a", "layer_b"),
        layer_coords,
    )
    for side, size in (("a", la), ("b", lb)):
        arrays[f"self_{side}_per_batch"] = (
            stack(lambda p, s=side: getattr(p, f"self_{s}_per_batch"), (nb, size)),
            ("pair", "batch", f"layer_{side}"),
            {"coordinates": f"model_a model_b layer_name_{side}"},
        )
    names = measure_names(study)
    if names:
        arrays["measure"] = (np.array(names, dtype=object), ("measure",), {})
        values = np.stack([stack(lambda p, m=m: p.measures.get(m), (la, lb)) for m in names])
        arrays["measure_values"] = (
            values,
            ("measure", *_LAYER_DIMS),
            {"coordinates": "measure model_a model_b layer_name_a layer_name_b"},
        )
    return arrays


def measure_names(study: StudyResult) -> list[str]:
    """The similarity measures a study holds besides its CKA columns, in the order asked for
    (provenance ``measures``; empty for a CKA-only result)."""
    names = list(study.provenance.get("measures") or [])
    return names if any(p.measures for p in study.pairs.values()) else []


def csv_columns(study: StudyResult) -> list[str]:
    """:data:`CSV_COLUMNS`, then one column per measure of the study other than ``cka``."""
    return [*CSV_COLUMNS, *(name for name in measure_names(study) if name != "cka")]


def _put(
    root: zarr.Group,
    name: str,
    values: np.ndarray,
    dims: tuple[str, ...],
    attributes: Mapping[str, Any],
) -> None:
    strings = values.dtype == object
    per_pair = max(1, int(np.prod(values.shape[1:], dtype=np.int64)) * 8)
    chunks = (max(1, min(values.shape[0], _CHUNK_BYTES // per_pair)), *values.shape[1:])
    array = create_array(
        root,
        name,
        shape=values.shape,
        chunks=values.shape if strings else chunks,
        dtype=str if strings else values.dtype,
        dimension_names=dims,
        fill_value="" if strings else (np.nan if values.dtype.kind == "f" else -1),
        attributes=attributes,
    )
    array[...] = values


# ------------------------------------------------------------------------------ CSV


def _csv_text(study: StudyResult) -> str:
    """One row per model pair × layer pair; floats in full precision (``repr``), NaN as ``nan``,
    empty where a value was not computed (``p_value``, ``null_threshold``)."""
    provenance = study.provenance
    n_samples = _n_samples(provenance)
    partition = provenance.get("partition") or {}
    batch_size = partition.get("batch_size") if provenance.get("mode") == "minibatch" else None
    study_columns = [
        provenance.get("estimator", ""),
        provenance.get("kernel", ""),
        _cell(n_samples),
        _cell(batch_size),
        _cell(samples_used(provenance)),
    ]
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    extra = csv_columns(study)[len(CSV_COLUMNS) :]
    writer.writerow([*CSV_COLUMNS, *extra])
    for (a, b), pair in study.pairs.items():
        n_batches = 0 if pair.hsic_per_batch is None else int(pair.hsic_per_batch.shape[0])
        method, note = _interval_columns(pair)
        for i, layer_a in enumerate(pair.layers_a):
            for j, layer_b in enumerate(pair.layers_b):
                writer.writerow(
                    [
                        a,
                        b,
                        layer_a,
                        layer_b,
                        repr(float(pair.cka[i, j])),
                        repr(float(pair.ci_low[i, j])),
                        repr(float(pair.ci_high[i, j])),
                        _float_cell(pair.p_value, i, j),
                        _float_cell(pair.null_threshold, i, j),
                        *study_columns,
                        n_batches,
                        method,
                        note,
                        *(_float_cell(pair.measures.get(name), i, j) for name in extra),
                    ]
                )
    return handle.getvalue()


def samples_used(provenance: Mapping[str, Any]) -> int | None:
    """Samples that entered the estimate. Hook: the study records ``samples_used`` once the
    minibatch partition may drop samples; until then every sample is used (``n_samples``)."""
    used = provenance.get("samples_used")
    return int(used) if used is not None else _n_samples(provenance)


def _n_samples(provenance: Mapping[str, Any]) -> int | None:
    for model in (provenance.get("models") or {}).values():
        n = ((model or {}).get("identity") or {}).get("n_samples")
        if n is not None:
            return int(n)
    return None


def _interval_columns(pair: PairResult) -> tuple[str, str]:
    """The interval method and the reason intervals were withheld (empty when reported)."""
    return pair.interval_method or "not recorded", pair.interval_note or ""


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _float_cell(values: np.ndarray | None, i: int, j: int) -> str:
    return "" if values is None else repr(float(values[i, j]))


def _place_csv(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with tmp.open("w", newline="") as handle:
        handle.write(text)
    os.replace(tmp, path)


def csv_matches(result: StudyResult) -> bool:
    """Whether the CSV beside a loaded result is the one written with it (SHA-256)."""
    if result.path is None:
        return False
    path = csv_path_for(result.path)
    expected = (result.provenance.get("csv") or {}).get("sha256")
    if not path.is_file() or not expected:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == expected


def repair_csv(result: StudyResult) -> bool:
    """Rewrite a missing or foreign CSV beside ``result`` from the group; True if rewritten.

    The CSV is a pure function of the group, so the rewritten file must have the recorded
    SHA-256; otherwise the group itself is damaged (IntegrityError). Skipped (False) while a
    writer holds the lock: it is replacing the result and writes its own CSV.
    """
    assert result.path is not None
    if csv_matches(result):
        return False
    text = _csv_text(result)
    expected = result.provenance["csv"]["sha256"]
    if hashlib.sha256(text.encode()).hexdigest() != expected:
        raise IntegrityError(
            f"{result.path}: its arrays do not give back the CSV recorded with them (SHA-256 "
            f"mismatch); the result was modified after writing. {REMEDY}"
        )
    try:
        with WriterLock(sibling_lock_path(result.path), what=f"CKA result {result.path}"):
            _place_csv(text, csv_path_for(result.path))
    except WriterLockedError:
        return False
    return True


# ------------------------------------------------------------------------------ reading


def load_result(path: str | os.PathLike[str], *, repair: bool = True) -> StudyResult:
    """Read a result written by :func:`~ckapipe.analyze.study.analyze_study`.

    Parameters
    ----------
    path : the ``RESULT.zarr`` group.
    repair : rewrite the CSV beside it from the group when it is missing or is not the one
        written with it (a run killed between placing the CSV and the group leaves such a pair);
        warns when it does. ``False``: leave the CSV alone.

    Returns
    -------
    StudyResult with one :class:`PairResult` per stored pair.

    Raises
    ------
    ResultError
        Not a ckapipe result, or another format version (e.g. a version 1 result: re-run
        ``ckapipe analyze``).
    IncompleteResultError
        No completion flag.
    IntegrityError
        A chunk file is missing.
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise ResultError(f"{path} is not a zarr group (no zarr.json); check the path")
    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    ours = attrs.get("format") == RESULT_FORMAT
    try:
        check_format(
            attrs,
            path,
            name=RESULT_FORMAT,
            version=RESULT_FORMAT_VERSION,
            what="CKA result",
            remedy=REMEDY if ours else "create one with `ckapipe analyze`",
        )
    except FormatError as error:
        raise ResultError(str(error)) from None
    if attrs.get("complete") is not True:
        raise IncompleteResultError(
            f"{path} is incomplete (no completion flag): its writer was interrupted; {REMEDY}"
        )
    check_chunks(path)
    names = ["cka", "ci_low", "ci_high", "hsic_per_batch", "self_a_per_batch", "self_b_per_batch"]
    names += ["layer_name_a", "layer_name_b"]
    names += [name for name in OPTIONAL_LAYER_ARRAYS if name in root]
    names += [name for name in ("measure", "measure_values") if name in root]
    data = {name: root[name][...] for name in names}
    without = {
        name: set(root[name].attrs.get("pairs_without", []))
        for name in OPTIONAL_LAYER_ARRAYS
        if name in data
    }
    results: dict[tuple[str, str], PairResult] = {}
    for index, ((model_a, model_b), info) in enumerate(
        zip(attrs["pairs"], attrs["pair_info"], strict=True)
    ):
        results[(model_a, model_b)] = _pair_from(index, model_a, model_b, info, data, without)
    study = StudyResult(models=list(attrs["models"]), pairs=results, provenance=attrs, path=path)
    if repair and repair_csv(study):
        warnings.warn(
            f"{csv_path_for(path)} did not belong to {path} (left by an interrupted run or "
            "changed since); it was rewritten from the result",
            stacklevel=2,
        )
    return study


def _pair_from(
    index: int,
    model_a: str,
    model_b: str,
    info: Mapping[str, Any],
    data: Mapping[str, np.ndarray],
    without: Mapping[str, set[int]],
) -> PairResult:
    la, lb, nb = info["n_layers_a"], info["n_layers_b"], info["n_batches"]
    measures = {
        str(name): data["measure_values"][k, index, :la, :lb]
        for k, name in enumerate(data.get("measure", []))
    }
    optional = {
        name: data[name][index, :la, :lb] if name in data and index not in without[name] else None
        for name in OPTIONAL_LAYER_ARRAYS
    }
    known = {"n_layers_a", "n_layers_b", "n_batches", "diagnostics"}
    known |= {"interval_method", "interval_note"}
    return PairResult(
        model_a=model_a,
        model_b=model_b,
        layers_a=[str(name) for name in data["layer_name_a"][index, :la]],
        layers_b=[str(name) for name in data["layer_name_b"][index, :lb]],
        cka=data["cka"][index, :la, :lb],
        ci_low=data["ci_low"][index, :la, :lb],
        ci_high=data["ci_high"][index, :la, :lb],
        diagnostics=list(info["diagnostics"]),
        hsic_per_batch=data["hsic_per_batch"][index, :nb, :la, :lb],
        self_a_per_batch=data["self_a_per_batch"][index, :nb, :la],
        self_b_per_batch=data["self_b_per_batch"][index, :nb, :lb],
        interval_method=info.get("interval_method"),
        interval_note=info.get("interval_note"),
        info={key: value for key, value in info.items() if key not in known},
        measures=measures,
        **optional,
    )
