"""CLI commands of the analyze stage (filled in by the analyze stage)."""

import click

commands: list[click.Command] = []
