# The demo study's own inputs: a generated dataset and models trained on it (both in the cache,
# keyed by their recipe, so every study that asks for the same demo shares them). Each job builds
# its cache entry in a staging folder under the entry's job lock and renames it into place; its
# Snakemake output is a receipt in the study's folder (see ckapipe/workflow/jobs.py).


rule demo_data:
    output:
        receipt=f"{RECEIPTS}/demo-data/{{data_key}}.json",
    params:
        target=DEMO_DATA_DIR,
        demo=config["demo"],
    log:
        f"{LOGS}/demo_data/{{data_key}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.workflow.jobs build --target {params.target:q}"
        " --receipt {output.receipt:q} --"
        " python -m ckapipe.demo data --out-dir {{out}}"
        " --n-train {params.demo[n_train]} --n-probe {params.demo[n_probe]}"
        " --n-classes {params.demo[n_classes]} --image-size {params.demo[image_size]}"
        " --noise {params.demo[noise]} --seed {params.demo[seed]} > {log:q} 2>&1"


rule train:
    input:
        unpack(train_inputs),
    output:
        receipt=f"{RECEIPTS}/demo-models/{{train_key}}.json",
    params:
        recipe=train_params,
        data_dir=DEMO_DATA_DIR,
        target=lambda wildcards: f"{CACHE}/demo/models/{wildcards.train_key}",
    log:
        f"{LOGS}/train/{{train_key}}.log",
    # not resources.threads: training sets torch to 1 thread so that the weights, cached under
    # a key of the recipe alone, do not depend on the thread count
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.workflow.jobs build --target {params.target:q}"
        " --receipt {output.receipt:q} --"
        " python -m ckapipe.demo train --factory {params.recipe[factory]:q}"
        " --kwargs {params.recipe[kwargs]:q} --seed {params.recipe[seed]}"
        " --epochs {params.recipe[epochs]} --batch-size {params.recipe[batch_size]}"
        " --learning-rate {params.recipe[learning_rate]} --data-dir {params.data_dir:q}"
        " --weights-out {{out}}/weights.pt --metrics-out {{out}}/metrics.json > {log:q} 2>&1"
