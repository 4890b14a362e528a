#!/bin/bash
# W&B sweep workers as a Slurm job array: each array task is one `wandb agent --count 1 SWEEP`,
# which asks the W&B server for the sweep's next run, trains it and exits.
#
#   wandb sweep sweeps/fig1_norm_lr.yaml                     # prints <entity>/bnstudy/<sweep id>
#   sbatch --array=0-3 slurm/agent.sh <entity>/bnstudy/<sweep id>      # 4 workers = the 4 runs
#   sbatch --array=0-74%8 slurm/agent.sh <entity>/bnstudy/<sweep id>   # 75 runs, 8 at a time
# Needs network access to W&B from the compute nodes and a key (WANDB_API_KEY or `wandb login`,
# which writes ~/.netrc); an offline cluster uses slurm/grid.sh instead (same runs, no server).
#
# Cluster settings, from the environment (sbatch's own variables; command-line options win):
#   export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=my_project SBATCH_TIMELIMIT=04:00:00
#   export SBATCH_GPUS_PER_NODE=1        # one GPU per worker; leave unset on CPU
# Paths, read by this script:
#   BNSTUDY_REPO    checkout to run in: the sweep's configs/ paths are relative to it (default: submit dir)
#   BNSTUDY_PYTHON  python of the environment with bnstudy and wandb (default: $BNSTUDY_REPO/.venv/bin/python)
#
# Signals. The agent starts each run as `/usr/bin/env python -m bnstudy fit ...`, with `python`
# looked up on PATH (so this script puts BNSTUDY_PYTHON's directory first). Slurm's warning
# signal goes to this batch shell only (B:); the shell passes SIGUSR1 on to the training process
# and never to the agent, which, like any Python program without a handler, would die of it and
# take the run down with it. The training process (Lightning's SLURM auto-requeue) then writes
# its checkpoint and requeues this array task. A requeued worker asks the sweep for a run again:
# W&B gives a run marked as preempted back to the next agent under the same run id, a run that
# is not gets its configuration re-run from scratch only if the sweep schedules it again; see
# docs/cluster.md for what bnstudy does so that the run resumes from its checkpoint.
#SBATCH --job-name=bnstudy-agent
#SBATCH --ntasks=1
#SBATCH --signal=B:SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: sbatch --array=0-N slurm/agent.sh ENTITY/PROJECT/SWEEP_ID" >&2; exit 2; }
sweep=$1
BNSTUDY_REPO=${BNSTUDY_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
BNSTUDY_PYTHON=${BNSTUDY_PYTHON:-$BNSTUDY_REPO/.venv/bin/python}
cd "$BNSTUDY_REPO" || exit 2
[ -x "$BNSTUDY_PYTHON" ] || { echo "BNSTUDY_PYTHON=$BNSTUDY_PYTHON is not executable" >&2; exit 2; }
export PATH="$(dirname "$BNSTUDY_PYTHON"):$PATH"    # the agent's ${interpreter} is `python`
# torch threads: at most one per allocated CPU (without cgroups torch would start one per core
# of the node), fewer for tiny models where one is fastest (bnstudy/threads.py)
export BNSTUDY_MAX_THREADS=${SLURM_CPUS_PER_TASK:-1}

echo "[$(date -Is)] worker ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}} (restart ${SLURM_RESTART_COUNT:-0}): wandb agent --count 1 $sweep"
"$BNSTUDY_PYTHON" -m wandb agent --count 1 "$sweep" &
agent=$!

pass_on_signal() {  # to the training run(s) the agent started, identified as its bnstudy children
    local pids
    pids=$(pgrep -P "$agent" -f "bnstudy" || true)
    echo "[$(date -Is)] $1: passing it to the training process(es) ${pids:-(none yet)}"
    [ -n "$pids" ] && kill -s "$1" $pids
}
trap 'pass_on_signal USR1' USR1

# `wait` returns early whenever a trapped signal arrives; wait again until the agent has exited
while :; do
    wait "$agent"
    status=$?
    kill -0 "$agent" 2>/dev/null || break
done
exit "$status"
