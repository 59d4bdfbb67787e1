"""Every error ckapipe raises for a user's mistake or a damaged file, under one base class.

The command line prints a :class:`CkapipeError` as one line (what is wrong, what to do) and
exits with status 1; any other exception is a bug and keeps its traceback. Library code raises
the most specific class below; each stage's own classes (``StoreError``, ``SpecError``, ...)
derive from these, so ``except ckapipe.CkapipeError`` catches every user-facing error.

Classes that describe bad values also derive from :class:`ValueError`, so code written against
the standard library's conventions keeps working.
"""

from __future__ import annotations

__all__ = [
    "CkapipeError",
    "DataError",
    "FormatError",
    "IncompatibleInputsError",
    "IncompleteError",
    "IntegrityError",
    "UsageError",
    "WriterLockedError",
]


class CkapipeError(Exception):
    """Base of every error that is the user's to fix; its message says what to do."""


class UsageError(CkapipeError, ValueError):
    """An argument, option, spec or config value is invalid (names the field and the value)."""


class DataError(CkapipeError, ValueError):
    """The data cannot give a trustworthy number: NaN/Inf, overflow, too few samples."""


class IncompatibleInputsError(CkapipeError, ValueError):
    """Inputs that must describe the same samples do not (other dataset, order or partition)."""


class FormatError(CkapipeError):
    """A store, Gram cache or result is missing, of another format or version, or misused."""


class IncompleteError(FormatError):
    """A store, Gram cache or result has no completion flag: its writer died or still runs."""


class WriterLockedError(FormatError):
    """Another live process is writing this path (one writer per store, cache or result)."""


class IntegrityError(FormatError):
    """A file of a store, Gram cache or result is missing or damaged (names the array, chunk)."""
