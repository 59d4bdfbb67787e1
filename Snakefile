# Entry point at the repository root: `snakemake --cores all` runs the demo study; pass
# `--configfile my_study.yaml` for your own. The workflow itself ships inside the package
# (pipeline/workflow/Snakefile, installed as ckapipe.workflow) so that `ckapipe run` works from a
# wheel; this file only includes it.
from snakemake.utils import min_version

min_version("9")


include: "pipeline/workflow/Snakefile"


# Snakemake never picks a rule from an included file as the default target: name it here.
rule study:
    default_target: True
    input:
        rules.all.input,
