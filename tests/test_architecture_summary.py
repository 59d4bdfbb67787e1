"""Architecture groups and the within/across-architecture table: the declared architecture wins
over the factory (a seed passed as a constructor argument is not another architecture), the
depth alignment, and every number and interval of the table against a loop-by-loop float64
reference (scipy's t quantile, not ckapipe's); intervals withheld exactly where the rest of
ckapipe withholds them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ckapipe.analyze.architecture_summary import (
    architecture_similarity,
    architectures_from_provenance,
    depth_aligned,
)
from ckapipe.analyze.result import PairResult, StudyResult
from ckapipe.utils import architecture_of, same_architecture


def test_declared_architecture_wins_and_kwargs_do_not_count():
    seed0 = {"factory": "pkg.models:net", "kwargs": {"seed": 0}}
    seed1 = {"factory": "pkg.models:net", "kwargs": {"seed": 1}}
    other = {"factory": "pkg.models:other", "kwargs": {}}
    layers = ["a", "b"]
    # the case: two seeds passed as a constructor argument are one architecture
    assert architecture_of(seed0) == architecture_of(seed1) == "pkg.models:net"
    assert same_architecture(architecture_of(seed0), architecture_of(seed1), layers, layers)
    assert not same_architecture(architecture_of(seed0), architecture_of(other), layers, layers)
    # a declaration overrides the factory, both ways
    assert same_architecture(
        architecture_of(seed0, "resnet"), architecture_of(other, "resnet"), layers, layers
    )
    assert not same_architecture(
        architecture_of(seed0, "a"), architecture_of(seed1, "b"), layers, layers
    )
    # curves need the same layer list, whatever the architecture says
    assert not same_architecture("net", "net", ["a", "b"], ["a", "c"])
    assert architecture_of(None) is None and architecture_of({"kwargs": {}}) is None


def test_depth_alignment():
    np.testing.assert_array_equal(depth_aligned(3, 3), (np.arange(3), np.arange(3)))
    rows, cols = depth_aligned(2, 4)
    np.testing.assert_array_equal(rows, [0, 1])
    np.testing.assert_array_equal(cols, [1, 3])
    rows, cols = depth_aligned(4, 2)  # the same pairs seen from the other model
    np.testing.assert_array_equal(rows, [1, 3])
    np.testing.assert_array_equal(cols, [0, 1])
    rows, cols = depth_aligned(3, 16)
    np.testing.assert_array_equal(cols, [4, 10, 15])  # relative depths 1/3, 2/3, 1
    rows, cols = depth_aligned(1, 5)
    np.testing.assert_array_equal(cols, [4])  # a single layer is the last
    with pytest.raises(ValueError, match="at least one layer"):
        depth_aligned(0, 3)


# ----------------------------------------------------------------------------- the table


def _pair(a, b, la, lb, rng, n_batches, *, null=False):
    """A pair with random per-batch terms (self terms positive, cross terms correlated)."""
    hsic = rng.uniform(0.2, 1.0, size=(n_batches, len(la), len(lb)))
    self_a = rng.uniform(0.8, 1.6, size=(n_batches, len(la)))
    self_b = rng.uniform(0.8, 1.6, size=(n_batches, len(lb)))
    total = hsic.sum(0) / np.sqrt(np.outer(self_a.sum(0), self_b.sum(0)))
    nan = np.full(total.shape, np.nan)
    return PairResult(
        a, b, list(la), list(lb), total, nan, nan.copy(),
        hsic_per_batch=hsic, self_a_per_batch=self_a, self_b_per_batch=self_b,
        null_threshold=rng.uniform(0.0, 0.2, size=total.shape) if null else None,
    )  # fmt: skip


def _study(n_batches, *, null=False, epochs=1, mode="minibatch", seed=0):
    rng = np.random.default_rng(seed)
    short, deep = ["r1", "r2", "r3"], [f"c{i}" for i in range(5)]
    layers = {"mlp0": short, "mlp1": short, "cnn0": deep, "cnn1": deep, "odd": short}
    models = list(layers)
    pairs = {}
    for i, a in enumerate(models):
        for b in models[i:]:
            pairs[(a, b)] = _pair(a, b, layers[a], layers[b], rng, n_batches, null=null)
    provenance = {
        "ci_level": 0.95,
        "mode": mode,
        "partition": {"epochs": epochs},
        "models": {
            name: {"identity": {"model": {"factory": f"pkg:{name[:3]}", "kwargs": {"s": k}}}}
            for k, name in enumerate(models)
        },
    }
    return StudyResult(models=models, pairs=pairs, provenance=provenance)


def _reference(study, members, level=0.95):
    """Mean over model pairs of the mean depth-aligned CKA, its delete-one values and the
    jackknife-t interval, written out with loops."""
    n_batches = next(iter(study.pairs.values())).hsic_per_batch.shape[0]

    def aligned(la, lb):
        # written independently: every layer of the shallower model, nearest relative depth
        if la <= lb:
            return [(k, min(lb - 1, int(np.floor((k + 1) / la * lb + 0.5)) - 1)) for k in range(la)]
        return [(j, k) for k, j in aligned(lb, la)]

    def statistic(drop):
        keep = [b for b in range(n_batches) if b != drop]
        per_pair = []
        for a, b in members:
            pair = study.pairs[(a, b)]
            values = []
            for i, j in aligned(len(pair.layers_a), len(pair.layers_b)):
                h = sum(pair.hsic_per_batch[t, i, j] for t in keep)
                sa = sum(pair.self_a_per_batch[t, i] for t in keep)
                sb = sum(pair.self_b_per_batch[t, j] for t in keep)
                values.append(h / np.sqrt(sa * sb))
            per_pair.append(np.mean(values))
        return float(np.mean(per_pair))

    value = statistic(None)
    deleted = np.array([statistic(b) for b in range(n_batches)])
    return value, deleted


def _interval(value, deleted, level=0.95):
    n = len(deleted)
    se = np.sqrt((n - 1) / n * np.sum((deleted - deleted.mean()) ** 2))
    half = stats.t.ppf((1 + level) / 2, n - 1) * se
    return value - half, value + half


def test_within_and_across_match_the_reference():
    study = _study(n_batches=6)
    architectures = architectures_from_provenance(study)
    assert architectures["mlp0"] == architectures["mlp1"] == "pkg:mlp"  # kwargs differ
    architectures["odd"] = None  # unrecorded: left out
    rows = {row.label: row for row in architecture_similarity(study, architectures)}
    assert list(rows) == [
        "within pkg:mlp",
        "within pkg:cnn",
        "across pkg:cnn × pkg:mlp",
        "all within",
        "all across",
        "within − across",
    ]
    within = [("mlp0", "mlp1"), ("cnn0", "cnn1")]
    across = [("mlp0", "cnn0"), ("mlp0", "cnn1"), ("mlp1", "cnn0"), ("mlp1", "cnn1")]
    expected = {
        "within pkg:mlp": [("mlp0", "mlp1")],
        "within pkg:cnn": [("cnn0", "cnn1")],
        "across pkg:cnn × pkg:mlp": across,
        "all within": within,
        "all across": across,
    }
    for label, members in expected.items():
        value, deleted = _reference(study, members)
        low, high = _interval(value, deleted)
        row = rows[label]
        assert row.reason is None and row.null_threshold is None
        assert row.pairs == tuple(f"{a} vs {b}" for a, b in members)
        np.testing.assert_allclose([row.value, row.low, row.high], [value, low, high], rtol=1e-12)
    # the reported value is the mean of the stored CKA at the aligned entries
    mlp = study.pairs[("mlp0", "cnn0")]
    assert rows["all across"].n_layer_pairs == 4 * 3
    assert np.isclose(
        np.mean([mlp.cka[i, j] for i, j in zip(*depth_aligned(3, 5), strict=True)]),
        _reference(study, [("mlp0", "cnn0")])[0],
    )
    # the difference and its interval, from the delete-one differences
    value_w, deleted_w = _reference(study, within)
    value_a, deleted_a = _reference(study, across)
    low, high = _interval(value_w - value_a, deleted_w - deleted_a)
    difference = rows["within − across"]
    np.testing.assert_allclose(
        [difference.value, difference.low, difference.high],
        [value_w - value_a, low, high],
        rtol=1e-12,
    )


def test_null_threshold_is_the_largest_among_the_averaged_layer_pairs():
    study = _study(n_batches=5, null=True)
    rows = {row.label: row for row in architecture_similarity(study, {"mlp0": "m", "mlp1": "m"})}
    pair = study.pairs[("mlp0", "mlp1")]
    assert list(rows) == ["within m"]
    assert rows["within m"].null_threshold == pytest.approx(np.diagonal(pair.null_threshold).max())


@pytest.mark.parametrize(
    ("n_batches", "epochs", "mode", "reason"),
    [
        (3, 1, "minibatch", "interval withheld: 3 batches < 4 needed"),
        (8, 2, "minibatch", "come from 2 epochs"),
        (1, 1, "full", "full-mode result keeps no per-batch terms"),
    ],
)
def test_intervals_are_withheld_where_every_interval_is(n_batches, epochs, mode, reason):
    study = _study(n_batches=n_batches, epochs=epochs, mode=mode)
    rows = architecture_similarity(study, architectures_from_provenance(study))
    assert rows
    for row in rows:
        assert reason in row.reason
        assert np.isnan(row.low) and np.isnan(row.high)
        assert np.isfinite(row.value)  # the value is still reported


def test_no_rows_without_two_models_of_known_architecture():
    study = _study(n_batches=6)
    assert architecture_similarity(study, {}) == []
    assert architecture_similarity(study, {"mlp0": "x"}) == []
