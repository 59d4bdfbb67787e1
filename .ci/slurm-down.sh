#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/slurm-up.sh.
#
# Cancels every job still queued or running (stopping slurmd alone would leave job processes
# behind), then stops slurmd, slurmctld and munged by the pids in their pid files. Safe to run
# when nothing is running. Leaves packages, /etc/slurm/slurm.conf and the munge key in place,
# so a later .ci/slurm-up.sh only starts the daemons again.
set -uo pipefail

RUN_DIR=/run/slurm
log() { echo "slurm-down: $*"; }

[[ $(id -u) -eq 0 ]] || { echo "slurm-down: ERROR: must run as root; try: sudo $0" >&2; exit 1; }

pid_alive() {
    local pid="$1" state
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ "$state" != "Z" && "$state" != "X" ]]
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name="$1" pidfile="$2" pid
    pid=$([[ -r "$pidfile" ]] && tr -dc '0-9' <"$pidfile")
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        log "stopped $name (pid $pid)"
    else
        log "$name not running"
    fi
    rm -f "$pidfile"
}

# Cancel all jobs while the controller is still there to do it, and wait for them to end.
if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs
        for _ in $(seq 60); do
            [[ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
fi

stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
stop_pidfile munged /run/munge/munged.pid
exit 0
