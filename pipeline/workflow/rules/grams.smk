# One Gram cache per store and partition, in the shared cache under its content key. A Gram pass
# is cheap next to extraction and restarts from scratch: the job builds it in a staging folder
# under the cache's job lock and renames it into place, so a Gram cache that exists is complete
# and another study's is never deleted; its Snakemake output is a receipt in the study's folder.
# The job creates {out}, an empty staging folder of its own, before `ckapipe gram` runs: hence
# --overwrite, which lets the Gram cache be written into it (gram refuses any existing --out).
# --threads: the chunk readers too stay within the job's threads, not gram's default of 4.
# A minibatch study of one epoch never runs this rule: its extract jobs write the Gram caches.


rule gram:
    input:
        gram_inputs,
    output:
        receipt=f"{RECEIPTS}/grams/{{gram_key}}.json",
    params:
        store=gram_store,
        partition=gram_args,
        target=lambda wildcards: gram_path(wildcards.gram_key),
    log:
        f"{LOGS}/gram/{{gram_key}}.log",
    threads: THREADS
    resources:
        gpu=gpu_resources(),
        mem_mb=mem_mb("gram"),
        runtime=runtime("gram"),
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.workflow.jobs build --target {params.target:q}"
        " --receipt {output.receipt:q} --source {params.store:q} --"
        " ckapipe gram {params.store:q} {params.partition} --threads {threads}"
        " --out {{out}} --overwrite > {log:q} 2>&1"


# Full mode split into analysis.full_tiles jobs: each tile job builds a partial cache of its
# share of tile rows (`--tiles K/J`) as a cache entry of its own; the merge job joins the J parts
# exactly into the Gram cache entry (same receipt as `gram`, which it replaces) and then deletes
# the parts. Tile receipts are temporary: once merged they go, and a lost Gram cache is rebuilt
# from the tile jobs again.
if TILE_JOBS > 1:

    ruleorder: gram_merge > gram

    rule gram_tile:
        input:
            gram_inputs,
        output:
            receipt=temp(f"{RECEIPTS}/gram-tiles/{{gram_key}}/{{tile}}.json"),
        params:
            store=gram_store,
            partition=gram_args,
            target=lambda wildcards: gram_tile_path(wildcards.gram_key, wildcards.tile),
            jobs=TILE_JOBS,
        log:
            f"{LOGS}/gram_tile/{{gram_key}}.{{tile}}.log",
        wildcard_constraints:
            tile=r"[1-9][0-9]*",
        threads: THREADS
        resources:
            gpu=gpu_resources(),
        conda:
            CONDA_ENV
        shell:
            "python -m ckapipe.workflow.jobs build --target {params.target:q}"
            " --receipt {output.receipt:q} --source {params.store:q} --"
            " ckapipe gram {params.store:q} {params.partition} --threads {threads}"
            " --tiles {wildcards.tile}/{params.jobs} --out {{out}} --overwrite > {log:q} 2>&1"

    rule gram_merge:
        input:
            gram_tile_inputs,
        output:
            receipt=f"{RECEIPTS}/grams/{{gram_key}}.json",
        params:
            store=gram_store,
            parts=gram_tile_parts,
            target=lambda wildcards: gram_path(wildcards.gram_key),
            folder=lambda wildcards: gram_tiles_folder(wildcards.gram_key),
        log:
            f"{LOGS}/gram_merge/{{gram_key}}.log",
        conda:
            CONDA_ENV
        shell:
            "python -m ckapipe.workflow.jobs build --target {params.target:q}"
            " --receipt {output.receipt:q} --source {params.store:q} --"
            " ckapipe merge-grams {params.parts} --out {{out}} --overwrite > {log:q} 2>&1"
            " && rm -rf {params.folder:q}"
