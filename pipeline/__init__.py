"""ckapipe: Centered Kernel Alignment (CKA) for real studies, from cached activations.

Two stages and a workflow:

1. **extract** (:mod:`ckapipe.extract`) runs each model once over a dataset and writes
   per-layer activations to a chunked zarr store (:mod:`ckapipe.store`).
2. **analyze** (:mod:`ckapipe.analyze`) streams stores back, reduces each to a Gram cache
   and computes unbiased minibatch CKA for every layer pair of every model pair, with
   confidence intervals.
3. **pipeline** (:mod:`ckapipe.workflow`, ``ckapipe run``) orchestrates studies with Snakemake.

The public names below are imported lazily so that ``ckapipe --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC_API: dict[str, str] = {
    # estimator core
    "cka": "ckapipe.analyze.estimators",
    "MinibatchCKA": "ckapipe.analyze.estimators",
    "gram_linear": "ckapipe.analyze.estimators",
    "gram_rbf": "ckapipe.analyze.estimators",
    "hsic0": "ckapipe.analyze.estimators",
    "hsic1": "ckapipe.analyze.estimators",
    "u_center": "ckapipe.analyze.estimators",
    # store format, shared by both stages
    "ActivationStore": "ckapipe.store",
    "LayerRecord": "ckapipe.store",
    "open_store": "ckapipe.store",
    # extract stage
    "ModelSpec": "ckapipe.extract.specs",
    "DatasetSpec": "ckapipe.extract.specs",
    "list_layers": "ckapipe.extract.layers",
    "extract_activations": "ckapipe.extract.extraction",
    "GramRequest": "ckapipe.extract.fused_gram",
    "compare": "ckapipe.extract.compare",
    "import_h5": "ckapipe.extract.h5bridge",
    "export_h5": "ckapipe.extract.h5bridge",
    # analyze stage
    "GramCache": "ckapipe.analyze.gram_cache",
    "build_gram_cache": "ckapipe.analyze.gram_cache",
    "merge_gram_caches": "ckapipe.analyze.gram_cache",
    "analyze_study": "ckapipe.analyze.study",
    "load_result": "ckapipe.analyze.study",
    "StudyResult": "ckapipe.analyze.study",
    "PairResult": "ckapipe.analyze.study",
    "plot_heatmap": "ckapipe.analyze.plots",
    "plot_study_grid": "ckapipe.analyze.plots",
    "plot_correspondence": "ckapipe.analyze.plots",
    "plot_result": "ckapipe.analyze.plots",
    # pipeline
    "run_study": "ckapipe.run",
    "RunOutcome": "ckapipe.run",
    # integrity
    "verify": "ckapipe.verify",
    # errors: every user-facing error derives from CkapipeError
    "CkapipeError": "ckapipe.errors",
    "UsageError": "ckapipe.errors",
    "DataError": "ckapipe.errors",
    "IncompatibleInputsError": "ckapipe.errors",
    "FormatError": "ckapipe.errors",
    "IncompleteError": "ckapipe.errors",
    "WriterLockedError": "ckapipe.errors",
    "IntegrityError": "ckapipe.errors",
}

__all__ = ["__version__", *sorted(_PUBLIC_API)]


def __getattr__(name: str) -> Any:
    module_name = _PUBLIC_API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ckapipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ckapipe.analyze.estimators import (  # noqa: F401
        MinibatchCKA,
        cka,
        gram_linear,
        gram_rbf,
        hsic0,
        hsic1,
        u_center,
    )
    from ckapipe.store import ActivationStore, LayerRecord, open_store  # noqa: F401
