# The demo study's own inputs: a generated dataset and models trained on it (both in the cache,
# keyed by their recipe, so every study that asks for the same demo shares them).


rule demo_data:
    output:
        train_images=f"{CACHE}/demo/data/{{data_key}}/train_images.npy",
        train_labels=f"{CACHE}/demo/data/{{data_key}}/train_labels.npy",
        probe_images=f"{CACHE}/demo/data/{{data_key}}/probe_images.npy",
        probe_labels=f"{CACHE}/demo/data/{{data_key}}/probe_labels.npy",
    params:
        out_dir=lambda wildcards, output: Path(output.train_images).parent,
        demo=config["demo"],
    log:
        f"{CACHE}/logs/demo_data/{{data_key}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.demo data --out-dir {params.out_dir:q}"
        " --n-train {params.demo[n_train]} --n-probe {params.demo[n_probe]}"
        " --n-classes {params.demo[n_classes]} --image-size {params.demo[image_size]}"
        " --noise {params.demo[noise]} --seed {params.demo[seed]} > {log:q} 2>&1"


rule train:
    input:
        unpack(train_inputs),
    output:
        weights=f"{CACHE}/demo/models/{{train_key}}/weights.pt",
        metrics=f"{CACHE}/demo/models/{{train_key}}/metrics.json",
    params:
        recipe=train_params,
        data_dir=DEMO_DATA_DIR,
    log:
        f"{CACHE}/logs/train/{{train_key}}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m ckapipe.demo train --factory {params.recipe[factory]:q}"
        " --kwargs {params.recipe[kwargs]:q} --seed {params.recipe[seed]}"
        " --epochs {params.recipe[epochs]} --batch-size {params.recipe[batch_size]}"
        " --learning-rate {params.recipe[learning_rate]} --data-dir {params.data_dir:q}"
        " --weights-out {output.weights:q} --metrics-out {output.metrics:q} > {log:q} 2>&1"
