"""Snakemake workflow shipped inside the package (rules, config schema, default config)."""
