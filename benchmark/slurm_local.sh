#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, to try `benchmark/run.py --launcher slurm` (and tests/test_slurm.py)
# without a real cluster. Debian or Ubuntu, as root:
#
#     bash benchmark/slurm_local.sh start    # installs slurm-wlm and munge if missing, writes slurm.conf, starts daemons
#     bash benchmark/slurm_local.sh stop     # stops slurmctld, slurmd and munged (the ones this script started)
#
# One node with this machine's CPUs and memory (as `slurmd -C` reports them) in one default partition `local`.
# No cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), so it runs in containers, and no accounting
# (sacct does not work; squeue does). It overwrites /etc/slurm/slurm.conf: not for a machine that is a real node.
set -euo pipefail

STATE=/var/lib/slurm-local  # slurmctld's state, slurmd's spool and the daemons' logs and pid files
CONF=/etc/slurm/slurm.conf

start() {
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    fi
    mkdir -p "$STATE" /etc/slurm /etc/munge /run/munge /var/lib/munge /var/log/munge
    # munge authenticates every Slurm message with a key shared by the nodes; this node only needs one.
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0755 /run/munge
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    fi

    # The node's name resolves to 127.0.0.1 through NodeAddr and SlurmctldHost's address: no DNS needed.
    local host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...: what this machine has
    cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
# A job without --mem asks for 1 GB per CPU, so runs share the node's memory instead of each taking all of it.
DefMemPerCPU=1024
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p "$STATE/ctld" "$STATE/d"
    if ! scontrol ping 2>/dev/null | grep -q UP; then
        slurmctld
    fi
    if ! pgrep -F "$STATE/slurmd.pid" >/dev/null 2>&1; then
        slurmd
    fi
    # The node comes up within a few seconds; a node left DOWN by an earlier unclean stop is resumed.
    for _ in $(seq 30); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case "$state" in
            idle*|mix*|alloc*) echo "slurm_local: node $host $state, partition local"; return 0 ;;
            down*|drain*) scontrol update NodeName="$host" State=RESUME || true ;;
        esac
        sleep 1
    done
    echo "slurm_local: the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
    return 1
}

stop() {
    # Each daemon by the pid its own pid file names.
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if [ -s "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
    echo "slurm_local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
