"""Geometry of a full-mode Gram stored as tiles (numpy only, no torch, no I/O).

The n×n Gram of a layer is cut into a grid of T×T tiles (the last tile row and column are
shorter when T does not divide n). The Gram is symmetric, so only the tiles on and above the
diagonal, (I, J) with I ≤ J, are stored: tile (J, I) is the transpose of tile (I, J). They are
numbered row-major over that upper triangle, so the tiles of consecutive tile rows
[I0, I1) form one contiguous run of numbers: a partial cache of tile rows holds a slice of the
full cache's tiles, and partial caches of disjoint tile-row ranges join by concatenation.

Every tile is stored padded to T×T (zeros outside the Gram), so that one tile is one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

__all__ = ["TileGrid", "parse_tile_job"]


@dataclass(frozen=True)
class TileGrid:
    """The upper-triangle tile grid of an n×n Gram with tiles of ``tile`` rows.

    Parameters
    ----------
    n : samples (rows and columns of the Gram), ≥ 1.
    tile : T, rows and columns of a tile, ≥ 1.
    """

    n: int
    tile: int

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"TileGrid: n must be >= 1, got {self.n!r}")
        if int(self.tile) < 1:
            raise ValueError(f"TileGrid: tile must be >= 1, got {self.tile!r}")

    @property
    def count(self) -> int:
        """Tiles along one side, ⌈n / T⌉."""
        return -(-self.n // self.tile)

    @property
    def n_tiles(self) -> int:
        """Stored tiles: the upper triangle including the diagonal, count·(count+1)/2."""
        return self.count * (self.count + 1) // 2

    def span(self, index: int) -> tuple[int, int]:
        """Sample range [start, stop) of tile row (or column) ``index``."""
        start = index * self.tile
        return start, min(self.n, start + self.tile)

    def first_tile_of_row(self, row: int) -> int:
        """Number of tile (row, row), the first stored tile of tile row ``row``
        (``row = count`` gives ``n_tiles``)."""
        c = self.count
        return row * c - row * (row - 1) // 2

    def number(self, row: int, col: int) -> int:
        """Number of stored tile (row, col), row ≤ col."""
        if not 0 <= row <= col < self.count:
            raise ValueError(
                f"tile ({row}, {col}) is not stored: need 0 <= row <= col < {self.count}"
            )
        return self.first_tile_of_row(row) + (col - row)

    @cached_property
    def pairs(self) -> list[tuple[int, int]]:
        """(row, col) of every stored tile, in storage order."""
        return [(i, j) for i in range(self.count) for j in range(i, self.count)]

    def tiles_of_rows(self, rows: tuple[int, int]) -> tuple[int, int]:
        """Numbers [first, stop) of the stored tiles of tile rows [rows[0], rows[1])."""
        return self.first_tile_of_row(rows[0]), self.first_tile_of_row(rows[1])

    def job_rows(self, job: int, jobs: int) -> tuple[int, int]:
        """Tile rows [start, stop) of job ``job`` (0-based) of ``jobs`` with balanced work.

        Tile row I holds count − I tiles, so equal row counts would give the first job most of
        the work; rows are split where the running tile count crosses job·n_tiles/jobs. A job may
        get no row when jobs > count (start == stop): its partial cache is then not needed.
        """
        if not 0 <= job < jobs:
            raise ValueError(f"job {job} of {jobs}: need 0 <= job < jobs")

        def boundary(k: int) -> int:
            target = k * self.n_tiles / jobs
            row = 0
            while row < self.count and self.first_tile_of_row(row) < target:
                row += 1
            return row

        return boundary(job), boundary(job + 1)


def parse_tile_job(text: str) -> tuple[int, int]:
    """``"K/J"`` (job K of J, 1-based as in a SLURM array ``--array=1-J``) → (K−1, J).

    Raises ``ValueError`` with the rule when the text is malformed or K is out of range.
    """
    head, sep, tail = str(text).partition("/")
    try:
        job, jobs = int(head), int(tail)
    except ValueError:
        job = jobs = 0
    if not sep or jobs < 1 or not 1 <= job <= jobs:
        raise ValueError(f"expected K/J with 1 <= K <= J (e.g. 2/8), got {text!r}")
    return job - 1, jobs
