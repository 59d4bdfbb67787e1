"""A real single-node SLURM cluster for tests: detection, start/stop, and a session fixture.

The cluster is the one ``.ci/slurm-up.sh`` starts (slurmctld + slurmd + munged on 127.0.0.1,
partition ``ci``, node ``localhost``, no accounting). Nothing here fakes SLURM.

Use in a test::

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        args = slurm_cluster.snakemake_args(cpu_only_rules=["extract", "gram"])
        result = slurm_cluster.run([sys.executable, "-m", "snakemake", *args], cwd=tmp_path)
        assert result.returncode == 0, result.output
        for job_id in result.job_ids:
            assert slurm_cluster.job_info(job_id)["JobState"] == "COMPLETED"

Fixture life cycle: if SLURM already answers (CI runs ``.ci/slurm-up.sh`` first), the fixture
uses it. Otherwise it runs ``.ci/slurm-up.sh`` itself (root only; ~2 s when the packages are
installed, ~15 s with the install). Either way the cluster is left running and idle afterwards:
other test sessions on the same machine may be using it (``.ci/slurm-down.sh`` stops it; set
``CKAPIPE_SLURM_STOP=1`` to have the fixture stop a cluster it started itself). If SLURM cannot
be started the tests are skipped with the reason, unless ``CKAPIPE_REQUIRE_SLURM=1`` is set
(CI), which turns that into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "PROFILE_DIR",
    "SlurmCluster",
    "SlurmRun",
    "slurm_available",
    "slurm_cluster",
    "start_slurm",
    "stop_slurm",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
UP_SCRIPT = REPO_ROOT / ".ci" / "slurm-up.sh"
DOWN_SCRIPT = REPO_ROOT / ".ci" / "slurm-down.sh"
#: The shipped profile, found through the installed package (works for wheels and editable installs).
PROFILE_DIR = (
    Path(importlib.util.find_spec("ckapipe").origin).resolve().parent / "profiles" / "slurm"
)
#: What .ci/slurm-up.sh configures.
PARTITION = "ci"
#: Any name works: without accounting, SLURM records the account but does not check it.
ACCOUNT = "ckapipe-ci"

_READY_STATES = ("idle", "mixed", "allocated", "completing")
_SUBMITTED_RE = re.compile(r"submitted with SLURM jobid (\d+)")


def _slurm_env() -> dict[str, str]:
    """Environment for SLURM clients and Snakemake: this interpreter's bin dir first on PATH
    (jobs run ``ckapipe`` and ``python``), and no SLURM_/SBATCH_ variables inherited from an
    enclosing job that would leak options into sbatch."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SNAKEMAKE_PROFILE"
    }
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "/usr/bin:/bin")])
    return env


def slurm_available(timeout: float = 10.0) -> bool:
    """Whether a SLURM controller answers and at least one node can take jobs.

    Parameters
    ----------
    timeout : float
        Seconds to wait for ``sinfo``.

    Returns
    -------
    bool
        True if ``sinfo`` succeeds and some node is idle, mixed, allocated or completing.
    """
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return False
    try:
        # `scontrol ping` answers at once; sinfo retries for ~10 s when no controller is up.
        ping = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=timeout, env=_slurm_env()
        )
        if "is UP" not in ping.stdout:
            return False
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_slurm_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:
        return False
    return any(line.strip().startswith(_READY_STATES) for line in out.stdout.splitlines())


def start_slurm(timeout: float = 300.0) -> tuple[bool, str]:
    """Run ``.ci/slurm-up.sh`` (installs packages if needed, starts the daemons, runs a test job).

    Returns
    -------
    (bool, str)
        Whether the cluster is up, and a message: the script's output, or why it could not run.
    """
    if not UP_SCRIPT.is_file():
        return False, f"{UP_SCRIPT} is missing"
    if os.geteuid() != 0:
        return (
            False,
            "starting SLURM needs root (packages and daemons); run .ci/slurm-up.sh as root",
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return False, "SLURM is not installed and apt-get is not available to install it"
    try:
        out = subprocess.run(
            ["bash", str(UP_SCRIPT)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"{UP_SCRIPT} did not finish within {timeout:.0f} s"
    message = (out.stdout + out.stderr).strip()
    return out.returncode == 0 and slurm_available(), message


def stop_slurm(timeout: float = 60.0) -> str:
    """Run ``.ci/slurm-down.sh`` (cancel all jobs, stop the daemons); returns its output."""
    out = subprocess.run(
        ["bash", str(DOWN_SCRIPT)], capture_output=True, text=True, timeout=timeout
    )
    return (out.stdout + out.stderr).strip()


@dataclass
class SlurmRun:
    """Result of :meth:`SlurmCluster.run`: exit code, combined output, SLURM job ids submitted."""

    returncode: int
    output: str
    timed_out: bool
    job_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running test cluster, handed out by the ``slurm_cluster`` fixture.

    Attributes
    ----------
    profile_dir : Path
        The shipped Snakemake profile (``ckapipe/profiles/slurm``).
    partition, account : str
        The partition jobs land in, and the account name passed to sbatch.
    env : dict
        Environment for subprocesses (Snakemake, ``ckapipe run``): interpreter bin dir first on
        PATH, no inherited SLURM_/SBATCH_ variables.
    started_here : bool
        Whether the fixture started the cluster (it stops it at session end only when
        CKAPIPE_SLURM_STOP=1).
    """

    profile_dir: Path
    partition: str
    account: str
    env: dict[str, str]
    started_here: bool

    def snakemake_args(
        self,
        *,
        jobs: int = 2,
        runtime: int = 10,
        mem_mb: int = 1000,
        cpu_only_rules: Iterable[str] = (),
    ) -> list[str]:
        """Snakemake CLI arguments that run a workflow on this cluster with the shipped profile.

        Parameters
        ----------
        jobs : int
            Most jobs queued or running at once (the node has the VM's CPUs; 2 here).
        runtime, mem_mb : int
            Default minutes and megabytes per job. ``--default-resources`` on the command line
            replaces the profile's whole block, so every default the test needs is given here.
        cpu_only_rules : iterable of str
            Rules declaring ``gpu=1`` to run without a GPU (``--set-resources RULE:gpu=0``): the
            test node has no GPU, and SLURM rejects ``--gpus`` requests it cannot satisfy.

        Notes
        -----
        ``--slurm-status-command squeue`` is essential: this cluster has no accounting, and with
        sacct the executor plugin waits forever without a message. The short status interval
        cuts a 2-job run from ~80 s to ~25 s.
        """
        args = [
            "--executor",
            "slurm",
            "--profile",
            str(self.profile_dir),
            "--jobs",
            str(jobs),
            "--default-resources",
            f"slurm_account={self.account}",
            f"slurm_partition={self.partition}",
            f"runtime={runtime}",
            f"mem_mb={mem_mb}",
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--latency-wait",
            "5",
        ]
        rules = list(cpu_only_rules)
        if rules:
            args += ["--set-resources", *(f"{rule}:gpu=0" for rule in rules)]
        # A single-valued option last: targets written after these args must not be taken
        # as more values of --default-resources or --set-resources.
        return [*args, "--retries", "0"]

    def run(
        self, cmd: Sequence[str], *, cwd: str | os.PathLike[str], timeout: float = 240.0
    ) -> SlurmRun:
        """Run a command (``snakemake ...`` or ``ckapipe run ... -- ...``) against the cluster.

        On timeout the command gets SIGINT (the SLURM executor ignores SIGTERM while it polls),
        then SIGKILL, and every job it submitted is cancelled, so a hung run cannot block the
        node for later tests.

        Returns
        -------
        SlurmRun
            Exit code (-1 on timeout), stdout and stderr combined, and the SLURM job ids the
            output reports as submitted.
        """
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                output, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
            output += (
                f"\n[slurm_cluster] command timed out after {timeout:.0f} s and was interrupted"
            )
        job_ids = self.submitted_job_ids(output)
        if timed_out and job_ids:
            subprocess.run(["scancel", *job_ids], env=self.env, capture_output=True, timeout=30)
        return SlurmRun(
            returncode=-1 if timed_out else proc.returncode,
            output=output,
            timed_out=timed_out,
            job_ids=job_ids,
        )

    @staticmethod
    def submitted_job_ids(snakemake_output: str) -> list[str]:
        """SLURM job ids from Snakemake's "... submitted with SLURM jobid N" log lines."""
        return _SUBMITTED_RE.findall(snakemake_output)

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` fields of one job (JobState, Comment, NumCPUs, TimeLimit, ...).

        Finished jobs stay visible for MinJobAge (300 s on the test cluster). An empty dict
        means SLURM no longer (or never) knew the job.
        """
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        if out.returncode != 0:
            return {}
        pairs = re.findall(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", out.stdout.strip())
        return dict(pairs)


_cluster: SlurmCluster | None = None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterable[SlurmCluster]:
    """A running single-node SLURM cluster (see the module docstring for its life cycle)."""
    global _cluster
    created = False
    if _cluster is None:
        started_here = False
        if not slurm_available():
            ok, message = start_slurm()
            if not ok:
                reason = f"no SLURM cluster could be started: {message[-1500:]}"
                if os.environ.get("CKAPIPE_REQUIRE_SLURM") == "1":
                    pytest.fail(f"CKAPIPE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
                pytest.skip(reason)
            started_here = True
        _cluster = SlurmCluster(
            profile_dir=PROFILE_DIR,
            partition=PARTITION,
            account=ACCOUNT,
            env=_slurm_env(),
            started_here=started_here,
        )
        created = True
    yield _cluster
    if created:
        cluster, _cluster = _cluster, None
        if cluster.started_here and os.environ.get("CKAPIPE_SLURM_STOP") == "1":
            stop_slurm()
