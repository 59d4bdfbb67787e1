"""Snakemake `script:` of the report rule: a thin call into ckapipe.workflow.html_report."""

import sys

from ckapipe.workflow.html_report import write_report

snakemake = globals()["snakemake"]  # injected by Snakemake

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    write_report(snakemake.params.plan, snakemake.output.html)
