"""``ckapipe run``: a whole study through Snakemake (filled in by the pipeline stage)."""

import click

commands: list[click.Command] = []
