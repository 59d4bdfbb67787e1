#!/usr/bin/env bash
# Start a real single-node SLURM cluster on loopback for ckapipe's tests and CI.
#
# What it does (each step is skipped when already done, so running it twice is safe):
#   1. installs the Debian packages slurmctld, slurmd, slurm-client and munge if missing;
#   2. writes a munge key (if none) and /etc/slurm/slurm.conf (node "localhost" at 127.0.0.1,
#      CPUs and memory taken from `slurmd -C`);
#   3. starts munged, slurmctld and slurmd, all bound to 127.0.0.1 only;
#   4. waits until the node is idle and a trivial `srun hostname` job runs; prints timings.
# Exits non-zero with a message saying what failed and where the logs are.
#
# Needs root (it installs packages and starts daemons). Settings, all optional:
#   CKAPIPE_SLURM_TIMEOUT   seconds to wait for the daemons and the first job (default 60)
#   CKAPIPE_SLURM_FORCE=1   overwrite an /etc/slurm/slurm.conf that this script did not write
# Stop everything again with .ci/slurm-down.sh.
set -euo pipefail

TIMEOUT="${CKAPIPE_SLURM_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by ckapipe .ci/slurm-up.sh"
RUN_DIR=/run/slurm                      # pid files; owned by user slurm so slurmctld can manage them
STATE_DIR=/var/lib/slurm/slurmctld      # slurmctld state (job ids, node state)
SPOOL_DIR=/var/lib/slurm/slurmd         # slurmd spool (batch scripts)
LOG_DIR=/var/log/slurm
NODE=localhost
PARTITION=ci

t_start=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "slurm-up: $*"; }
die() {
    echo "slurm-up: ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [[ -r "$f" && -s "$f" ]]; then
            echo "---- last lines of $f ----" >&2
            tail -n 15 "$f" >&2
        fi
    done
    exit 1
}

# A daemon counts as running only if its pid is alive and not a zombie: this VM's init does
# not always reap orphans, and a zombie still answers `kill -0`.
pid_alive() {
    local pid="$1" state
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ "$state" != "Z" && "$state" != "X" ]]
}
pid_from() { if [[ -r "$1" ]]; then tr -dc '0-9' <"$1"; fi; }

# Stop the daemon recorded in a pid file (TERM, then KILL) and remove a stale pid file.
stop_pidfile() {
    local pidfile="$1" pid
    pid=$(pid_from "$pidfile")
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... (DESCRIPTION documents the call)
    local limit="$1"; shift 2
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || return 1
        sleep 0.5
    done
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons); try: sudo $0"

# One setup at a time: parallel test sessions may call this script together.
exec 9>/run/ckapipe-slurm-up.lock
flock -w "$TIMEOUT" 9 || die "another .ci/slurm-up.sh holds /run/ckapipe-slurm-up.lock for over ${TIMEOUT} s"

# srun binds its I/O ports to the address this host's name resolves to (NoInAddrAny).
host_addr=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 { print $1 }')
if [[ "$host_addr" != 127.* ]]; then
    log "warning: host name '$(hostname)' resolves to '${host_addr:-nothing}', not 127.x: srun will listen there"
fi

# ---------------------------------------------------------------- 1. packages
t0=$(date +%s.%N)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    log "packages already installed ($(slurmd -V))"
else
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is not available: install slurmctld slurmd slurm-client munge yourself"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    log "installing ${pkgs[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/tmp/ckapipe-slurm-apt.log 2>&1; then
        apt-get update -qq >>/tmp/ckapipe-slurm-apt.log 2>&1 || die "apt-get update failed (no package mirror reachable?), see /tmp/ckapipe-slurm-apt.log"
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>/tmp/ckapipe-slurm-apt.log 2>&1 \
            || die "apt-get install ${pkgs[*]} failed, see /tmp/ckapipe-slurm-apt.log"
    fi
    log "installed $(slurmd -V) in $(elapsed "$t0") s"
fi
t_install=$(elapsed "$t0")

# ---------------------------------------------------------------- 2. munge
t0=$(date +%s.%N)
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "writing a new munge key"
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
    log "munged already running"
else
    stop_pidfile /run/munge/munged.pid
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    # 9>&-: a daemon must not inherit (and hold forever) the lock of this script
    runuser -u munge -- /usr/sbin/munged 9>&- || die "munged did not start"
    wait_for "$TIMEOUT" munged munge_ok || die "munged started but 'munge -n | unmunge' fails"
    log "started munged (pid $(pid_from /run/munge/munged.pid))"
fi

# ---------------------------------------------------------------- 3. slurm.conf
if [[ -e "$CONF" ]] && ! grep -qF "$MARKER" "$CONF" && [[ "${CKAPIPE_SLURM_FORCE:-0}" != 1 ]]; then
    die "$CONF exists and was not written by this script; refusing to overwrite it (set CKAPIPE_SLURM_FORCE=1 to do so)"
fi
# The node line comes from the hardware slurmd sees (CPUs, sockets, cores, threads, memory).
# RealMemory is capped at 90 % so that the node never drains for "Low RealMemory".
hw=$(slurmd -C | head -n 1) || die "'slurmd -C' failed"
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ -n "$real_mem" ]] || die "cannot read RealMemory from 'slurmd -C': $hw"
mem=$(( real_mem * 9 / 10 ))
hw_fields=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')

install -d -m 0755 "$CONF_DIR"
install -d -o slurm -g slurm -m 0755 "$RUN_DIR" "$STATE_DIR" "$LOG_DIR"
install -d -m 0755 "$SPOOL_DIR"

new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
$MARKER
# A single-node cluster on loopback for tests; not for production use.
ClusterName=ckapipe
SlurmctldHost=$NODE(127.0.0.1)
# Bind every daemon (and srun's I/O ports) to the address its host name resolves to: 127.0.0.1.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on this VM: track processes through /proc and do no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# No accounting daemon. sacct then fails, so Snakemake's SLURM executor must be told
# --slurm-status-command squeue; squeue sees finished jobs for MinJobAge seconds (keep >= 120).
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 ${hw_fields}RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF (node: ${hw_fields}RealMemory=$mem)"
fi

# ---------------------------------------------------------------- 4. daemons
ctld_pid() { pid_from "$RUN_DIR/slurmctld.pid"; }
slurmd_pid() { pid_from "$RUN_DIR/slurmd.pid"; }
ctld_ok() { pid_alive "$(ctld_pid)" && scontrol ping 2>/dev/null | grep -q "is UP"; }
slurmd_ok() { pid_alive "$(slurmd_pid)"; }
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }

if (( conf_changed )); then
    # A new node or partition definition needs fresh daemons.
    stop_pidfile "$RUN_DIR/slurmd.pid"
    stop_pidfile "$RUN_DIR/slurmctld.pid"
fi

if ctld_ok; then
    log "slurmctld already running (pid $(ctld_pid))"
else
    stop_pidfile "$RUN_DIR/slurmctld.pid"
    # -c: start with no saved jobs. A controller that has to be (re)started here lost track of
    # its jobs anyway, and state saved just before a crash can resurrect finished jobs as
    # "running" forever, holding CPUs of the only node.
    slurmctld -c 9>&- || die "slurmctld did not start"
    wait_for "$TIMEOUT" slurmctld ctld_ok || die "slurmctld started but 'scontrol ping' does not report it UP"
    log "started slurmctld (pid $(ctld_pid))"
fi

if slurmd_ok; then
    log "slurmd already running (pid $(slurmd_pid))"
else
    stop_pidfile "$RUN_DIR/slurmd.pid"
    slurmd -N "$NODE" 9>&- || die "slurmd did not start"
    wait_for "$TIMEOUT" slurmd slurmd_ok || die "slurmd exited right after start"
    log "started slurmd (pid $(slurmd_pid))"
fi

# A node left "down"/"drained" by an earlier run comes back with state=resume.
state=$(node_state)
case "$state" in
    down* | drain* | fail*) scontrol update nodename="$NODE" state=resume || true ;;
esac
node_ready() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]; }
wait_for "$TIMEOUT" "node idle" node_ready || die "node $NODE is '$(node_state)', not idle, after ${TIMEOUT} s (scontrol show node $NODE: $(scontrol show node "$NODE" | grep -E 'State|Reason' | tr -s ' '))"
t_daemons=$(elapsed "$t0")

# ---------------------------------------------------------------- 5. a trivial job
# sinfo can show the node idle before slurmd registered, so retry the first job.
t0=$(date +%s.%N)
deadline=$(( $(date +%s) + TIMEOUT ))
until out=$(timeout 30 srun -N 1 -n 1 -t 1 --quiet hostname 2>&1); do
    if (( $(date +%s) >= deadline )); then
        die "the test job 'srun hostname' keeps failing: $out"
    fi
    sleep 1
done
t_job=$(elapsed "$t0")

log "ready: partition '$PARTITION', node '$NODE' ($(node_state)); test job ran on '$out'"
log "timings: packages ${t_install} s, daemons ${t_daemons} s, first job ${t_job} s, total $(elapsed "$t_start") s"
