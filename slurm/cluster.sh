#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the end-to-end tests and for trying `sparse-parallel submit`.
#
#   slurm/cluster.sh start   install slurm-wlm + munge if missing (apt-get, needs root), start munged,
#                            slurmctld and slurmd; prints `export SLURM_CONF=...` for the clients
#   slurm/cluster.sh stop    stop the daemons this script started, by their pid files
#   slurm/cluster.sh status  say whether the cluster answers
#
# Everything lives under $SPARSE_PARALLEL_SLURM_DIR (default /tmp/sparse-parallel-slurm): slurm.conf,
# pid files, spool, state and logs.  The system's /etc/slurm is not touched; clients find the cluster
# through SLURM_CONF.
set -euo pipefail

DIR=${SPARSE_PARALLEL_SLURM_DIR:-/tmp/sparse-parallel-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# A pid file names a live daemon only if that pid still runs the program the file is named after
# (slurmd.pid -> slurmd): a stale file whose pid was reused by another process is not ours to stop.
alive() {
    [[ -f $1 ]] || return 1
    local pid name
    pid=$(cat "$1")
    name=$(basename "$1" .pid)
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and apt-get is not available"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's maintainer scripts try to start the services; there is no init system to start them here
    # and this script starts its own daemons, so the attempt is refused (policy-rc.d exit 101).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; } || rc=$?
    [[ $made_policy == 1 ]] && rm -f "$policy"
    [[ $rc == 0 ]] || die "apt-get install slurm-wlm munge failed (rc $rc)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return; fi
    [[ -f /etc/munge/munge.key ]] || mungekey -c -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    runuser -u munge -- munged --force
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged did not start"
    # Remembered so that `stop` ends only a munged that this script started.
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || pgrep -u munge -x munged | head -n 1 > "$DIR/munged.pid"
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool"
    cat > "$CONF" <<EOF
ClusterName=sparseparallel
SlurmctldHost=$HOST
AuthType=auth/munge
# How long a job credential lives; a requeued job waits this long (+1 s) before it may start again, so
# that no step of its last run is still being launched.  Slurm's default is 120 s; on this one node a step
# launches in well under a second, and every second here is one the requeue test waits.
AuthInfo=cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at the queue every few seconds (defaults: 60 s and 30 s), so a requeued job starts once eligible.
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$HOST CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1; }

start() {
    install_packages
    mkdir -p "$DIR"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && munge_ok; then
        log "already running"
    else
        start_munge
        write_conf
        # -c: a new cluster starts empty, so no job of an earlier one runs again.
        alive "$DIR/slurmctld.pid" || slurmctld -c -i -f "$CONF"
        alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
    fi
    local state=""
    for _ in $(seq 100); do
        state=$(node_state)
        case $state in
            idle|mixed|allocated) break ;;
            down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.3
    done
    case $state in
        idle|mixed|allocated) ;;
        *) die "node $HOST is '$state' after 30 s; see $DIR/slurmctld.log and $DIR/slurmd.log" ;;
    esac
    log "node $HOST is $state"
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {
    local f=$1
    alive "$f" || { rm -f "$f"; return 0; }
    local pid
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -f "$f"
}

stop() {
    # Jobs still on the cluster end first, so that no training step outlives its daemons.
    if alive "$DIR/slurmctld.pid" && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        squeue -h -o %i | xargs scancel 2>/dev/null || true
        for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"
    log "stopped"
}

status() {
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        echo "running: node $HOST is $(node_state); export SLURM_CONF=$CONF"
    else
        echo "not running"
        return 1
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
