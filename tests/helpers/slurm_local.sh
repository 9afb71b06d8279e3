#!/usr/bin/env bash
# A real one-node Slurm (slurmctld + slurmd + munge) on localhost, for testing slurm/*.sbatch.
# Config and steps: ../shared/docs/local-slurm.md (Debian's slurm-wlm 22.05, as root, no systemd).
#
#   tests/helpers/slurm_local.sh install      apt-get the daemons if they are missing (needs root + apt)
#   tests/helpers/slurm_local.sh start BASE   write BASE/slurm.conf, start the daemons, wait for an idle node
#   tests/helpers/slurm_local.sh stop BASE    stop what `start BASE` started (by pid, one at a time)
#
# After `start`, clients and jobs need `export SLURM_CONF=BASE/slurm.conf`.
# Ports are picked free at start, so two test runs on one machine do not collide; a munged that
# is already running is reused and left alone.
set -euo pipefail

cmd=${1:?usage: slurm_local.sh install | start BASE | stop BASE}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start() {
    local base=$1 host cpus mem ctld_port d_port
    base=$(realpath -m "$base")
    mkdir -p "$base"/{ctld,d,run,log}
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
    mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    ctld_port=$(free_port)
    d_port=$(free_port)
    while [ "$d_port" = "$ctld_port" ]; do d_port=$(free_port); done
    cat >"$base/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AuthInfo=cred_expire=10
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$base/ctld
SlurmdSpoolDir=$base/d
SlurmctldPidFile=$base/run/slurmctld.pid
SlurmdPidFile=$base/run/slurmd.pid
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$base/slurm.conf

    if ! munge_ok; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        touch "$base/run/munged.ours"
        for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
        munge_ok || { echo "munged did not come up" >&2; exit 1; }
    fi
    /usr/sbin/slurmctld -i -f "$SLURM_CONF"
    /usr/sbin/slurmd -f "$SLURM_CONF"
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o %t 2>/dev/null || true)
        [ "$state" = "idle" ] && break
        sleep 0.5
    done
    if [ "$state" != "idle" ]; then
        echo "local Slurm node never became idle (state: '${state}'); logs:" >&2
        tail -n 20 "$base"/log/*.log >&2 || true
        exit 1
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

stop() {
    local base
    base=$(realpath -m "$1")
    stop_pidfile "$base/run/slurmd.pid"
    stop_pidfile "$base/run/slurmctld.pid"
    if [ -f "$base/run/munged.ours" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$base/run/munged.ours"
    fi
}

case $cmd in
    install) install ;;
    start) start "${2:?usage: slurm_local.sh start BASE}" ;;
    stop) stop "${2:?usage: slurm_local.sh stop BASE}" ;;
    *) echo "unknown command $cmd (install | start BASE | stop BASE)" >&2; exit 2 ;;
esac
