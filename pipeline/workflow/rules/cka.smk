# The study: all-pairs CKA per dataset from the Gram caches, then its figures.


rule analyze:
    input:
        grams=analyze_inputs,
    output:
        result=directory(f"{RESULTS}/{{dataset}}/cka.zarr"),
        table=f"{RESULTS}/{{dataset}}/cka.csv",
    params:
        grams=analyze_grams,
        options=analyze_args,
        architectures=analyze_architectures,
    log:
        f"{LOGS}/analyze/{{dataset}}.log",
    threads: THREADS
    resources:
        mem_mb=mem_mb("analyze"),
        runtime=runtime("analyze"),
    conda:
        CONDA_ENV
    shell:
        "ckapipe analyze {params.grams} --out {output.result:q} {params.options} {params.architectures} > {log:q} 2>&1"


rule plot:
    input:
        result=rules.analyze.output.result,
    output:
        plots=directory(f"{RESULTS}/{{dataset}}/plots"),
    params:
        options=plot_args,
    log:
        f"{LOGS}/plot/{{dataset}}.log",
    conda:
        CONDA_ENV
    shell:
        "ckapipe plot {input.result:q} --out {output.plots:q} {params.options} > {log:q} 2>&1"
