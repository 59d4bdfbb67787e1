# One activation store per model x dataset, in the shared cache under its content key.
#
# The store itself is NOT a Snakemake output: Snakemake deletes outputs before a job runs and when
# it fails, which would throw away an interrupted extraction, or a store another study sharing
# the cache is writing or reading. The job (ckapipe/workflow/jobs.py) holds the store's job lock,
# waits for any live writer, then reuses a complete store of the same content, resumes an
# interrupted one or removes a stale one and extracts afresh; its output is a receipt in the
# study's folder (`ckapipe info --json` of the store), written atomically.


rule extract:
    input:
        unpack(extract_inputs),
    output:
        receipt=f"{RECEIPTS}/stores/{{store_key}}.json",
    params:
        guard=guard_args,
        extract=extract_args,
    log:
        f"{LOGS}/extract/{{store_key}}.log",
    threads: extract_threads()
    resources:
        gpu=gpu_resources(),
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.workflow.jobs store {params.guard} --receipt {output.receipt:q}"
        " -- {params.extract} > {log:q} 2>&1"
