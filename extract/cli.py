"""CLI commands of the extract stage (filled in by the extract stage)."""

import click

commands: list[click.Command] = []
