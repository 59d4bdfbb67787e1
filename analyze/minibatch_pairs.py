"""Minibatch CKA of every requested model pair from minibatch Gram caches, and its permutation
null.

One self-comparison :class:`~ckapipe.analyze.estimators.MinibatchCKA` over the layers of every
model involved: per batch, one product of the stacked U-centered Grams of all models gives the
HSIC₁ of every layer pair of every model pair; each pair's values are blocks of it. Intervals
over batches (:func:`~ckapipe.analyze.intervals.batch_interval`); p-values from
:class:`PermutationNull`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from ckapipe.analyze.estimators import MinibatchCKA, ratio_cka, stacked_hsic1
from ckapipe.analyze.intervals import (
    DEFAULT_INTERVAL_METHOD,
    batch_interval,
    bootstrap_counts,
    null_threshold,
    permutation_p_value,
)
from ckapipe.analyze.pair_common import (
    WORK_ELEMENTS,
    degenerate_layers,
    interval_record,
    undefined_replicates,
)
from ckapipe.analyze.result import PairResult

if TYPE_CHECKING:
    from ckapipe.analyze.gram_format import GramCache

__all__ = ["PermutationNull", "minibatch_pairs", "stacked_batches"]

# Float64 elements of one read-ahead buffer of stacked Grams (32 MiB): small groups let the
# products start soon after the first batch is read, and keep the reads overlapping them.
READ_ELEMENTS = 1 << 22


def minibatch_pairs(
    caches: Mapping[str, GramCache],
    layers: Mapping[str, list[str]],
    requested: Sequence[tuple[str, str]],
    *,
    ci_level: float,
    n_bootstrap: int,
    n_permutations: int,
    seed: int,
    device: torch.device,
    interval_method: str = DEFAULT_INTERVAL_METHOD,
) -> dict[tuple[str, str], PairResult]:
    """Minibatch CKA of the requested pairs.

    One self-comparison :class:`MinibatchCKA` over the layers of every model involved
    (qualified ``model/layer``): per batch, the Grams of all models are read side by side into
    (ΣL, m, m) (:func:`stacked_batches`) and one (ΣL, m²) @ (m², ΣL) product gives the HSIC₁ of
    every layer pair of every model pair. Each pair's per-batch values are blocks of it.
    """
    used = [name for name in caches if any(name in pair for pair in requested)]
    accumulator = MinibatchCKA([f"{name}/{layer}" for name in used for layer in layers[name]])
    offsets, start = {}, 0
    for name in used:
        offsets[name], start = start, start + len(layers[name])
    null = PermutationNull(requested, layers, n_permutations, seed, device)
    for batch_number, stacked in stacked_batches(caches, used, device):
        accumulator.update_grams(stacked)  # (ΣL, m, m)
        if n_permutations > 0:
            null.update(
                batch_number,
                {name: stacked[offsets[name] : offsets[name] + len(layers[name])] for name in used},
            )
    hsic_all, self_all, _, _ = accumulator.per_batch()  # (B, ΣL, ΣL), (B, ΣL)

    some = next(iter(caches.values()))
    epochs = int((some.partition or {}).get("epochs") or 1)
    counts = None
    if interval_method == "bootstrap" and n_bootstrap > 0 and accumulator.n_batches >= 2:
        counts = bootstrap_counts(accumulator.n_batches, n_bootstrap, np.random.default_rng(seed))
    results = {}
    for a, b in requested:
        rows = slice(offsets[a], offsets[a] + len(layers[a]))
        cols = slice(offsets[b], offsets[b] + len(layers[b]))
        results[(a, b)] = _pair_result(
            a,
            b,
            layers,
            hsic=np.ascontiguousarray(hsic_all[:, rows, cols]),  # (B, La, Lb)
            self_a=np.ascontiguousarray(self_all[:, rows]),  # (B, La)
            self_b=np.ascontiguousarray(self_all[:, cols]),  # (B, Lb)
            ci_level=ci_level,
            interval=n_bootstrap > 0,
            counts=counts,
            interval_method=interval_method,
            epochs=epochs,
            null_cross=null.cross[(a, b)] if n_permutations > 0 else None,
        )
    return results


def _pair_result(
    a: str,
    b: str,
    layers: Mapping[str, list[str]],
    *,
    hsic: np.ndarray,
    self_a: np.ndarray,
    self_b: np.ndarray,
    ci_level: float,
    interval: bool,
    counts: np.ndarray | None,
    interval_method: str,
    epochs: int,
    null_cross: torch.Tensor | None,
) -> PairResult:
    """One pair's CKA, interval (if ``interval``; ``counts``: the bootstrap counts, None below 2
    batches) and permutation p-values (``null_cross`` None: none requested) from its per-batch
    HSIC₁ values."""
    sum_a, sum_b = self_a.sum(axis=0), self_b.sum(axis=0)
    cka = ratio_cka(hsic.sum(axis=0), sum_a, sum_b)
    diagnostics = degenerate_layers(sum_a, sum_b, layers, a, b)
    ci_low = np.full(cka.shape, np.nan)
    ci_high = np.full(cka.shape, np.nan)
    method, note = "none", None
    if not interval:
        note = "no interval requested (n_bootstrap = 0): ci_low/ci_high are NaN"
        diagnostics.append(note)
    else:
        # batch_interval withholds (NaN plus a reason) below the batch count at which its
        # coverage was validated, and for batches of several epochs
        found = batch_interval(
            hsic,
            self_a,
            self_b,
            ci_level,
            method=interval_method,
            counts=counts,
            epochs=epochs,
        )
        ci_low, ci_high = found.low, found.high
        method, note = interval_record(found)
        if found.reason is not None:
            diagnostics.append(found.reason)
        diagnostics += undefined_replicates(found.n_undefined, layers[a], layers[b], a, b)
    p_value = threshold = None
    if null_cross is not None:
        null_cka = ratio_cka(null_cross.cpu().numpy(), sum_a, sum_b)
        p_value = permutation_p_value(cka, null_cka)
        threshold = null_threshold(null_cka)
    return PairResult(
        model_a=a,
        model_b=b,
        layers_a=list(layers[a]),
        layers_b=list(layers[b]),
        cka=cka,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p_value,
        diagnostics=diagnostics,
        null_threshold=threshold,
        interval_method=method,
        interval_note=note,
        hsic_per_batch=hsic,
        self_a_per_batch=self_a,
        self_b_per_batch=self_b,
    )


def stacked_batches(
    caches: Mapping[str, GramCache], used: Sequence[str], device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (batch number, (ΣL, m_b, m_b) float64 U-centered Grams of every model in ``used``,
    model after model) in global batch order.

    Batches are read in groups of equal size, each cache's chunk files straight into its slice
    of one host buffer (no per-batch stacking copy); the next two groups are read on worker
    threads while this one is used, so reading and the products overlap. Three buffers of at
    most about :data:`READ_ELEMENTS` float64 (at least one batch each) take turns: fresh pages
    cost the kernel a zeroing pass as long as the read itself. So a yielded CPU tensor shares
    its buffer, which is refilled once the iteration has moved two groups on: use each batch
    before asking for the next.
    """
    first = caches[used[0]]
    numbers = [int(number) for number in first.batches]
    sizes = [int(size) for size in first.batch_sizes]
    counts = [len(caches[name].layer_names) for name in used]
    groups = _batch_groups(numbers, sizes, sum(counts))
    size_of = dict(zip(numbers, sizes, strict=True))
    spare: list[np.ndarray] = []

    def buffer_for(group: list[int]) -> np.ndarray:
        m = size_of[group[0]]
        shape = (len(group), sum(counts), m, m)
        for index, buffer in enumerate(spare):
            if buffer.shape == shape:
                return spare.pop(index)
        return np.empty(shape)

    def read(group: list[int], buffer: np.ndarray) -> np.ndarray:
        start = 0
        for name, count in zip(used, counts, strict=True):
            caches[name].read_batches_into(group, buffer[:, start : start + count])
            start += count
        return buffer

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckapipe-grams") as pool:
        ahead = deque(pool.submit(read, group, buffer_for(group)) for group in groups[:2])
        done = None
        for index, group in enumerate(groups):
            buffer = ahead.popleft().result()
            if done is not None:
                spare.append(done)  # the consumer has moved past that group
            if index + 2 < len(groups):
                following = groups[index + 2]
                ahead.append(pool.submit(read, following, buffer_for(following)))
            for number, grams in zip(group, buffer, strict=True):
                yield number, torch.from_numpy(grams).to(device)
            done = buffer


def _batch_groups(numbers: list[int], sizes: list[int], n_layers: int) -> list[list[int]]:
    """Consecutive batch numbers of equal size, at most about READ_ELEMENTS float64 a group."""
    groups: list[list[int]] = []
    group_size = None
    for number, size in zip(numbers, sizes, strict=True):
        fits = max(1, READ_ELEMENTS // (n_layers * size * size))
        if groups and size == group_size and len(groups[-1]) < fits:
            groups[-1].append(number)
        else:
            groups.append([number])
            group_size = size
    return groups


class PermutationNull:
    """Σ_b HSIC₁(K_b, P_b L_b P_bᵀ) for P permutations of model b's samples within each batch.

    Permuting samples permutes the rows and columns of a U-centered Gram (Ũ(PLPᵀ) = PŨ(L)Pᵀ),
    so the null is computed from the cached Grams. The self terms do not change under a
    permutation, so only the cross sums are kept: (P, La, Lb) per pair.
    """

    def __init__(
        self,
        requested: Sequence[tuple[str, str]],
        layers: Mapping[str, list[str]],
        n_permutations: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.n_permutations = n_permutations
        self.seed = seed
        self.requested = list(requested)
        self.cross = {
            (a, b): torch.zeros(
                n_permutations, len(layers[a]), len(layers[b]), dtype=torch.float64, device=device
            )
            for a, b in requested
        }

    def update(self, batch_number: int, grams: Mapping[str, torch.Tensor]) -> None:
        if self.n_permutations == 0:
            return
        any_grams = next(iter(grams.values()))
        m = any_grams.shape[-1]
        device = any_grams.device
        rng = np.random.default_rng([self.seed, batch_number])
        perms = torch.from_numpy(np.argsort(rng.random((self.n_permutations, m)), axis=1)).to(
            device
        )
        for model_b in dict.fromkeys(b for _, b in self.requested):
            gb = grams[model_b].to(torch.float64)  # (Lb, m, m)
            lb = gb.shape[0]
            step = max(1, WORK_ELEMENTS // (lb * m * m))
            for start in range(0, self.n_permutations, step):
                p = perms[start : start + step]  # (pc, m)
                pc = p.shape[0]
                # element [l, k, i, j] = Ũ_l[p_k(i), p_k(j)]
                permuted = gb[:, p[:, :, None], p[:, None, :]]  # (Lb, pc, m, m)
                permuted = permuted.transpose(0, 1).reshape(pc * lb, m * m)  # (pc*Lb, m*m)
                for a, b in self.requested:
                    if b != model_b:
                        continue
                    flat_a = grams[a].to(torch.float64).reshape(-1, m * m)  # (La, m*m)
                    cross = stacked_hsic1(flat_a, permuted, m)  # (La, pc*Lb)
                    cross = cross.reshape(-1, pc, lb).transpose(0, 1)  # (pc, La, Lb)
                    self.cross[(a, b)][start : start + pc] += cross
