#!/bin/bash
# A W&B grid sweep as a Slurm job array: one array task per grid point, each in its own run
# directory, resumed from its checkpoint (same W&B run id) when Slurm requeues it.
#
# Submit a sweep (expands the grid, sizes the array to it, submits this script):
#   bash slurm/grid.sh sweeps/fig1_norm_lr.yaml [extra CLI args for every run]
# or submit by hand, with a grid file written by `python -m bnstudy grid` or a sweep YAML:
#   python -m bnstudy grid sweeps/fig1_norm_lr.yaml --out runs/grid/fig1_norm_lr/grid.txt
#   sbatch --array=0-3 slurm/grid.sh runs/grid/fig1_norm_lr/grid.txt [extra CLI args]
# Task i runs line i (from 0) of the grid: `srun $BNSTUDY_PYTHON <line> <extra args>
# --run_dir=$BNSTUDY_RUNS/<i>`. Extra args come last and win, e.g. `--trainer.max_steps=100`.
#
# Cluster settings: sbatch reads them from the environment (options on its command line win), so
# nothing site-specific is written here.
#   export SBATCH_PARTITION=gpu          # partition
#   export SBATCH_ACCOUNT=my_project     # account to charge
#   export SBATCH_TIMELIMIT=04:00:00     # per task; a VGG-16 run (15k steps) takes well under 1 h on one GPU
#   export SBATCH_GPUS_PER_NODE=1        # one GPU per run; leave unset on CPU
#   export SBATCH_MEM_PER_NODE=16G       # if the site's default memory is too small
#   sbatch --array=0-74%8 ...            # run at most 8 tasks at a time; --cpus-per-task=N for more CPUs
# Paths, read by this script (sbatch passes the submitting environment on):
#   BNSTUDY_REPO    checkout to run in: configs/ paths are relative to it (default: submit dir)
#   BNSTUDY_PYTHON  python of the environment with bnstudy installed (default: $BNSTUDY_REPO/.venv/bin/python)
#   BNSTUDY_RUNS    directory of this grid's run directories (default: $BNSTUDY_REPO/runs/grid/<grid name>)
#
# Preemption and time limits: 120 s before the time limit Slurm sends SIGUSR1 to the training
# process (--signal without B: goes to the srun step, which is why the run is started with srun).
# Lightning's SLURM auto-requeue handler saves hpc_ckpt_<n>.ckpt into the run directory and runs
# `scontrol requeue`; the requeued task finds the same line, the same run directory and resumes
# from that checkpoint under the same W&B run id (kept in <run dir>/wandb_id). `scontrol requeue
# <job>_<i>` or `scancel --signal=USR1 <job>_<i>` does the same by hand. Slurm may signal up to
# 60 s early; the logs of all attempts are appended to one file (--open-mode=append).
#SBATCH --job-name=bnstudy-grid
#SBATCH --ntasks=1
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

# -- submit mode (`bash slurm/grid.sh SPEC ...` outside a job): expand, size the array, sbatch ----
if [ -z "${SLURM_JOB_ID:-}" ]; then
    [ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
    spec=$(realpath "$1"); shift
    export BNSTUDY_REPO=${BNSTUDY_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
    export BNSTUDY_PYTHON=${BNSTUDY_PYTHON:-$BNSTUDY_REPO/.venv/bin/python}
    name=$(basename "${spec%.*}")
    export BNSTUDY_RUNS=${BNSTUDY_RUNS:-$BNSTUDY_REPO/runs/grid/$name}
    mkdir -p "$BNSTUDY_RUNS"
    grid=$BNSTUDY_RUNS/grid.txt
    # every run's command (with the extra args) is parsed by bnstudy's CLI before submitting:
    # an unknown key fails here in one line instead of in every array task
    case "$spec" in
        *.yaml|*.yml) (cd "$BNSTUDY_REPO" && "$BNSTUDY_PYTHON" -m bnstudy grid "$spec" --out "$grid" -- "$@") ;;
        *) (cd "$BNSTUDY_REPO" && "$BNSTUDY_PYTHON" -m bnstudy grid --check "$spec" -- "$@")
           [ "$spec" = "$grid" ] || cp "$spec" "$grid" ;;
    esac
    n=$(grep -c . "$grid")
    cd "$BNSTUDY_REPO"
    exec sbatch --array="0-$((n - 1))${BNSTUDY_ARRAY_LIMIT:+%$BNSTUDY_ARRAY_LIMIT}" \
        --output="$BNSTUDY_RUNS/slurm-%A_%a.out" "$0" "$grid" "$@"
fi

# -- task mode: run line $SLURM_ARRAY_TASK_ID of the grid --------------------------------------
: "${SLURM_ARRAY_TASK_ID:?submit as an array: sbatch --array=0-<runs - 1> slurm/grid.sh GRID}"
[ $# -ge 1 ] || { echo "usage: sbatch --array=0-N slurm/grid.sh GRID_OR_SWEEP [args]" >&2; exit 2; }
spec=$1; shift
case "$spec" in /*) ;; *) spec=$SLURM_SUBMIT_DIR/$spec ;; esac  # relative to where sbatch ran
BNSTUDY_REPO=${BNSTUDY_REPO:-$SLURM_SUBMIT_DIR}
BNSTUDY_PYTHON=${BNSTUDY_PYTHON:-$BNSTUDY_REPO/.venv/bin/python}
name=$(basename "${spec%.*}")
BNSTUDY_RUNS=${BNSTUDY_RUNS:-$BNSTUDY_REPO/runs/grid/$name}
cd "$BNSTUDY_REPO"
[ -x "$BNSTUDY_PYTHON" ] || { echo "BNSTUDY_PYTHON=$BNSTUDY_PYTHON is not executable" >&2; exit 2; }

i=$SLURM_ARRAY_TASK_ID
case "$spec" in
    *.yaml|*.yml) line=$("$BNSTUDY_PYTHON" -m bnstudy grid --no-check "$spec" | sed -n "$((i + 1))p") ;;
    *) line=$(sed -n "$((i + 1))p" "$spec") ;;
esac
[ -n "$line" ] || { echo "grid $spec has no line $i (array larger than the grid?)" >&2; exit 2; }
eval "run_args=($line)"  # the line is shell-quoted by `bnstudy grid`
run_dir=$BNSTUDY_RUNS/$(printf '%04d' "$i")

# torch threads: at most one per allocated CPU (without cgroups torch would start one per core
# of the node), fewer for tiny models where one is fastest (bnstudy/threads.py)
export BNSTUDY_MAX_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "[$(date -Is)] task $i of job ${SLURM_ARRAY_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $line $* -> $run_dir"
srun --ntasks=1 "$BNSTUDY_PYTHON" "${run_args[@]}" "$@" --run_dir="$run_dir"
