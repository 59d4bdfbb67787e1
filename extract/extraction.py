"""Run a model once over a dataset and stream the selected layers' activations into a store.

Row order. The dataset's n items are written in ``numpy.random.default_rng(seed).permutation(n)``
order (``order="random"``, the default) or in dataset order (``order="dataset"``); ``limit=N``
keeps the first N entries of that order, i.e. a seeded random subset. The order depends only on
the dataset size, the seed, the order and the limit, so every model extracted with them has the
same ``sample_ids``.

Resume. Rows are written one row block at a time (a multiple of the batch size, so batches are
composed identically after a resume) and ``rows_complete`` advances after each block. With
Gram-only layers it advances only to multiples of lcm(batch size, Gram batch size m) (or n),
so that a resume never cuts a Gram batch whose earlier rows of a Gram-only layer were never
stored; the store keeps those layers' per-batch Grams up to there (see
:mod:`ckapipe.extract.fused_gram`). Running
the same extraction again on an interrupted store checks that everything that determines its
contents is unchanged (naming the first field that differs) and continues from
``rows_complete``; the finished store is byte-identical to an uninterrupted run's.

Input fingerprint. ``input_sha256`` is ``h_n`` with ``h_0`` = 32 zero bytes and
``h_i = sha256(h_{i-1} || sha256(sample_i))``, where ``sample_i`` is, for each input tensor of
row i as fed to the model (dict keys sorted): its name, dtype, per-sample shape and raw bytes.
It does not depend on the batch size or device, and changes with any change of preprocessing.
``input_block_sha256`` lists, per row block written, the first 128 bits (hex) of
``sha256(sha256(sample_a) || ... || sha256(sample_b-1))`` over the block's rows ``a:b``.

Inputs are verified before a store is trusted. The dataset spec only names the data (a path, a
factory), so a file replaced under the same name would otherwise be mixed into an interrupted
store or pass for a complete one. A resume re-reads the rows already written (no forward pass)
and compares each row block's digest with ``input_block_sha256``; reusing a complete store
re-reads every row and compares ``input_sha256``. A mismatch raises
:class:`InputsChangedError` naming the first differing row block and leaves the store untouched.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckapipe.errors import IncompatibleInputsError, UsageError
from ckapipe.extract.capture import (
    REDUCTIONS,
    CaptureError,
    LayerCapture,
    autocast_context,
    batch_size_of,
    eval_mode,
    model_failed,
    split_batch,
)
from ckapipe.extract.fused_gram import (
    FusedGramWriter,
    GramRequest,
    check_fits,
    kept_mismatch,
    reuse_or_build,
)
from ckapipe.extract.layers import LayerSelectionError, LayerSelector, resolve_layers
from ckapipe.extract.progress import Progress
from ckapipe.extract.specs import (
    DatasetSpec,
    DatasetSpecLike,
    ModelSpecLike,
    parse_dataset_spec,
    parse_model_spec,
)
from ckapipe.formats import versions
from ckapipe.store import (
    CODECS,
    LOGICAL_DTYPES,
    ActivationStore,
    DtypeRangeError,
    LayerRecord,
    StoreError,
    sample_ids_digest,
)
from ckapipe.utils import json_roundtrip
from ckapipe.utils import resolve_device as _resolve_device

__all__ = [
    "ExtractionError",
    "GramRequest",
    "InputsChangedError",
    "extract_activations",
    "input_sample_digests",
    "resolve_device",
    "sample_order",
]

log = logging.getLogger("ckapipe.extract")

ORDERS = ("random", "dataset")
TARGET_ROWS_PER_BLOCK = 256
MAX_BLOCK_BYTES = 512 * 2**20
BLOCK_DIGEST_HEX = 32  # 128 bits per row block: ample to detect changed data, half the attr size
# attrs that determine a store's contents: a resume must find them unchanged
IDENTITY_FIELDS = (
    "model",
    "weights_sha256",
    "model_state_sha256",
    "dataset",
    "dataset_size",
    "seed",
    "order",
    "limit",
    "batch_size",
    "row_block",
    "reduce",
    "output_index",
    "output_key",
    "autocast",
    "layer_selection",
    "gram_only",  # before "layers", which it changes: the clearer message
    "gram_only_grams",
    "layers",
    "dtype",
    "codec",
    "sample_ids_sha256",
)


class ExtractionError(UsageError):
    """An extraction cannot run as asked (bad argument, mismatched resume, unusable dataset)."""


class InputsChangedError(ExtractionError, IncompatibleInputsError):
    """The dataset's rows differ from those an existing store was extracted from."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else as given (checked)."""
    return _resolve_device(device, error=ExtractionError)


def sample_order(
    n_dataset: int, *, seed: int = 0, order: str = "random", limit: int | None = None
) -> np.ndarray:
    """The dataset indices to extract, in row order (see the module docstring).

    Returns
    -------
    ndarray (n,) int64
    """
    if order not in ORDERS:
        raise ExtractionError(f"order must be one of {ORDERS}, got {order!r}")
    if limit is not None and not 1 <= limit <= n_dataset:
        raise ExtractionError(
            f"limit must be between 1 and the dataset size {n_dataset}, got {limit}"
        )
    if order == "random":
        ids = np.random.default_rng(seed).permutation(n_dataset)
    else:
        ids = np.arange(n_dataset)
    return np.asarray(ids[:limit] if limit is not None else ids, dtype=np.int64)


def input_sample_digests(model_input: Any) -> list[bytes]:
    """Per-sample SHA-256 digests of a batch as fed to the model (tensor or dict of tensors).

    Hashed in the calling thread over views of each row's bytes (no copy): hashing threads
    would compete with the forward pass for the same cores.
    """
    tensors = (
        [("", model_input)]
        if isinstance(model_input, torch.Tensor)
        else [
            (key, value)
            for key, value in sorted(model_input.items())
            if isinstance(value, torch.Tensor)
        ]
    )
    rows = batch_size_of(model_input)
    parts = []
    for key, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        header = f"{key}|{tensor.dtype}|{tuple(tensor.shape[1:])}|".encode()
        # each row's bytes through a uint8 view (numpy has no bfloat16), without a copy; numpy
        # row slices cost far less per row than indexing the tensor
        parts.append((header, tensor.reshape(rows, -1).view(torch.uint8).numpy()))
    digests = []
    for row in range(rows):
        digest = hashlib.sha256()
        for header, data in parts:
            digest.update(header)
            digest.update(data[row])
        digests.append(digest.digest())
    return digests


class _InputDigests:
    """The input fingerprint as rows arrive: the running chain and one digest per row block."""

    def __init__(self, row_block: int, n: int, start: int = 0, chain: bytes = bytes(32)):
        self.row_block = row_block
        self.n = n
        self.rows = start
        self.chain = chain
        self.blocks: list[str] = []  # digests of the blocks completed, from row 0 on
        self._block = hashlib.sha256()

    def add(self, digests: list[bytes]) -> None:
        for digest in digests:
            self.chain = hashlib.sha256(self.chain + digest).digest()
            self._block.update(digest)
            self.rows += 1
            if self.rows % self.row_block == 0 or self.rows == self.n:
                self.blocks.append(self._block.hexdigest()[:BLOCK_DIGEST_HEX])
                self._block = hashlib.sha256()


def _state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state_dict (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}|".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _object_record(obj: Any) -> dict[str, str]:
    cls = type(obj)
    return {"object": f"{cls.__module__}.{cls.__qualname__}"}


def _to_device(model_input: Any, device: torch.device) -> Any:
    non_blocking = device.type == "cuda"
    if isinstance(model_input, torch.Tensor):
        return model_input.to(device, non_blocking=non_blocking)
    return {
        key: value.to(device, non_blocking=non_blocking)
        if isinstance(value, torch.Tensor)
        else value
        for key, value in model_input.items()
    }


def extract_activations(
    model: ModelSpecLike | torch.nn.Module,
    dataset: DatasetSpecLike | torch.utils.data.Dataset,
    *,
    layers: str | Iterable[str],
    out: str | os.PathLike[str],
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    dtype: str = "float16",
    reduce: str = "flatten",
    limit: int | None = None,
    seed: int = 0,
    order: str = "random",
    codec: str | None = None,
    autocast: str | bool | None = None,
    output_index: int = 0,
    output_key: str = "last_hidden_state",
    progress: bool = True,
    row_block: int | None = None,
    gram: GramRequest | None = None,
    gram_only: Iterable[str] = (),
) -> ActivationStore:
    """Extract the selected layers' activations of ``model`` on ``dataset`` into a store at ``out``.

    Parameters
    ----------
    model:
        A model spec (``module:callable``, dict, JSON, ``@file``; see :mod:`ckapipe.extract.specs`)
        or a built ``torch.nn.Module`` (recorded by class name and state_dict hash only).
    dataset:
        A dataset spec, or a map-style dataset object (items: tensor, tuple with the input
        first, or dict of keyword tensors).
    layers:
        Layer selection (names, globs, ``type:NAME``, ``name@K``; see :mod:`ckapipe.extract.layers`).
    out:
        Store directory. If it holds an interrupted store of the same extraction, it is resumed;
        if it holds the same extraction complete, it is returned as is. Either way the rows it
        holds are first re-read from the dataset (no forward pass) and checked against the
        store's input fingerprint: changed data raises :class:`InputsChangedError`.
    batch_size, num_workers:
        DataLoader settings.
    device:
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
    dtype:
        Store dtype: ``float16`` (default; per-feature offset + power-of-two layer scale, see
        :mod:`ckapipe.store`), ``float32`` or ``bfloat16``. A layer float16 cannot hold within
        the stated bound raises :class:`~ckapipe.store.DtypeRangeError` and removes the
        store, so that the same command with ``--dtype float32`` can run.
    reduce:
        ``flatten``, ``mean``, ``cls`` or ``masked_mean`` (see :mod:`ckapipe.extract.capture`).
    limit, seed, order:
        Which samples in which row order (see the module docstring).
    codec:
        ``None``/``"none"`` or ``"zstd"``.
    autocast:
        None (off), ``"float16"``, ``"bfloat16"`` or True (the device's default).
    output_index, output_key:
        Which element of a tuple output / key of a dict output is captured.
    progress:
        Report progress on stderr.
    row_block:
        The store's row block, a multiple of ``batch_size`` (default: about 256 rows, fewer if
        a block of all layers would exceed ~512 MB in float32; a resume keeps the store's).
        Every chunk's height is a multiple of it; each layer is written one whole chunk at a
        time, so resume points are chunk boundaries.
    gram:
        Also build the store's epoch-0 minibatch Gram cache at ``gram.out`` while writing
        (:class:`~ckapipe.extract.fused_gram.GramRequest`): bit-for-bit the cache ``ckapipe
        gram`` builds from the finished store with the same settings, without re-reading it.
    gram_only:
        Selected layers (names as resolved) whose activations are not stored, only their
        fused Grams (needs ``gram``). For wide layers (conv maps) whose raw rows cost more to
        write than to recompute; ``ckapipe gram`` cannot build other caches of them. The store
        keeps their per-batch Grams, so an interrupted run resumes (with the same ``gram``
        settings and ``gram_only`` set; others are refused).

    Returns
    -------
    ActivationStore
        The complete store, open for reading. Rows ``(n, p)`` per layer, in selection order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers < 0:
        raise ExtractionError(f"num_workers must be >= 0, got {num_workers}")
    if dtype not in LOGICAL_DTYPES:
        raise ExtractionError(f"dtype must be one of {LOGICAL_DTYPES}, got {dtype!r}")
    codec = codec or "none"
    if codec not in CODECS:
        raise ExtractionError(f"codec must be one of {CODECS}, got {codec!r}")
    if reduce not in REDUCTIONS:
        raise ExtractionError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if row_block is not None and (row_block < 1 or row_block % batch_size):
        raise ExtractionError(
            f"row_block must be a positive multiple of batch_size {batch_size}, got {row_block}"
        )
    gram_only = [gram_only] if isinstance(gram_only, str) else list(gram_only)
    if gram_only and gram is None:
        raise ExtractionError(
            f"gram_only {gram_only} needs a Gram request (--gram-out): a Gram-only layer's "
            "activations are not stored, so its fused Gram cache is all that is kept"
        )
    if gram is not None and not isinstance(gram, GramRequest):
        raise ExtractionError(f"gram must be a GramRequest, got {type(gram).__name__}")
    out = Path(out)
    if gram is not None and Path(gram.out).exists() and not _holds_complete_store(out):
        # checked before any work: a fresh or resumed extraction builds its Gram cache anew
        raise ExtractionError(
            f"the Gram cache {gram.out} already exists, and {out} holds no complete extraction "
            "it could belong to; remove it or choose another --gram-out"
        )
    torch_device = resolve_device(device)

    # -- model and dataset ------------------------------------------------------------------
    if isinstance(model, torch.nn.Module):
        model_spec, model_record, weights_sha256 = None, _object_record(model), None
        net = model
    else:
        model_spec = parse_model_spec(model)
        model_record, weights_sha256 = model_spec.to_dict(), model_spec.weights_sha256()
        net = model_spec.build()
    if isinstance(dataset, str | Mapping | DatasetSpec):
        dataset_spec = parse_dataset_spec(dataset)
        data = dataset_spec.build()
        dataset_record = dataset_spec.to_dict()
        batch_keys = {"input_index": dataset_spec.input, "keys": dataset_spec.keys}
    else:
        # a dataset object: tuple items have the input first, dict items go in whole
        data, dataset_record = dataset, _object_record(dataset)
        batch_keys = {"input_index": 0, "keys": None}
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ExtractionError(
            f"dataset {type(data).__name__} is not map-style (needs __len__ and __getitem__); "
            "iterable datasets cannot be permuted or resumed"
        )
    n_dataset = len(data)
    if n_dataset == 0:
        raise ExtractionError("the dataset is empty")
    sample_ids = sample_order(n_dataset, seed=seed, order=order, limit=limit)
    selectors = resolve_layers(net, layers)
    state_sha256 = _state_sha256(net)

    original_device = next((p.device for p in net.parameters()), None)
    net.to(torch_device)
    try:
        with eval_mode(net), torch.inference_mode():
            records = _probe(
                net, data, sample_ids, selectors, batch_keys, torch_device,
                reduce=reduce, autocast=autocast, output_index=output_index, output_key=output_key,
            )  # fmt: skip
            unknown = [name for name in gram_only if name not in [r.name for r in records]]
            if unknown:
                raise ExtractionError(
                    f"gram_only names {unknown} are not among the selected layers "
                    f"{[r.name for r in records]}"
                )
            if gram is not None:
                check_fits(gram, len(sample_ids))  # before a store is created for it
            if row_block is None:
                row_block = _stored_row_block(out, batch_size) or _default_row_block(
                    batch_size, sum(r.n_features for r in records)
                )
            identity = json_roundtrip(
                {
                    "model": model_record,
                    "weights_sha256": weights_sha256,
                    "model_state_sha256": state_sha256,
                    "dataset": dataset_record,
                    "dataset_size": n_dataset,
                    "seed": seed,
                    "order": order,
                    "limit": limit,
                    "batch_size": batch_size,
                    "row_block": row_block,
                    "reduce": reduce,
                    "output_index": output_index,
                    "output_key": output_key,
                    "autocast": autocast,
                    "layer_selection": [s.name for s in selectors],
                    "layers": [r.to_dict() for r in records if r.name not in gram_only],
                    "gram_only": [r.name for r in records if r.name in gram_only] or None,
                    # kept in the store per batch, so that an interrupted run can resume
                    "gram_only_grams": gram.kept_record([r.name for r in records])
                    if gram is not None and gram_only
                    else None,
                    "dtype": dtype,
                    "codec": codec,
                    "sample_ids_sha256": sample_ids_digest(sample_ids),
                }
            )
            existed = (out / "zarr.json").is_file()
            store = _open_or_create(
                out, identity, records, sample_ids, dtype, codec, row_block, torch_device
            )
            try:
                inputs = (
                    _verify_inputs(store, data, sample_ids, batch_keys, batch_size, num_workers)
                    if existed
                    else _InputDigests(store.row_block, store.n_samples)
                )
                if store.is_complete:
                    if gram is not None:
                        reuse_or_build(gram, store, torch_device)
                    return store
                with ExitStack() as stack:
                    fused = None
                    if gram is not None:
                        fused = stack.enter_context(
                            FusedGramWriter(gram, store, [r.name for r in records], torch_device)
                        )
                        fused.resume(store.rows_complete)
                    _run(
                        store, inputs, net, data, sample_ids, selectors, batch_keys,
                        torch_device, batch_size=batch_size, num_workers=num_workers, seed=seed,
                        reduce=reduce, autocast=autocast, output_index=output_index,
                        output_key=output_key, progress=progress,
                        on_encoded=fused.add if fused is not None else None,
                    )  # fmt: skip
                    if fused is not None:
                        fused.finish()
            except DtypeRangeError as error:
                # Deterministic for these inputs: a resume would fail at the same rows, and the
                # partial store would block the advised --dtype float32 run on the same --out.
                shutil.rmtree(store.path, ignore_errors=True)  # still under our writer lock
                raise DtypeRangeError(
                    f"{error} [the partial store {out} was removed, since its {dtype} rows can "
                    "never be completed: re-run the same command with --dtype float32]"
                ) from None
            finally:
                store.close()
    finally:
        if original_device is not None and model_spec is None:
            net.to(original_device)
    return ActivationStore.open(out)


def _holds_complete_store(out: Path) -> bool:
    if not (out / "zarr.json").is_file():
        return False
    try:
        return ActivationStore.open(out, allow_incomplete=True, check_chunks=False).is_complete
    except StoreError:
        return False


def _stored_row_block(out: Path, batch_size: int) -> int | None:
    """The row block of an existing store at ``out`` (resume), if it fits ``batch_size``."""
    if not (out / "zarr.json").is_file():
        return None
    try:
        row_block = ActivationStore.open(out, allow_incomplete=True).row_block
    except StoreError:
        return None  # not a store: creating it reports the problem
    return row_block if row_block % batch_size == 0 else None


def _default_row_block(batch_size: int, n_features: int) -> int:
    batches = max(1, TARGET_ROWS_PER_BLOCK // batch_size)
    # the block buffers hold row_block x n_features float32: bound them
    while batches > 1 and batches * batch_size * n_features * 4 > MAX_BLOCK_BYTES:
        batches //= 2
    return batches * batch_size


def _probe(
    net: torch.nn.Module,
    data: Any,
    sample_ids: np.ndarray,
    selectors: list[LayerSelector],
    batch_keys: dict[str, Any],
    device: torch.device,
    **capture_options: Any,
) -> list[LayerRecord]:
    """One forward pass on the first two samples: checks the selection, finds shapes and widths."""
    autocast = capture_options.pop("autocast")
    items = [data[int(i)] for i in sample_ids[:2]]
    try:
        batch = torch.utils.data.default_collate(items)
    except (TypeError, RuntimeError) as error:
        raise ExtractionError(
            f"dataset items ({type(items[0]).__name__}) cannot be batched: {error}; give the "
            "dataset spec a 'transform' that returns tensors of one shape"
        ) from None
    model_input, mask = split_batch(batch, **batch_keys)
    with (
        LayerCapture(net, selectors, **capture_options) as capture,
        autocast_context(device, autocast),
    ):
        try:
            features = capture.run(
                _to_device(model_input, device),
                _to_device(mask, device) if mask is not None else None,
            )
        except (CaptureError, LayerSelectionError):
            raise
        except Exception as error:  # the model's own code failed: most often a wrong input
            raise model_failed(
                error,
                model_input,
                "check that the dataset (and its transform) yields what the model expects",
            ) from error
    return [
        LayerRecord(
            name=name,
            shape=capture.shapes[name],
            reduction=capture_options["reduce"],
            n_features=int(values.shape[1]),
        )
        for name, values in features.items()
    ]


def _open_or_create(
    out: Path,
    identity: dict[str, Any],
    records: list[LayerRecord],
    sample_ids: np.ndarray,
    dtype: str,
    codec: str,
    row_block: int,
    device: torch.device,
) -> ActivationStore:
    if not (out / "zarr.json").is_file():
        attrs = {
            **{
                key: value
                for key, value in identity.items()
                if key not in ("layers", "dtype", "codec", "gram_only_grams")
            },
            "device": str(device),
            "versions": versions(),
            "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        gram_only = identity["gram_only"] or []
        return ActivationStore.create(
            out, layers=[r for r in records if r.name not in gram_only], sample_ids=sample_ids,
            dtype=dtype, codec=codec, attrs=attrs, row_block=row_block,
            gram_only=[r for r in records if r.name in gram_only],
            gram_only_grams=identity["gram_only_grams"],
        )  # fmt: skip
    existing = ActivationStore.open(out, allow_incomplete=True)
    stored = existing.attrs
    for field in IDENTITY_FIELDS:
        if field == "gram_only_grams":
            # absent from stores without kept Grams (older ones: the Gram writer says so)
            if field in stored and stored[field] != identity[field]:
                raise ExtractionError(kept_mismatch(existing, identity[field]))
            continue
        state = "a complete" if existing.is_complete else "an interrupted"
        if field == "gram_only" and stored.get(field) != identity[field]:
            original = ",".join(stored.get(field) or [])
            raise ExtractionError(
                f"{out} holds {state} extraction whose Gram-only layers (--gram-only) are "
                f"{stored.get(field) or []}, but this run's are {identity[field] or []}: a layer "
                "cannot change between stored and Gram-only within one store; re-run with "
                f"{f'--gram-only {original}' if original else 'no --gram-only'} to "
                f"{'reuse' if existing.is_complete else 'resume'} it, or choose another --out"
            )
        if stored.get(field) != identity[field]:
            raise ExtractionError(
                f"{out} holds {state} extraction whose {field!r} is {stored.get(field)!r}, but this "
                f"run's is {identity[field]!r}; re-run with the original settings to "
                f"{'reuse' if existing.is_complete else 'resume'} it, or choose another --out"
            )
    if existing.is_complete:
        log.info(
            "%s already holds this extraction, complete; checking its inputs before reusing it", out
        )
        return existing
    if stored.get("device") != str(device):
        log.warning(
            "%s was started on %s and resumes on %s: float results may differ slightly between "
            "devices, so the store will not be byte-identical to a one-device run",
            out, stored.get("device"), device,
        )  # fmt: skip
    log.info("resuming %s from row %d of %d", out, existing.rows_complete, existing.n_samples)
    return ActivationStore.open_for_resume(out)


def _verify_inputs(
    store: ActivationStore,
    data: Any,
    sample_ids: np.ndarray,
    batch_keys: dict[str, Any],
    batch_size: int,
    num_workers: int,
) -> _InputDigests:
    """Re-read the rows ``store`` holds and check they are the rows it was extracted from.

    Each row block's digest is compared as soon as it is complete, so a change is reported at
    the first differing block without reading further. Returns the fingerprint state after
    those rows: a resume continues from it.
    """
    rows = store.n_samples if store.is_complete else store.rows_complete
    attrs = store.attrs
    inputs = _InputDigests(store.row_block, store.n_samples)
    expected_chain = attrs.get("input_sha256" if store.is_complete else "input_sha256_partial")
    if rows == 0:
        return inputs
    if expected_chain is None:
        if store.is_complete:  # nothing is written on reuse: say so, and return it
            log.warning(
                "%s records no input fingerprint: its inputs cannot be verified", store.path
            )
            return inputs
        raise ExtractionError(
            f"{store.path} records no input fingerprint for its {rows} rows, so they cannot be "
            f"checked against the dataset; delete it (rm -r {store.path}) and re-run this command"
        )
    recorded = attrs.get("input_block_sha256")  # absent in stores of older ckapipe versions
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, sample_ids[:rows].tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    checked = 0
    for batch in loader:
        model_input, _ = split_batch(batch, **batch_keys)
        inputs.add(input_sample_digests(model_input))
        while recorded is not None and checked < len(inputs.blocks):
            if checked >= len(recorded) or inputs.blocks[checked] != recorded[checked]:
                raise _inputs_changed(store, sample_ids, checked)
            checked += 1
    if inputs.rows != rows or inputs.chain.hex() != expected_chain:
        raise _inputs_changed(store, sample_ids, None)
    return inputs


def _inputs_changed(
    store: ActivationStore, sample_ids: np.ndarray, block: int | None
) -> InputsChangedError:
    if block is None:
        where = (
            f"its first {store.rows_complete if not store.is_complete else store.n_samples} rows"
        )
    else:
        a = block * store.row_block
        b = min(a + store.row_block, store.n_samples)
        where = f"rows {a}:{b} (row block {block}, first sample id {int(sample_ids[a])})"
    effect = (
        "reusing it would return activations of the old data"
        if store.is_complete
        else "resuming it would mix rows of the old and the new data in one store"
    )
    return InputsChangedError(
        f"{store.path} was extracted from other inputs than the dataset gives now: {where} hash "
        f"differently than when they were written (dataset {json.dumps(store.attrs.get('dataset'))}"
        f"), so the data or its preprocessing changed; {effect}. To extract the current data, "
        f"delete the store (rm -r {store.path}) and re-run this command, or choose another --out"
    )


class _ChunkWriter:
    """Buffers each layer's rows on the host and writes them to the store in whole chunks.

    A write that covers part of a chunk makes zarr read, patch and rewrite the whole chunk
    (measured ~100x slower than whole-chunk writes for narrow layers, whose chunks hold many row
    blocks), so each layer is flushed at its own chunk boundaries, and at the end.
    ``rows_complete`` advances to the rows every layer holds, with the input fingerprint of
    exactly those rows. Batches never straddle a chunk boundary: chunk rows are multiples of the
    row block, a multiple of the batch size, and writing starts at a multiple of the batch size.
    ``resume_every`` > 1 (a store that keeps the Grams of Gram-only layers) holds
    ``rows_complete`` back to its multiples (or n): lcm(batch size, Gram batch size), so that a
    resume point never cuts a Gram batch (see :mod:`ckapipe.extract.fused_gram`).

    With ``background=True`` the writes (encoding, zarr, the fused Gram cache, ``rows_complete``)
    run on one writer thread, in order, while the next batches' forward passes fill a second
    buffer per layer: for a free core or a GPU. On the CPU the writer also encodes each row
    block (and forms its fused Grams) as soon as its forward passes are done, instead of when
    its chunk is full: a narrow layer's chunk can hold the whole store (a 2048-feature float16
    layer grows to 4096 rows), and encoding it only at the end would leave nothing to overlap.
    The zarr write still waits for the whole chunk. The stored bytes are the same either way:
    the encoding is element-wise once the first row block has fixed a layer's offsets.
    """

    def __init__(
        self,
        store: ActivationStore,
        start: int,
        inputs: _InputDigests,
        pinned: bool,
        on_encoded: Callable[[int, dict[str, np.ndarray]], None] | None = None,
        background: bool = False,
        resume_every: int = 1,
    ):
        self.store = store
        self.resume_every = resume_every
        self.n = store.n_samples
        self.rows_done = start
        self.on_encoded = on_encoded
        layers = [*store.layers, *store.gram_only]
        self.chunk_rows = {record.name: store.chunk_shape(record.name)[0] for record in layers}
        # main thread: the row each layer's active buffer starts at; writer: rows written
        self.started = dict.fromkeys(self.chunk_rows, start)
        self.flushed = dict.fromkeys(self.chunk_rows, start)
        # pinned host buffers let the device→host copies run asynchronously; two per layer
        # when writing in the background (one filled while the other is written)
        self.buffers = {
            record.name: [
                torch.empty(
                    (min(self.chunk_rows[record.name], self.n), record.n_features),
                    dtype=torch.float32,
                    pin_memory=pinned,
                )
                for _ in range(2 if background else 1)
            ]
            for record in layers
        }
        self.active = dict.fromkeys(self.chunk_rows, 0)
        self.inputs = inputs
        # rows written -> (chain, number of block digests) of exactly those rows
        self.fingerprints = {start: (inputs.chain, len(inputs.blocks))}
        self._lock = threading.Lock()  # fingerprints: added by the loop, pruned by the writer
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckapipe-writer")
            if background
            else None
        )
        # encode each row block on the writer as soon as it is captured (CPU only: on a GPU the
        # rows reach the host asynchronously, and waiting for them per block would stall it)
        self.early = background and not pinned
        self.encoded_from = start  # main thread: the first row not yet queued for encoding
        # writer thread, early mode: each stored layer's encoded rows of its unwritten chunk
        # (Gram-only layers are encoded for the fused Grams, never written)
        self.encoded: dict[str, list[np.ndarray]] = {name: [] for name in store.layer_names}
        self._pending: dict[str, Future[None]] = {}  # each layer's last write job
        self._jobs: list[Future[None]] = []  # every queued job, so that close() sees each error
        self._failed = False  # after a failed write no later one may run (rows_complete)

    def slots(self, rows: int) -> dict[str, torch.Tensor]:
        """Each layer's buffer rows for the next batch of ``rows`` rows (filled by the capture)."""
        slots = {}
        for name, buffers in self.buffers.items():
            offset = self.rows_done - self.started[name]
            slots[name] = buffers[self.active[name]][offset : offset + rows]
        return slots

    def advance(self, rows: int) -> None:
        """Count the batch just written into :meth:`slots` as buffered; in early mode, queue the
        encoding of a row block once all its rows are there."""
        self.rows_done += rows
        with self._lock:
            self.fingerprints[self.rows_done] = (self.inputs.chain, len(self.inputs.blocks))
        if self.early and (self.rows_done % self.store.row_block == 0 or self.rows_done == self.n):
            a, b = self.encoded_from, self.rows_done
            values = {
                name: buffers[self.active[name]][a - self.started[name] : b - self.started[name]]
                for name, buffers in self.buffers.items()
            }
            self.encoded_from = b
            self._submit(self._encode_block, a, values)

    def due(self) -> list[str]:
        """Layers whose buffered rows end at a chunk boundary (or at the last row)."""
        return [
            name
            for name, chunk in self.chunk_rows.items()
            if self.rows_done > self.started[name]
            and (self.rows_done % chunk == 0 or self.rows_done == self.n)
        ]

    def flush(self, names: list[str]) -> None:
        """Write the given layers' buffered rows (now, or queued on the writer thread)."""
        values = {
            name: (
                self.started[name],
                self.buffers[name][self.active[name]][: self.rows_done - self.started[name]],
            )
            for name in names
        }
        rows_done = self.rows_done
        for name in names:
            self.started[name] = rows_done
        if self._pool is None:
            self._write(values, rows_done)
            return
        job = self._submit(self._write, values, rows_done)
        for name in names:
            previous = self._pending.get(name)
            self._pending[name] = job
            self.active[name] ^= 1
            if previous is not None:
                previous.result()  # it read the buffer the capture fills next (raises its error)

    def close(self) -> None:
        """Wait for every queued job (raising the first error) and stop the writer thread."""
        if self._pool is None:
            return
        try:
            for job in self._jobs:
                job.result()
        finally:
            self._pool.shutdown(wait=True)  # nothing may write once the caller moves on

    def _submit(self, work: Callable[..., None], *args: Any) -> Future[None]:
        assert self._pool is not None
        self._jobs = [job for job in self._jobs if not job.done() or job.exception() is not None]
        for job in self._jobs:
            if job.done():
                job.result()  # a failed job: stop the extraction now, not after the last batch
        job = self._pool.submit(self._guarded, work, *args)
        self._jobs.append(job)
        return job

    def _guarded(self, work: Callable[..., None], *args: Any) -> None:
        if self._failed:
            return  # queued behind a failed job: the store stays at its resume point
        try:
            work(*args)
        except BaseException:
            self._failed = True
            raise

    def _write(self, values: dict[str, tuple[int, torch.Tensor]], rows_done: int) -> None:
        if self.early:
            for name, (start, _) in values.items():
                if name not in self.encoded:
                    continue  # a Gram-only layer: nothing to write
                blocks, self.encoded[name] = self.encoded[name], []
                rows = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
                with self._store_errors():
                    self.store.write_encoded(start, {name: rows})
        else:
            groups: dict[int, dict[str, np.ndarray]] = {}
            for name, (start, rows) in values.items():
                groups.setdefault(start, {})[name] = rows.numpy()
            for start, group in groups.items():
                with self._store_errors():
                    encoded = self.store.write_rows(start, group, some_layers=True)
                if self.on_encoded is not None:
                    self.on_encoded(start, encoded)  # rows as stored: the fused Gram cache
        self._advance_rows_complete(values, rows_done)

    def _encode_block(self, start: int, values: dict[str, torch.Tensor]) -> None:
        """Early mode: encode rows ``start:start+k`` of every layer, hand them to the fused Gram
        cache, and keep them for the layer's chunk write."""
        captured = {name: rows.numpy() for name, rows in values.items()}
        with self._store_errors():
            encoded = self.store.encode_rows(start, captured)
        for name in self.encoded:
            rows = encoded[name]
            # float32 stores encode to a view of the capture buffer, which the capture reuses
            shared = np.may_share_memory(rows, captured[name])
            self.encoded[name].append(np.array(rows, copy=True) if shared else rows)
        if self.on_encoded is not None:
            self.on_encoded(start, encoded)  # rows as stored: the fused Gram cache

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        try:
            yield
        except DtypeRangeError:
            raise  # the caller removes the store and says so
        except StoreError as error:
            raise type(error)(f"{error} [store {self.store.path} left incomplete]") from None

    def _advance_rows_complete(
        self, values: dict[str, tuple[int, torch.Tensor]], rows_done: int
    ) -> None:
        for name in values:
            self.flushed[name] = rows_done
        complete = min(self.flushed.values())
        if complete != self.n:
            complete -= complete % self.resume_every
        if complete > self.store.rows_complete or complete == self.n:
            with self._lock:
                chain, blocks = self.fingerprints[complete]
                self.fingerprints = {k: v for k, v in self.fingerprints.items() if k >= complete}
            self.store.set_rows_complete(
                complete,
                input_sha256_partial=chain.hex(),
                input_block_sha256=self.inputs.blocks[:blocks],
            )


def _run(
    store: ActivationStore,
    inputs: _InputDigests,
    net: torch.nn.Module,
    data: Any,
    sample_ids: np.ndarray,
    selectors: list[LayerSelector],
    batch_keys: dict[str, Any],
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    reduce: str,
    autocast: str | bool | None,
    output_index: int,
    output_key: str,
    progress: bool,
    on_encoded: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> None:
    """The streaming loop: batches → per-layer host buffers → whole-chunk store writes."""
    n = store.n_samples
    start = inputs.rows
    on_cuda = device.type == "cuda"
    # a writer thread when a core is free of torch's threads (or the model runs on a GPU)
    background = on_cuda or torch.get_num_threads() < (os.cpu_count() or 1)
    kept = store.gram_only_grams
    gram_batch = int(kept["batch_size"]) if kept is not None else 1
    resume_every = math.lcm(batch_size, gram_batch) if kept is not None else 1
    if resume_every > max(batch_size, gram_batch):
        log.warning(
            "%s: with Gram-only layers the resume points are multiples of lcm(batch size %d, "
            "Gram batch size %d) = %d rows; a Gram batch size that divides or is a multiple of "
            "the batch size makes them more frequent",
            store.path, batch_size, gram_batch, resume_every,
        )  # fmt: skip
    writer = _ChunkWriter(
        store, start, inputs, pinned=on_cuda, on_encoded=on_encoded, background=background,
        resume_every=resume_every,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, sample_ids[start:].tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=on_cuda,
        generator=torch.Generator().manual_seed(seed),
    )
    meter = Progress(n, initial=start, label=str(store.path), enabled=progress)
    try:
        with LayerCapture(
            net, selectors, reduce=reduce, output_index=output_index, output_key=output_key
        ) as capture:
            capture.shapes.update(
                {record.name: record.shape for record in [*store.layers, *store.gram_only]}
            )
            for batch in loader:
                model_input, mask = split_batch(batch, **batch_keys)
                rows = batch_size_of(model_input)
                if not on_cuda:
                    # before the forward: on the CPU the model gets this very memory and may
                    # rewrite its input in place (normalization, an in-place first activation)
                    inputs.add(input_sample_digests(model_input))
                with autocast_context(device, autocast):
                    capture.run(
                        _to_device(model_input, device),
                        _to_device(mask, device) if mask is not None else None,
                        out=writer.slots(rows),
                    )
                if on_cuda:
                    # after the forward is queued, overlapping the device's work; the model
                    # runs on a device copy, so the host input is as the dataset gave it
                    inputs.add(input_sample_digests(model_input))
                writer.advance(rows)
                meter.update(rows)
                due = writer.due()
                if due:
                    if on_cuda:
                        # the hooks' copies run on the stream each layer ran on, which a model
                        # may have switched away from the current one
                        torch.cuda.synchronize(device)
                    writer.flush(due)
    except BaseException:
        # no write may run once the caller handles this (it may remove the store); the
        # loop's own error is the one to report
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()  # raises a queued write's error
    meter.close()
    if store.rows_complete != n:
        raise ExtractionError(
            f"the data loader yielded {writer.rows_done} of {n} rows; was the dataset changed?"
        )
    store.mark_complete(input_sha256=inputs.chain.hex())
