"""What every ``ckapipe`` command shares: its command class, its options and parameter types.

An option that several commands take (``--seed``, ``--batch-size``, ``--layers``, ``--device``,
``--dtype``, ``--kernel``, ``--threshold``, ``--out``, ``--overwrite``, ...) is defined here once,
so that it has the same name, meaning and validation everywhere; a command passes only the help
text that says what the option does *for it*. Choice lists come from the constants of the
modules that own them (``ckapipe.store.LOGICAL_DTYPES``, ``gram_cache.KERNELS``, ...), read when
a command first needs them, so that ``ckapipe --help`` does not import torch.

Every CLI module ends with ``commands = [...]``; :mod:`ckapipe.cli` registers the commands of
the modules in ``COMMAND_MODULES``, and nothing else registers commands.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from ckapipe.errors import CkapipeError

__all__ = [
    "COMMAND_MODULES",
    "Command",
    "ConstantChoice",
    "DeviceParam",
    "ShapeParam",
    "architectures",
    "choice",
    "codec",
    "command",
    "count",
    "device",
    "dtype",
    "existing_path",
    "forward_batch_size",
    "json_flag",
    "kernel",
    "layers",
    "minibatch_size",
    "out",
    "output_selection",
    "overwrite",
    "seed",
    "threshold",
    "warnings_as_lines",
]

COMMAND_MODULES = (
    "ckapipe.extract.cli",
    "ckapipe.extract.cli_tools",
    "ckapipe.analyze.cli",
    "ckapipe.analyze.cli_study",
    "ckapipe.analyze.cli_plot",
    "ckapipe.cli_run",
    "ckapipe.cli_cache",
)
"""The modules whose ``commands`` list :mod:`ckapipe.cli` registers, in ``--help`` order."""

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


# --------------------------------------------------------------------------- the command class


class Command(click.Command):
    """A ckapipe command: a user's mistake is one ``Error: ...`` line, a warning one line.

    The ``ckapipe`` group converts :class:`~ckapipe.errors.CkapipeError` too; doing it here as
    well keeps the one-line answer when a command is invoked on its own (tests, other groups).
    Warnings raised while the command runs are printed as ``Warning: <message>`` on stderr,
    without Python's source line, which tells a user nothing.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings_as_lines():
                return super().invoke(ctx)
        except CkapipeError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            raise environment_error(error) from None


#: File-system conditions of the user's machine, not bugs: a full disk or quota, no permission,
#: a read-only file system. Any other OSError keeps its traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full; free space or write to another disk (--out)",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere (--out)",
    errno.EACCES: "permission denied; check the path's permissions or write elsewhere",
    errno.EPERM: "operation not permitted; check the path's permissions or write elsewhere",
    errno.EROFS: "the file system is read-only; write to another location (--out)",
}


def environment_error(error: OSError) -> BaseException:
    """One ``Error:`` line for a full disk or a permission problem; other OSErrors unchanged."""
    advice = _ENVIRONMENT_ERRNOS.get(error.errno or -1)
    if advice is None:
        return error
    where = f" ({error.filename})" if error.filename else ""
    return click.ClickException(f"{error.strerror or error}{where}: {advice}")


def command(name: str, **attrs: Any) -> Callable[[Callable[..., Any]], Command]:
    """``click.command`` with the ckapipe :class:`Command` class."""
    return click.command(name, cls=Command, **attrs)  # type: ignore[return-value]


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show each warning raised inside as one ``Warning: ...`` line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # as Python's default filters do: these are for developers, not for a user's terminal
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.simplefilter("ignore", category)
        try:
            yield
        finally:
            for warning in caught:
                click.echo(f"Warning: {warning.message}", err=True)


# --------------------------------------------------------------------------- parameter types


class ConstantChoice(click.Choice):
    """A choice among the values of ``module:NAME``, imported when first needed.

    The owning module decides what is valid (a new kernel there is a new choice here); the
    import waits until a command parses or shows its options, because those modules import
    torch, which would make every ``ckapipe --help`` slow.
    """

    def __init__(self, source: str) -> None:
        self._source = source
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            module, _, name = self._source.partition(":")
            self._choices = tuple(getattr(importlib.import_module(module), name))
        return self._choices

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        self._choices = tuple(value)


class DeviceParam(click.ParamType):
    """A torch device name: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""

    name = "DEVICE"
    _PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value).strip()
        if not self._PATTERN.fullmatch(text):
            self.fail(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N", param, ctx)
        return text


class ShapeParam(click.ParamType):
    """A per-sample shape written as comma-separated positive sizes, e.g. ``3,32,32``."""

    name = "SIZES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            shape = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"expected comma-separated sizes like 3,32,32, got {value!r}", param, ctx)
        if not shape or min(shape) < 1:
            self.fail(f"sizes must be positive, got {value!r}", param, ctx)
        return shape


def _split_commas(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> tuple:
    # `--layers a,b` and `--layers a --layers b` mean the same everywhere
    return tuple(part.strip() for item in value for part in item.split(",") if part.strip())


# --------------------------------------------------------------------------- shared options


def _option(*decls: str, help: str, **attrs: Any) -> Decorator:
    """A click option that shows its default in ``--help`` whenever it has one."""
    attrs.setdefault("show_default", attrs.get("default") is not None and not attrs.get("is_flag"))
    return click.option(*decls, help=help, **attrs)


def seed(help: str, default: int = 0) -> Decorator:
    """``--seed``: a non-negative integer that makes the command's random choices repeatable."""
    return _option("--seed", type=click.IntRange(0, 2**32 - 1), default=default, help=help)


def minibatch_size(default: int = 256) -> Decorator:
    """``--batch-size/-m``: the minibatch size m of a Gram cache (HSIC₁ needs m ≥ 4)."""
    from ckapipe.analyze.interval_settings import DEFAULT_INTERVAL_METHOD, MIN_BATCHES_FOR_INTERVAL

    need = MIN_BATCHES_FOR_INTERVAL[DEFAULT_INTERVAL_METHOD]
    text = (
        "Rows per minibatch m (4 <= m <= n); ignored with --mode full. Confidence intervals "
        f"need enough batches: at least {need} per epoch (n // m >= {need}) for the default "
        f"{DEFAULT_INTERVAL_METHOD}, and more batches give narrower, more reliable intervals."
    )
    # m < 4 is refused by the Gram cache itself, whose message fits the store's n
    return _option("--batch-size", "-m", type=click.IntRange(min=1), default=default, help=text)


def forward_batch_size(help: str, default: int = 64) -> Decorator:
    """``--batch-size``: samples per forward pass of a model."""
    return _option("--batch-size", type=click.IntRange(min=1), default=default, help=help)


def layers(help: str, required: bool = False, metavar: str = "NAME") -> Decorator:
    """``--layers``: repeatable and comma-separated (``--layers a,b`` = ``--layers a --layers b``)."""
    return _option(
        "--layers",
        "layers",
        multiple=True,
        required=required,
        metavar=metavar,
        callback=_split_commas,
        help=help,
    )


def device(help: str = "auto (CUDA when available), cpu, cuda or cuda:N.") -> Decorator:
    """``--device``: where torch computes."""
    return _option("--device", type=DeviceParam(), default="auto", help=help)


def dtype(help: str, default: str) -> Decorator:
    """``--dtype``: the storage dtype of activations (``ckapipe.store.LOGICAL_DTYPES``)."""
    choices = ConstantChoice("ckapipe.store:LOGICAL_DTYPES")
    return _option("--dtype", type=choices, default=default, help=help)


def codec(help: str = "Compression of the store's chunks.") -> Decorator:
    """``--codec``: chunk compression of a store (``ckapipe.store.CODECS``)."""
    choices = ConstantChoice("ckapipe.store:CODECS")
    return _option("--codec", type=choices, default="none", help=help)


def kernel(help: str, default: str | None) -> Decorator:
    """``--kernel``: the CKA kernel (``ckapipe.analyze.gram_cache.KERNELS``)."""
    choices = ConstantChoice("ckapipe.analyze.gram_cache:KERNELS")
    return _option("--kernel", type=choices, default=default, help=help)


def threshold(help: str, default: float | None) -> Decorator:
    """``--threshold``: the RBF bandwidth as a positive multiple of the median distance."""
    positive = click.FloatRange(min=0, min_open=True)
    return _option("--threshold", type=positive, default=default, help=help)


def _parse_architectures(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    declared: dict[str, str] = {}
    for value in values:
        model, sep, name = (part.strip() for part in value.partition("="))
        if not sep or not model or not name:
            raise click.BadParameter(
                f"{value!r} is not MODEL=NAME; write e.g. --architecture mlp_s0=mlp", param=param
            )
        if declared.get(model, name) != name:
            raise click.BadParameter(
                f"model {model!r} is given two architectures ({declared[model]!r} and "
                f"{name!r}); give it one",
                param=param,
            )
        declared[model] = name
    return declared


def architectures(help: str) -> Decorator:
    """``--architecture MODEL=NAME`` (repeatable): declared architectures, as a dict."""
    return _option(
        "--architecture",
        "architectures",
        multiple=True,
        metavar="MODEL=NAME",
        callback=_parse_architectures,
        help=help,
    )


def output_selection() -> Decorator:
    """``--output-index`` and ``--output-key``: which part of a module's output is its output."""
    index = _option(
        "--output-index",
        type=click.IntRange(min=0),
        default=0,
        help="Element of a tuple output that counts as the layer's output.",
    )
    key = _option(
        "--output-key",
        default="last_hidden_state",
        help="Key of a dict output that counts as the layer's output.",
    )
    return lambda function: index(key(function))


def out(
    help: str, required: bool = True, file_okay: bool = True, dir_okay: bool = True
) -> Decorator:
    """``--out``: where the command writes (a path; what kind is in the help)."""
    kind = click.Path(file_okay=file_okay, dir_okay=dir_okay, path_type=Path)
    return _option("--out", "out", type=kind, required=required, help=help)


def overwrite(help: str) -> Decorator:
    """``--overwrite``: replace what is at --out (only ever a file of the same kind)."""
    return _option("--overwrite", is_flag=True, help=help)


def json_flag(help: str) -> Decorator:
    """``--json``: print JSON instead of a table."""
    return _option("--json", "as_json", is_flag=True, help=help)


def existing_path(name: str, **attrs: Any) -> Decorator:
    """A path argument that must exist (``file_okay``/``dir_okay``/``nargs`` as given)."""
    nargs = attrs.pop("nargs", 1)
    metavar = attrs.pop("metavar", None)
    kind = click.Path(exists=True, path_type=Path, **attrs)
    return click.argument(name, type=kind, nargs=nargs, required=True, metavar=metavar)


def count(*decls: str, default: int | None, help: str, minimum: int = 0) -> Decorator:
    """An integer option of at least ``minimum`` (how many workers, replicates, rows, ...)."""
    return _option(*decls, type=click.IntRange(min=minimum), default=default, help=help)


def choice(*decls: str, source: str, default: str | None, help: str) -> Decorator:
    """An option whose values are the constant ``source`` (``module:NAME``) of its owner."""
    return _option(*decls, type=ConstantChoice(source), default=default, help=help)
