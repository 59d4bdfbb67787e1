# The study: all-pairs CKA per dataset from the Gram caches, then its figures.


rule analyze:
    input:
        grams=analyze_inputs,
    output:
        result=directory(f"{RESULTS}/{{dataset}}/cka.zarr"),
        table=f"{RESULTS}/{{dataset}}/cka.csv",
    params:
        options=analyze_args,
    log:
        f"{RESULTS}/logs/analyze/{{dataset}}.log",
    conda:
        CONDA_ENV
    shell:
        "ckapipe analyze {input.grams:q} --out {output.result:q} {params.options} > {log:q} 2>&1"


rule plot:
    input:
        result=rules.analyze.output.result,
    output:
        plots=directory(f"{RESULTS}/{{dataset}}/plots"),
    log:
        f"{RESULTS}/logs/plot/{{dataset}}.log",
    conda:
        CONDA_ENV
    shell:
        "ckapipe plot {input.result:q} --out {output.plots:q} > {log:q} 2>&1"
