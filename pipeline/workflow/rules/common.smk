# Helpers of the ckapipe workflow: config loading and validation, the content-keyed plan of
# stores and Gram caches, and the input/params functions the rules call. No rules here.

import json
import re
import shlex
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ckapipe.workflow.config_check import check_config
from ckapipe.workflow.keys import (
    CodeSourceError,
    FileHasher,
    demo_data_dir,
    study_keys,
    trained_model_dir,
)

WORKFLOW_DIR = Path(workflow.current_basedir).parent
CONDA_ENV = str(WORKFLOW_DIR / "environment.yaml")


def _merge(base, override):
    """Recursive dict merge: ``override`` wins; lists and scalars are replaced, not merged."""
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge(merged[name], value)
        else:
            merged[name] = value
    return merged


# Without --configfile (e.g. `snakemake --cores all` at the repository root) the study is the demo.
# A user config *replaces* the demo (no `configfile:` directive: Snakemake would merge the demo's
# models into every study); `--config key=value` alone still tweaks the demo.
if "models" not in config:
    _demo = yaml.safe_load((WORKFLOW_DIR / "config.yaml").read_text())
    _overrides = dict(config)
    config.clear()
    config.update(_merge(_demo, _overrides))

check_config(config)  # every invalid field, by name
validate(config, schema="../schemas/config.schema.yaml")  # fills in the defaults

STUDY = config["study"]
RESULTS = f"results/{STUDY}"
# Snakemake outputs of the cache jobs: receipts in the study's own folder, never the shared cache
# entries themselves (see ckapipe/workflow/jobs.py)
RECEIPTS = f"{RESULTS}/receipts"
LOGS = f"{RESULTS}/logs"
CACHE = config["storage"]["cache_root"].rstrip("/")
ANALYSIS = config["analysis"]
STORAGE = config["storage"]
EXTRACTION = config["extraction"]
HASHER = FileHasher(f"{CACHE}/sha256-index.json")

KEY_PATTERN = "[0-9a-f]{16}"
DATASET_PATTERN = "|".join(re.escape(name) for name in config["datasets"])

# -- the content keys of every cache entry: one computation, shared with `ckapipe cache` ---------
try:
    KEYS = study_keys(config, HASHER, CACHE)
except CodeSourceError as error:
    raise WorkflowError(f"{error} (the cache key covers the source of every callable)") from None
except FileNotFoundError as error:
    raise WorkflowError(str(error)) from None
HASHER.save()

# -- demo dataset and demo-trained models --------------------------------------------------------
DEMO_DATA_KEY = KEYS.demo_data
DEMO_DATA_DIR = demo_data_dir(CACHE, DEMO_DATA_KEY)
DEMO_SPLIT_FILES = {
    split: {kind: f"{DEMO_DATA_DIR}/{split}_{kind}.npy" for kind in ("images", "labels")}
    for split in ("train", "probe")
}
DEMO_DATA_RECEIPT = f"{RECEIPTS}/demo-data/{DEMO_DATA_KEY}.json"
# train key -> recipe (one training job per distinct recipe)
TRAINED = {model.train_key: model.train_recipe for model in KEYS.models.values() if model.train_key}


# -- models and datasets: resolved specs and what their jobs need --------------------------------
def _resolve_model(keys):
    trained = keys.train_key is not None
    return {
        "spec": keys.spec,
        "weights_identity": keys.weights_identity,
        "code": keys.code,
        "metrics": f"{trained_model_dir(CACHE, keys.train_key)}/metrics.json" if trained else None,
        "train_receipt": f"{RECEIPTS}/demo-models/{keys.train_key}.json" if trained else None,
    }


def _resolve_dataset(keys, dataset):
    files = list(dataset.get("files", []))
    if "demo" in dataset:
        inputs = [DEMO_DATA_RECEIPT]
    else:
        inputs = [keys.spec["array"]] if "array" in keys.spec else []
    return {
        "spec": keys.spec,
        "identity": keys.identity,
        "code": keys.code,
        "inputs": inputs + files,
        "limit": dataset.get("limit"),
    }


MODELS = {name: _resolve_model(keys) for name, keys in KEYS.models.items()}
DATASETS = {
    name: _resolve_dataset(keys, config["datasets"][name]) for name, keys in KEYS.datasets.items()
}

PARTITION = KEYS.partition
# A minibatch study of one epoch gets each Gram cache from its extraction (fused: one job per
# model x dataset, and the store is never re-read); more epochs and full mode keep the gram rule.
FUSED = ANALYSIS["mode"] == "minibatch" and ANALYSIS["epochs"] == 1

STORES = {}  # store key -> what to extract
GRAMS = {}  # gram key -> store key
STUDY_GRAMS = {}  # dataset -> [(model name, gram key)] in config order
for (_dataset_name, _model_name), _store in KEYS.stores.items():
    _dataset, _model = DATASETS[_dataset_name], MODELS[_model_name]
    STORES.setdefault(
        _store,
        {
            "model": _model_name,
            "dataset": _dataset_name,
            "model_spec": _model["spec"],
            "train_receipt": _model["train_receipt"],
            "dataset_spec": _dataset["spec"],
            "dataset_inputs": _dataset["inputs"],
            "layers": config["models"][_model_name]["layers"],
            "reduction": config["models"][_model_name]["reduction"],
            "limit": _dataset["limit"],
        },
    )
    _gram = KEYS.grams[_dataset_name, _model_name]
    GRAMS[_gram] = _store
    STUDY_GRAMS.setdefault(_dataset_name, []).append((_model_name, _gram))


def store_path(key):
    return f"{CACHE}/stores/{key}.zarr"


def store_receipt(key):
    return f"{RECEIPTS}/stores/{key}.json"


def gram_receipt(key):
    return f"{RECEIPTS}/grams/{key}.json"


def fused_gram_receipt(store_key):
    # named by the store key: the extract rule that writes it has only that wildcard
    return f"{RECEIPTS}/fused-grams/{store_key}.json"


STORE_GRAMS = {store: gram for gram, store in GRAMS.items()}  # one partition per study


def gram_path(key):
    return f"{CACHE}/grams/{key}.zarr"


# Full mode with analysis.full_tiles = J > 1: job K of J writes a partial Gram cache of its tile
# rows beside the cache entry; the merge job joins them into the entry and removes them.
TILE_JOBS = ANALYSIS.get("full_tiles", 1) if ANALYSIS["mode"] == "full" else 1


def gram_tiles_folder(key):
    return f"{CACHE}/grams/{key}.tiles"


def gram_tile_path(key, tile):
    return f"{gram_tiles_folder(key)}/{tile}-of-{TILE_JOBS}.zarr"


def gram_tile_receipt(key, tile):
    return f"{RECEIPTS}/gram-tiles/{key}/{tile}.json"


# -- input and params functions -----------------------------------------------------------------
def train_inputs(wildcards):
    return {"data": DEMO_DATA_RECEIPT}


def train_params(wildcards):
    recipe = TRAINED[wildcards.train_key]
    return {
        "factory": recipe["factory"],
        "kwargs": json.dumps(recipe["kwargs"], sort_keys=True),
        **recipe["train"],
    }


def extract_inputs(wildcards):
    plan = STORES[wildcards.store_key]
    inputs = {"data": plan["dataset_inputs"]}
    if plan["train_receipt"]:
        inputs["trained"] = plan["train_receipt"]
        # once trained, the weights file too: one edited in the cache re-extracts (the job's
        # guard sees the store's weights hash differ and starts afresh)
        if Path(plan["model_spec"]["weights"]).is_file():
            inputs["weights"] = plan["model_spec"]["weights"]
    elif plan["model_spec"].get("weights"):
        inputs["weights"] = plan["model_spec"]["weights"]
    return inputs


def extract_args(wildcards):
    """Everything after `ckapipe extract`, shell-quoted."""
    plan = STORES[wildcards.store_key]
    args = [
        "--model", json.dumps(plan["model_spec"], sort_keys=True),
        "--dataset", json.dumps(plan["dataset_spec"], sort_keys=True),
    ]
    for layer in plan["layers"]:
        args += ["--layers", layer]
    args += [
        "--reduce", plan["reduction"],
        "--dtype", STORAGE["dtype"],
        "--codec", STORAGE["codec"],
        "--order", STORAGE["order"],
        "--seed", str(STORAGE["order_seed"]),
        "--batch-size", str(EXTRACTION["batch_size"]),
        "--num-workers", str(EXTRACTION["num_workers"]),
        "--device", EXTRACTION["device"],
    ]
    if plan["limit"] is not None:
        args += ["--limit", str(plan["limit"])]
    return shlex.join(args)


def guard_args(wildcards):
    plan = STORES[wildcards.store_key]
    args = ["--store", store_path(wildcards.store_key)]
    if plan["model_spec"].get("weights"):
        args += ["--weights", plan["model_spec"]["weights"]]
    return shlex.join(args)


def extract_outputs():
    """The extract rule's outputs: the store's receipt, and in fused mode its Gram cache's."""
    outputs = {"receipt": f"{RECEIPTS}/stores/{{store_key}}.json"}
    if FUSED:
        outputs["grams"] = fused_gram_receipt("{store_key}")
    return outputs


def fused_args(wildcards):
    """The store job's options that make it also write the store's Gram cache (fused mode)."""
    if not FUSED:
        return ""
    key = wildcards.store_key
    fused = [
        "--gram-batch-size", str(ANALYSIS["batch_size"]),
        "--gram-kernel", ANALYSIS["kernel"],
        "--gram-threshold", str(ANALYSIS["threshold"]),
        "--gram-precision", PARTITION["precision"],
        "--gram-storage", PARTITION["storage"],
        "--gram-seed", str(ANALYSIS["seed"]),
    ]
    return shlex.join(
        [
            "--gram-target", gram_path(STORE_GRAMS[key]),
            "--gram-receipt", fused_gram_receipt(key),
            "--gram-extract-args", shlex.join(fused),
            "--gram-build-args", gram_args(wildcards) + f" --threads {THREADS}",
        ]
    )


def gram_inputs(wildcards):
    return store_receipt(GRAMS[wildcards.gram_key])


def gram_args(wildcards):
    """Everything after `ckapipe gram STORE`, shell-quoted (the partition and kernel)."""
    return shlex.join(
        [
            "--mode", ANALYSIS["mode"],
            "--batch-size", str(ANALYSIS["batch_size"]),
            "--epochs", str(ANALYSIS["epochs"]),
            "--seed", str(ANALYSIS["seed"]),
            "--kernel", ANALYSIS["kernel"],
            "--threshold", str(ANALYSIS["threshold"]),
            "--precision", PARTITION["precision"],
            "--storage", PARTITION["storage"],
            "--device", EXTRACTION["device"],
        ]
    )


def gram_store(wildcards):
    return store_path(GRAMS[wildcards.gram_key])


def gram_tile_inputs(wildcards):
    return [gram_tile_receipt(wildcards.gram_key, tile) for tile in range(1, TILE_JOBS + 1)]


def gram_tile_parts(wildcards):
    """The partial caches of a Gram cache's tile jobs, shell-quoted."""
    tiles = range(1, TILE_JOBS + 1)
    return shlex.join([gram_tile_path(wildcards.gram_key, tile) for tile in tiles])


def analyze_architectures(wildcards):
    """The declared architectures of the dataset's models, as `--architecture MODEL=NAME`
    options: recorded in the result, so that plots and the report read them from it."""
    options = []
    for name, _ in STUDY_GRAMS[wildcards.dataset]:
        if config["models"][name].get("architecture"):
            options += ["--architecture", f"{name}={config['models'][name]['architecture']}"]
    return shlex.join(options)


def analyze_inputs(wildcards):
    if FUSED:
        return [fused_gram_receipt(GRAMS[key]) for _, key in STUDY_GRAMS[wildcards.dataset]]
    return [gram_receipt(key) for _, key in STUDY_GRAMS[wildcards.dataset]]


def analyze_grams(wildcards):
    return shlex.join([gram_path(key) for _, key in STUDY_GRAMS[wildcards.dataset]])


def analyze_args(wildcards):
    """Everything after the Gram caches of `ckapipe analyze`, shell-quoted."""
    pairs = config["pairs"]
    return shlex.join(
        [
            "--names", ",".join(name for name, _ in STUDY_GRAMS[wildcards.dataset]),
            "--estimator", ANALYSIS["estimator"],
            "--ci-level", str(ANALYSIS["ci_level"]),
            "--bootstrap", str(ANALYSIS["n_bootstrap"]),
            "--permutations", str(ANALYSIS["permutations"]),
            "--seed", str(ANALYSIS["seed"]),
            "--pairs", pairs if isinstance(pairs, str) else ",".join(pairs),
            "--measure", ",".join(ANALYSIS.get("measures", ["cka"])),
            "--knn-k", str(ANALYSIS.get("knn_k", 10)),
        ]
    )


def architectures():
    """Each model's architecture: its `architecture:` in the config, else its factory."""
    from ckapipe.utils import architecture_of

    return {
        name: architecture_of(model["spec"], config["models"][name].get("architecture"))
        for name, model in MODELS.items()
    }


def plot_args(wildcards):
    """The declared architectures, as `ckapipe plot --architecture MODEL=NAME` options."""
    return shlex.join(
        [
            option
            for name, model in config["models"].items()
            if model.get("architecture")
            for option in ("--architecture", f"{name}={model['architecture']}")
        ]
    )


def report_inputs(wildcards):
    return {
        "results": expand(f"{RESULTS}/{{dataset}}/cka.zarr", dataset=DATASETS),
        "tables": expand(f"{RESULTS}/{{dataset}}/cka.csv", dataset=DATASETS),
        "plots": expand(f"{RESULTS}/{{dataset}}/plots", dataset=DATASETS),
        "metrics": [model["train_receipt"] for model in MODELS.values() if model["train_receipt"]],
    }


def report_plan():
    """What the report shows besides the results: the study, models, datasets and cache keys."""
    return {
        "study": STUDY,
        "config": config,
        "models": {
            name: {
                "spec": model["spec"],
                "weights_identity": model["weights_identity"],
                "metrics": model["metrics"],
                "architecture": architectures()[name],
            }
            for name, model in MODELS.items()
        },
        "datasets": {
            name: {
                "spec": dataset["spec"],
                "result": f"{RESULTS}/{name}/cka.zarr",
                "table": f"{RESULTS}/{name}/cka.csv",
                "plots": f"{RESULTS}/{name}/plots",
                "caches": {
                    model: {"gram": gram_path(key), "store": store_path(GRAMS[key])}
                    for model, key in STUDY_GRAMS[name]
                },
            }
            for name, dataset in DATASETS.items()
        },
    }


def final_outputs():
    return [f"{RESULTS}/report.html", *expand(f"{RESULTS}/{{dataset}}/cka.csv", dataset=DATASETS)]


def gpu_resources():
    return config["resources"]["gpu"]


def mem_mb(rule):
    """Memory (MB) a heavy job asks the scheduler for: resources.mem_mb.<rule> of the config."""
    return config["resources"]["mem_mb"][rule]


def runtime(rule):
    """Wall-clock minutes a heavy job asks the scheduler for: resources.runtime.<rule>."""
    return config["resources"]["runtime"][rule]


# CPU threads of a heavy job. Declared as the rule's `threads:`, it is what a local run counts
# against --cores and what SLURM allocates (--cpus-per-task); Snakemake exports it to the job as
# OMP_NUM_THREADS/MKL_NUM_THREADS, which torch reads at import, so the job uses what it asked for.
THREADS = config["resources"]["threads"]


def extract_threads():
    # each DataLoader worker is a process of its own (torch gives it one thread), on top of the
    # main process's torch threads
    return THREADS + EXTRACTION["num_workers"]
