# One activation store per model x dataset, in the shared cache under its content key.
#
# The store itself is NOT a Snakemake output: Snakemake deletes directory() outputs before a job
# runs and when it fails, which would throw away an interrupted extraction. The output is a
# sentinel beside the store, STORE.json (written by `ckapipe info --json` after the extraction
# completed). Before extracting, the guard keeps an interrupted store of the same content (so that
# `ckapipe extract` resumes it) and removes anything else found there (a stale store).


rule extract:
    input:
        unpack(extract_inputs),
    output:
        sentinel=f"{CACHE}/stores/{{store_key}}.json",
    params:
        guard=guard_args,
        extract=extract_args,
        store=lambda wildcards: store_path(wildcards.store_key),
    log:
        f"{CACHE}/logs/extract/{{store_key}}.log",
    resources:
        gpu=gpu_resources(),
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.workflow.guard {params.guard} > {log:q} 2>&1"
        " && ckapipe extract {params.extract} >> {log:q} 2>&1"
        " && ckapipe info {params.store:q} --json > {output.sentinel:q} 2>> {log:q}"
