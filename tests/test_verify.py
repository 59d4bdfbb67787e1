"""Damage to anything ckapipe wrote is found, never read as zeros: `ckapipe verify` and checked opens."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ckapipe.analyze.gram_cache import build_gram_cache
from ckapipe.analyze.study import analyze_study, csv_path_for
from ckapipe.cli import main
from ckapipe.errors import IntegrityError
from ckapipe.store import ActivationStore, LayerRecord
from ckapipe.verify import verify


def _store(path: Path, *, zeros_layer: bool = True) -> Path:
    """A complete float32 store of 64 rows in 4 row chunks; one layer is all zeros (a dead ReLU)."""
    rng = np.random.default_rng(0)
    layers = [
        LayerRecord("conv", (3, 2, 2), "flatten", 12),
        LayerRecord("dead", (5,), "flatten", 5),
    ]
    with ActivationStore.create(
        path, layers=layers, sample_ids=rng.permutation(64), dtype="float32", row_block=16
    ) as store:
        for start in range(0, 64, 16):
            store.write_rows(
                start,
                {
                    "conv": rng.normal(size=(16, 12)),
                    "dead": np.zeros((16, 5)) if zeros_layer else rng.normal(size=(16, 5)),
                },
            )
            store.set_rows_complete(start + 16)
        store.mark_complete()
    return path


def _chunk_files(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


def _damage(chunk: Path, how: str) -> None:
    data = bytearray(chunk.read_bytes())
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip one bit in the middle of the payload
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))


def test_intact_store_verifies(tmp_path: Path) -> None:
    result = verify(_store(tmp_path / "s"))
    assert result.ok, result.summary()
    assert result.kind == "activation store"
    assert result.chunks.chunks >= 3


def test_all_zero_chunks_are_written(tmp_path: Path) -> None:
    # zarr skips all-fill chunks by default; then an absent file could not be told from damage
    store = _store(tmp_path / "s")
    assert len(_chunk_files(store / "layers" / "dead")) == len(
        _chunk_files(store / "layers" / "conv")
    )


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_verify_finds_damaged_chunk(tmp_path: Path, how: str) -> None:
    store = _store(tmp_path / "s")
    chunk = _chunk_files(store / "layers" / "conv")[-1]
    _damage(chunk, how)
    result = verify(store)
    assert not result.ok
    text = result.summary()
    key = chunk.relative_to(store / "layers" / "conv").as_posix()
    assert "layers/conv" in text and key in text, text
    cli = CliRunner().invoke(main, ["verify", str(store)])
    assert cli.exit_code == 1
    assert cli.output.startswith("DAMAGED") and key in cli.output


def test_open_refuses_deleted_chunk_naming_it(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _damage(_chunk_files(store / "layers" / "dead")[0], "delete")
    with pytest.raises(IntegrityError, match=r"layers/dead.*c/0/0"):
        ActivationStore.open(store)


def test_read_of_flipped_chunk_fails_instead_of_returning_data(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _damage(_chunk_files(store / "layers" / "conv")[0], "flip")
    opened = ActivationStore.open(store)  # a flipped chunk is found on read, not on open
    with pytest.raises(ValueError, match="checksum"):
        opened.read("conv")


def test_verify_reports_incomplete_and_non_zarr(tmp_path: Path) -> None:
    layers = [LayerRecord("conv", (4,), "flatten", 4)]
    with ActivationStore.create(tmp_path / "s", layers=layers, sample_ids=np.arange(8)):
        pass  # never completed
    result = verify(tmp_path / "s")
    assert not result.ok and "no completion flag" in result.summary()
    (tmp_path / "empty").mkdir()
    assert not verify(tmp_path / "empty").ok
    cli = CliRunner().invoke(main, ["verify", str(tmp_path / "empty")])
    assert cli.exit_code == 1 and "not a zarr group" in cli.output


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store, its Gram cache and a study result, all intact (copied before each damage)."""
    root = tmp_path_factory.mktemp("made")
    store = _store(root / "store.zarr", zeros_layer=False)
    cache = root / "cache.zarr"
    build_gram_cache(store, cache, batch_size=16, device="cpu")
    result = root / "result.zarr"
    analyze_study([cache], result, n_bootstrap=0, device="cpu")
    return {"store": store, "cache": cache, "result": result}


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    csv = csv_path_for(source)
    if csv.exists():
        shutil.copyfile(csv, csv_path_for(target))
    return target


@pytest.mark.parametrize("kind", ["cache", "result"])
@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_verify_finds_damage_in_caches_and_results(
    made: dict[str, Path], tmp_path: Path, kind: str, how: str
) -> None:
    intact = _copy(made[kind], tmp_path / f"intact.{kind}.zarr")
    assert verify(intact).ok, verify(intact).summary()
    damaged = _copy(made[kind], tmp_path / f"damaged.{kind}.zarr")
    array_dir = {"cache": damaged / "grams" / "conv", "result": damaged / "cka"}[kind]
    chunk = _chunk_files(array_dir)[0]
    _damage(chunk, how)
    result = verify(damaged)
    assert not result.ok
    name = array_dir.relative_to(damaged).as_posix()
    assert name in result.summary() and chunk.relative_to(array_dir).as_posix() in result.summary()
    assert result.kind == {"cache": "Gram cache", "result": "study result"}[kind]


def test_verify_finds_a_result_csv_from_another_run(made: dict[str, Path], tmp_path: Path) -> None:
    result = _copy(made["result"], tmp_path / "r.zarr")
    csv_path_for(result).write_text("model_a,model_b\nx,y\n")
    verification = verify(result)
    assert not verification.ok and "CSV" in verification.summary()
