"""Study-config checks that name every invalid field.

``snakemake.utils.validate`` stops at the first schema error; a user fixing a config wants all of
them, each with the dotted path of the field (``analysis.batch_size: 'big' is not of type
'integer'``). :func:`config_errors` lists them; the workflow raises one error holding all, then
lets Snakemake's ``validate`` fill in the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ckapipe.errors import UsageError

__all__ = ["SCHEMA_PATH", "InvalidStudyConfig", "check_config", "config_errors"]

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class InvalidStudyConfig(UsageError):
    """The study config does not satisfy the schema or a cross-field rule."""


def _field_path(error: jsonschema.ValidationError) -> str:
    parts = [str(part) for part in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    # oneOf/anyOf failures say only "not valid under any of the given schemas"; the most specific
    # sub-error says which field is wrong
    path = list(error.absolute_path)
    if error.validator == "oneOf" and len(path) == 2 and path[0] == "models":
        return (
            f"{_field_path(error)}: give either spec.weights (your own weights) or train "
            "(a model the demo trains), not both"
        )
    if error.validator == "oneOf" and len(path) == 2 and path[0] == "datasets":
        return f"{_field_path(error)}: give exactly one of spec (your data) or demo (probe|train)"
    if error.validator in ("oneOf", "anyOf") and error.context:
        deepest = max(error.context, key=lambda sub: len(sub.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return f"{_field_path(deepest)}: {deepest.message}"
    return f"{_field_path(error)}: {error.message}"


def config_errors(config: Mapping[str, Any], schema_path: Path = SCHEMA_PATH) -> list[str]:
    """Every problem with ``config``, one line each, starting with the dotted field path."""
    schema = yaml.safe_load(schema_path.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    messages = sorted({_describe(error) for error in validator.iter_errors(dict(config))})
    if messages:
        return messages
    analysis = config.get("analysis", {})
    mode, estimator = analysis.get("mode", "minibatch"), analysis.get("estimator", "minibatch")
    if (mode == "minibatch") != (estimator == "minibatch"):
        messages.append(
            f"analysis.estimator: {estimator!r} does not go with analysis.mode {mode!r}; use "
            "estimator minibatch with mode minibatch, and debiased or biased with mode full"
        )
    others = [name for name in analysis.get("measures", ["cka"]) if name != "cka"]
    if others and mode != "full":
        messages.append(
            f"analysis.measures: {', '.join(others)} need mode full (the exact n x n Grams; only "
            "cka has a minibatch form); set analysis.mode: full and estimator: debiased"
        )
    if others and analysis.get("gram_storage") == "float32":
        messages.append(
            f"analysis.gram_storage: float32 Grams do not suit {', '.join(others)} (their "
            "rounding, about 1e-7 of the largest entry, looks like extra dimensions to CCA, "
            "Procrustes and regression); set gram_storage: auto or float64, or ask for cka only"
        )
    models = config.get("models", {})
    pairs = config.get("pairs", "all")
    if isinstance(pairs, list):
        for index, pair in enumerate(pairs):
            for name in pair.split(":"):
                if name not in models:
                    messages.append(
                        f"pairs.{index}: unknown model {name!r} in {pair!r}; known models: "
                        f"{', '.join(sorted(models))}"
                    )
    return messages


def check_config(config: Mapping[str, Any], schema_path: Path = SCHEMA_PATH) -> None:
    """Raise :class:`InvalidStudyConfig` listing every invalid field of ``config``."""
    messages = config_errors(config, schema_path)
    if messages:
        listing = "\n  ".join(messages)
        raise InvalidStudyConfig(
            f"invalid study config ({len(messages)} problem(s)):\n  {listing}\n"
            f"Every field is described in {schema_path}."
        )
