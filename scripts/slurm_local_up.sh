#!/usr/bin/env bash
# Start a real single-node Slurm cluster on 127.0.0.1 (munged, slurmctld, slurmd started by hand:
# the machines this runs on have no systemd and package installs start no services).
# Needs root and Debian's packages:  apt-get install -y slurmctld slurmd slurm-client munge
# Idempotent: when the daemons already run with the same slurm.conf it only waits for the node.
#
#   scripts/slurm_local_up.sh          # then: sinfo, sbatch slurm/grid.sh ...
#   scripts/slurm_local_down.sh        # stops the three daemons again
set -euo pipefail

SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}     # where sinfo/sbatch/daemons look by default
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || { echo "missing $bin: apt-get install -y slurmctld slurmd slurm-client munge" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (daemons, /etc/slurm, /var/spool)" >&2; exit 1; }

host=$(hostname -s)
# slurmd -C prints this machine's real CPUs, sockets, cores, threads and RealMemory; slurmd drains
# a node whose configured resources exceed them, so the node line is taken from it verbatim.
node_hw=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')
cpus=$(sed -E 's/.*CPUs=([0-9]+).*/\1/' <<<"$node_hw")
mem=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$node_hw")
# Without DefMemPerCPU every job is given all of the node's memory and array tasks run one at a
# time; memory per CPU = all of it split evenly, so CPUs are what limits concurrency.
mem_per_cpu=$(( mem / cpus ))

mkdir -p "$(dirname "$SLURM_CONF")" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" /run/munge
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Written by scripts/slurm_local_up.sh for host $host: a one-node test cluster on 127.0.0.1.
ClusterName=bnstudy-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# short credential lifetime: a requeued job's old credential expires in seconds, not minutes
AuthInfo=cred_expire=10
MpiDefault=none
# no cgroups in containers: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$mem_per_cpu
# schedule at once (defaults batch jobs/arrays and requeues to minutes)
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,sched_interval=2
SchedulerType=sched/backfill
# finished jobs stay visible to scontrol for 10 min and are logged here, no database needed
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=10
MailProg=/bin/true
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

restart=0
if ! cmp -s "$new_conf" "$SLURM_CONF"; then
    mv "$new_conf" "$SLURM_CONF"; chmod 644 "$SLURM_CONF"; restart=1
else
    rm -f "$new_conf"
fi

# munge: the key comes with the package; make one if it is missing, then start the daemon
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /var/lib/munge /var/log/munge; chown munge:munge /var/lib/munge /var/log/munge
if ! alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null || { echo "munged does not answer" >&2; exit 1; }

stop_pidfile() {  # stop the daemon whose pid is in $1 and wait until it is gone
    if alive "$1"; then
        local pid; pid=$(cat "$1"); kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$1"
}
if [ "$restart" = 1 ]; then
    stop_pidfile /run/slurmd.pid
    stop_pidfile /run/slurmctld.pid
fi
# -i: ignore state from an earlier cluster with another config (jobs, node list)
alive /run/slurmctld.pid || slurmctld -i
alive /run/slurmd.pid || slurmd

deadline=$(( $(date +%s) + WAIT_S ))
while :; do
    state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "node $host not idle after ${WAIT_S}s (state '${state}'); see $LOG_DIR/*.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "slurm up: node $host ($cpus CPUs, ${mem} MB, DefMemPerCPU=$mem_per_cpu) partition $PARTITION: $state"
