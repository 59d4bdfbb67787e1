# One activation store per model x dataset, in the shared cache under its content key.
#
# The store itself is NOT a Snakemake output: Snakemake deletes outputs before a job runs and when
# it fails, which would throw away an interrupted extraction, or a store another study sharing
# the cache is writing or reading. The job (ckapipe/workflow/jobs.py) holds the store's job lock,
# waits for any live writer, then reuses a complete store of the same content, resumes an
# interrupted one or removes a stale one and extracts afresh; its output is a receipt in the
# study's folder (`ckapipe info --json` of the store), written atomically.
# In a minibatch study of one epoch (FUSED) the same job also writes the store's Gram cache as it
# extracts (`ckapipe extract --gram-out`), under the Gram cache entry's job lock, with a second
# receipt; the gram rule then has nothing to do. The Gram cache keeps its key, so caches built
# either way are shared.


rule extract:
    input:
        unpack(extract_inputs),
    output:
        **extract_outputs(),
    params:
        guard=guard_args,
        fused=fused_args,
        extract=extract_args,
    log:
        f"{LOGS}/extract/{{store_key}}.log",
    threads: extract_threads()
    resources:
        gpu=gpu_resources(),
        mem_mb=mem_mb("extract"),
        runtime=runtime("extract"),
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.workflow.jobs store {params.guard} {params.fused}"
        " --receipt {output.receipt:q}"
        " -- {params.extract} > {log:q} 2>&1"
