# One Gram cache per store and partition, in the shared cache under its content key. A Gram pass
# is cheap next to extraction and restarts from scratch, so its cache is a directory() output:
# Snakemake removes a half-written one.


rule gram:
    input:
        gram_inputs,
    output:
        grams=directory(f"{CACHE}/grams/{{gram_key}}.zarr"),
    params:
        store=gram_store,
        partition=gram_args,
    log:
        f"{CACHE}/logs/gram/{{gram_key}}.log",
    resources:
        gpu=gpu_resources(),
    conda:
        CONDA_ENV
    shell:
        "ckapipe gram {params.store:q} {params.partition} --out {output.grams:q} > {log:q} 2>&1"
