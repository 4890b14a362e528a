#!/usr/bin/env bash
# Stop the single-node Slurm that scripts/slurm_local_up.sh started (slurmd, slurmctld, munged),
# each by the pid in its pid file. Jobs still running are killed with their slurmd.
set -uo pipefail

stop_pidfile() {
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}
stop_pidfile /run/slurmd.pid
stop_pidfile /run/slurmctld.pid
stop_pidfile /run/munge/munged.pid
echo "slurm down"
