"""The live view of `ckapipe run` on Snakemake 9's real output: the parser's counts, the two
views, the failure report, the end-of-run job counts and the headline table.

The fixtures under tests/data/ are the captured output of real runs (Snakemake 9.27): the demo
study from scratch (17 jobs) and a two-model study whose second model's factory raises (its
extract job fails; `keep-going` runs the other model's jobs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ckapipe.run import RunOutcome, headline_table
from ckapipe.run_view import (
    LiveView,
    PlainView,
    SnakemakeProgress,
    failure_report,
    format_elapsed,
    log_tail,
)

DATA = Path(__file__).parent / "data"
DEMO = (DATA / "snakemake9_demo_run.log").read_text().splitlines(keepends=True)
FAILED = (DATA / "snakemake9_failed_run.log").read_text().splitlines(keepends=True)
NOTHING = [
    "Building DAG of jobs...\n",
    "Nothing to be done (all requested files are present and up to date).\n",
]
DEMO_PLAN = {
    "demo_data": 1,
    "train": 4,
    "extract": 4,
    "gram": 4,
    "analyze": 1,
    "plot": 1,
    "report": 1,
    "all": 1,
}


class Clock:
    """A fake monotonic clock: one second per line fed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(lines: list[str], progress: SnakemakeProgress, clock: Clock | None = None) -> None:
    for line in lines:
        if clock is not None:
            clock.now += 1.0
        progress.feed(line)
    progress.close()


def test_demo_run_counts_every_job_of_every_rule() -> None:
    progress = SnakemakeProgress()
    events: list[tuple[str, int]] = []
    progress.subscribe(lambda event, job: events.append((event, job.jobid)))
    feed(DEMO, progress)
    assert {rule: counts.planned for rule, counts in progress.rules.items()} == DEMO_PLAN
    assert {rule: counts.done for rule, counts in progress.rules.items()} == DEMO_PLAN
    assert all(c.running == 0 and c.failed == 0 for c in progress.rules.values())
    assert progress.steps == (17, 17) and not progress.failures and not progress.nothing_to_do
    # each of the 17 jobs started once, then finished once
    started = [jobid for event, jobid in events if event == "started"]
    finished = [jobid for event, jobid in events if event == "finished"]
    assert sorted(started) == sorted(finished) == list(range(17))
    assert all(events.index(("started", j)) < events.index(("finished", j)) for j in started)
    # the job blocks' fields: the data job (id 5) and the report (id 1)
    data = progress.jobs[5]
    assert data.rule == "demo_data" and data.state == "done"
    assert data.output == ["results/demo/receipts/demo-data/9168cd013395cf7a.json"]
    assert data.log == ["results/demo/logs/demo_data/9168cd013395cf7a.log"]
    assert data.wildcards == "data_key=9168cd013395cf7a"
    assert progress.jobs[1].output == ["results/demo/report.html"]
    assert progress.shown_rules() == [rule for rule in DEMO_PLAN if rule != "all"]


def test_running_jobs_and_elapsed_time_midway() -> None:
    clock = Clock()
    progress = SnakemakeProgress(clock)
    # up to the second train job's start: the data job is done, two train jobs run
    cut = next(i for i, line in enumerate(DEMO) if "jobid: 9" in line)
    feed(DEMO[: cut + 1], progress, clock)
    train = progress.rules["train"]
    assert (train.planned, train.done, train.running, train.failed) == (4, 0, 2, 0)
    assert progress.rules["demo_data"].done == 1
    first_train = next(i for i, line in enumerate(DEMO) if "jobid: 15" in line)
    assert train.elapsed(clock.now) == pytest.approx(cut - first_train)
    assert progress.rule_line("train", clock.now).split()[:5] == [
        "train",
        "0/4",
        "done",
        "2",
        "running",
    ]


def test_failed_run_names_the_rule_its_job_and_its_log() -> None:
    progress = SnakemakeProgress()
    feed(FAILED, progress)
    (failure,) = progress.failures
    assert (failure.rule, failure.jobid) == ("extract", 4)
    assert failure.log == ["results/failing/logs/extract/33e9c29f3dbf8e28.log"]
    extract, gram = progress.rules["extract"], progress.rules["gram"]
    assert (extract.planned, extract.done, extract.running, extract.failed) == (2, 1, 0, 1)
    assert (gram.planned, gram.done, gram.running, gram.failed) == (2, 1, 0, 0)
    assert progress.rules["analyze"].done == 0 and progress.jobs[4].state == "failed"
    # the failed job's log, printed by Snakemake after the error block, is not a job block
    assert sum(job.state == "done" for job in progress.jobs.values()) == 2


def test_nothing_to_be_done() -> None:
    progress = SnakemakeProgress()
    feed(NOTHING, progress)
    assert progress.nothing_to_do and not progress.jobs and progress.shown_rules() == []


def test_lines_the_parser_does_not_know_change_nothing() -> None:
    progress = SnakemakeProgress()
    feed(["rule x:\n", "    unknown field: 3\n", "random text\n", "    indented text\n"], progress)
    assert progress.jobs == {} and progress.failures == []


def test_plain_view_is_one_line_per_tick_with_what_finished_and_started() -> None:
    clock = Clock()
    progress = SnakemakeProgress(clock)
    out = io.StringIO()
    view = PlainView(progress, out, started=0.0)
    for i, line in enumerate(DEMO):
        if DEMO[i + 1 :][:1] and DEMO[i + 1].startswith("Finished jobid"):
            # Snakemake is silent while its jobs run: the runner's ticks fall there
            view.tick()
        clock.now += 1.0
        progress.feed(line)
    progress.close()
    view.close()
    lines = out.getvalue().splitlines()
    stamps = [line.split("] ", 1)[0] + "]" for line in lines]
    assert all(len(stamp) == 7 and stamp.startswith("[") for stamp in stamps), lines
    events = [line.split("] ", 1)[1] for line in lines]
    assert events[:2] == ["started demo_data", "done demo_data 1/1; started train ×2"]
    assert events[-1] == "done report 1/1"
    # every job but the collecting `all` is reported done once, with its rule's count
    done = [part for event in events for part in event.split("; ") if part.startswith("done ")]
    reported = [item for part in done for item in part.removeprefix("done ").split(", ")]
    assert len(reported) == 16 and not any("all" in line for line in lines)
    assert "extract 4/4" in reported and "gram 4/4" in reported
    assert len(lines) == 17, lines  # one per finished job: each finish starts the next jobs


def test_plain_view_names_a_failed_job_by_its_wildcards() -> None:
    progress = SnakemakeProgress()
    out = io.StringIO()
    PlainView(progress, out, started=0.0)
    feed(FAILED, progress)
    assert "] FAILED extract 33e9c29f3dbf8e28\n" in out.getvalue()


def test_live_view_redraws_in_place() -> None:
    clock = Clock()
    progress = SnakemakeProgress(clock)
    out = io.StringIO()
    view = LiveView(progress, out, started=0.0)
    feed(DEMO, progress, clock)
    view.close()
    text = out.getvalue()
    last = text.rsplit("\x1b[J", 1)[1].splitlines()
    assert [line.split()[0] for line in last[:-1]] == [r for r in DEMO_PLAN if r != "all"]
    assert "extract    4/4 done" in last[2] and "running" not in text.rsplit("\x1b[J", 1)[1]
    assert last[-1].strip().startswith("17/17 jobs,")
    # each redraw moves up over exactly the lines drawn before
    assert "\x1b[8F\x1b[J" in text


def test_failure_report_prints_the_failed_jobs_log_tail(tmp_path: Path) -> None:
    progress = SnakemakeProgress()
    feed(FAILED, progress)
    log = tmp_path / "results/failing/logs/extract/33e9c29f3dbf8e28.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(40)) + "ValueError: broken\n")
    report = failure_report(progress, tmp_path, output_tail=["ignored"])
    assert report[0] == f"FAILED extract 33e9c29f3dbf8e28: last lines of {log}"
    assert report[1:] == [f"  | line {i}" for i in range(26, 40)] + ["  | ValueError: broken"]


def test_failure_report_without_a_failed_job_shows_snakemakes_last_lines(tmp_path: Path) -> None:
    progress = SnakemakeProgress()
    feed(["Building DAG of jobs...\n", "WorkflowError:\n", "bad input function\n"], progress)
    report = failure_report(progress, tmp_path, ["Building DAG of jobs...", "WorkflowError:"])
    assert report == [
        "Snakemake stopped with an error; its last lines:",
        "  | Building DAG of jobs...",
        "  | WorkflowError:",
    ]


def test_log_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert log_tail(tmp_path / "none.log") == []


def test_jobs_line_counts_the_cache_jobs_that_reused_their_entry(tmp_path: Path) -> None:
    progress = SnakemakeProgress()
    feed(DEMO, progress)
    reused = {"demo_data": 1, "train": 4, "extract": 3, "gram": 0}
    seen: dict[str, int] = {}
    for job in sorted(progress.jobs.values(), key=lambda job: job.jobid):
        if job.rule not in reused:
            continue
        (receipt,) = job.output
        path = tmp_path / receipt
        path.parent.mkdir(parents=True, exist_ok=True)
        seen[job.rule] = seen.get(job.rule, 0) + 1
        path.write_text(json.dumps({"path": "x", "reused": seen[job.rule] <= reused[job.rule]}))
    outcome = RunOutcome(0, 83.6, progress=progress, workdir=tmp_path)
    assert outcome.job_counts() == {
        "demo_data": (1, 1),
        "train": (4, 4),
        "gram": (4, 0),
        "extract": (4, 3),
        "analyze": (1, 0),
        "plot": (1, 0),
        "report": (1, 0),
    }
    line = outcome.jobs_line()
    assert "extract 4 (3 reused from cache)" in line and "gram 4," in line
    assert line.startswith("jobs: demo_data 1 (1 reused from cache), train 4 (4 reused")
    assert line.endswith("; 1:23 wall time")


def test_jobs_line_of_a_run_with_nothing_to_do() -> None:
    progress = SnakemakeProgress()
    feed(NOTHING, progress)
    line = RunOutcome(0, 12.0, progress=progress).jobs_line()
    assert line == "jobs: none, every output is up to date; 0:12 wall time"


def test_format_elapsed() -> None:
    assert [format_elapsed(s) for s in (0, 75.9, 3725)] == ["0:00", "1:15", "1:02:05"]


def _pair(cka: list[list[float]], half: float, layers_a: list[str], layers_b: list[str]):
    cka_array = np.array(cka)
    return SimpleNamespace(
        cka=cka_array,
        ci_low=cka_array - half,
        ci_high=cka_array + half,
        layers_a=layers_a,
        layers_b=layers_b,
    )


def test_headline_table_is_aligned_depth_aligned_and_names_the_architectures() -> None:
    nan = float("nan")
    deep = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]
    study = SimpleNamespace(
        provenance={"ci_level": 0.95},
        pairs={
            ("a", "a"): _pair([[1.0, 0.2], [0.2, 1.0]], 0.0, ["x", "y"], ["x", "y"]),
            # same layer names, other architecture: still depth-aligned, never "matched"
            ("a", "long_name"): _pair([[0.3, 0.5], [0.9, 0.1]], 0.02, ["x", "y"], ["x", "y"]),
            ("a", "deep"): _pair(deep, 0.01, ["x", "y"], ["p", "q", "r", "s"]),
            ("a", "broken"): _pair([[nan, nan], [nan, nan]], nan, ["x", "y"], ["x", "y"]),
        },
    )
    architectures = {"a": "mlp", "long_name": "cnn", "deep": "mlp", "broken": None}
    assert headline_table(study, architectures) == [
        "  model A  model B    depth-aligned mean   ± CI  architectures",
        "  a        a                       1.000  0.000  mlp",
        "  a        long_name               0.200  0.020  cnn × mlp",  # (0.3 + 0.1) / 2
        # 2 vs 4 layers: relative depths 1/2, 1 meet layers 2 and 4 of the deeper model
        "  a        deep                    0.500  0.010  mlp",  # (0.2 + 0.8) / 2
        "  a        broken     no depth-aligned layer pair with a finite CKA",
    ]


def _written_demo_result(workdir: Path, recorded: dict[str, str] | None) -> Path:
    """A result where the demo study keeps it (3 of its models, 5 batches of per-batch terms,
    CKA consistent with them), with ``recorded`` architectures or none recorded."""
    from ckapipe.analyze.result import PairResult, StudyResult, write_result

    rng = np.random.default_rng(3)
    layers = ["relu1", "relu2", "relu3"]
    models = ["mlp_s0", "mlp_s1", "cnn_s0"]
    pairs = {}
    for a, b in [("mlp_s0", "mlp_s1"), ("mlp_s0", "cnn_s0"), ("mlp_s1", "cnn_s0")]:
        self_a, self_b = rng.uniform(1, 2, (5, 3)), rng.uniform(1, 2, (5, 3))
        hsic = rng.uniform(0.1, 0.9, (5, 3, 3))
        cka = hsic.sum(0) / np.sqrt(self_a.sum(0)[:, None] * self_b.sum(0)[None, :])
        pairs[(a, b)] = PairResult(
            a, b, layers, layers, cka, cka - 0.01, cka + 0.01,
            hsic_per_batch=hsic, self_a_per_batch=self_a, self_b_per_batch=self_b,
        )  # fmt: skip
    provenance = {"estimator": "minibatch", "ci_level": 0.95, "models": {m: {} for m in models}}
    if recorded is not None:
        provenance["architectures"] = recorded
    out = workdir / "results/demo/gratings/cka.zarr"
    out.parent.mkdir(parents=True)
    write_result(StudyResult(models, pairs, provenance), out, overwrite=False)
    return out


@pytest.mark.parametrize("recorded", [None, {"mlp_s0": "wide", "mlp_s1": "wide", "cnn_s0": "conv"}])
def test_run_summary_tells_within_vs_across_architectures(tmp_path: Path, recorded) -> None:
    from ckapipe.analyze.architecture_summary import architecture_similarity
    from ckapipe.analyze.result import load_result
    from ckapipe.run import run_summary

    result = load_result(_written_demo_result(tmp_path, recorded))
    lines = run_summary(None, workdir=tmp_path)
    # the result's record wins; without one, the demo config's mlp/cnn are used
    architectures = recorded or {"mlp_s0": "mlp", "mlp_s1": "mlp", "cnn_s0": "cnn"}
    within, other = architectures["mlp_s0"], architectures["cnn_s0"]
    across = " × ".join(sorted((within, other)))
    start = lines.index("gratings: per model pair, depth-aligned mean CKA (widest 95% interval "
                        "half-width)")  # fmt: skip
    rows = lines[start + 2 : start + 5]
    for row, ((a, b), pair) in zip(rows, result.pairs.items(), strict=True):
        kinds = [within] if b.startswith("mlp") else across.split()
        assert row.split() == [a, b, f"{np.mean(np.diag(pair.cka)):.3f}", "0.010", *kinds]
    assert lines[start + 5] == (
        "gratings: within vs across architectures, mean of the pairs' depth-aligned means "
        "(95% jackknife interval)"
    )
    table = lines[start + 6 :]
    assert table[0].split() == ["group", "mean", "CKA", "interval"]
    groups = architecture_similarity(result, architectures)
    assert [g.label for g in groups] == [
        f"within {within}", f"across {across}", "all within", "all across", "within − across",
    ]  # fmt: skip
    # within mlp: one model pair, the mean of its diagonal, from the summed per-batch terms
    pair = result.pair("mlp_s0", "mlp_s1")
    hsic, sa, sb = (x.sum(0) for x in (pair.hsic_per_batch, pair.self_a_per_batch,
                                       pair.self_b_per_batch))  # fmt: skip
    assert groups[0].value == pytest.approx(np.mean(np.diag(hsic) / np.sqrt(sa * sb)), rel=1e-12)
    assert len(table) == 1 + len(groups)
    for row, group in zip(table[1:], groups, strict=True):
        value = f"{group.value:+.3f}" if group.kind == "difference" else f"{group.value:.3f}"
        assert group.reason is None  # 5 batches: the jackknife interval is reported
        assert row.split() == [
            *group.label.split(),
            value,
            f"[{group.low:.3f},",
            f"{group.high:.3f}]",
        ]
