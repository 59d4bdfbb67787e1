# One self-contained HTML page per study: grid, heatmaps, correspondence curves, accuracies,
# provenance (figures embedded, so the page can be mailed or archived on its own).


rule report:
    input:
        unpack(report_inputs),
    output:
        html=f"{RESULTS}/report.html",
    params:
        plan=report_plan(),
    log:
        f"{LOGS}/report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"
