#!/bin/bash
# One training run on N nodes x G GPUs with DistributedDataParallel: Slurm starts one process per
# GPU (srun), Lightning reads rank, world size and the master address from Slurm's variables.
#
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/ddp.sh --config configs/vgg_bn.yaml
#   BNSTUDY_GLOBAL_BATCH=128 sbatch ... slurm/ddp.sh --config configs/vgg_bn.yaml --trainer.sync_batchnorm=true
#   BNSTUDY_ACCELERATOR=cpu sbatch --ntasks-per-node=2 slurm/ddp.sh --config configs/quickstart.yaml   # gloo, no GPU
# Arguments are passed to `python -m bnstudy fit`; this script adds
#   --trainer.num_nodes=<--nodes> --trainer.devices=<--ntasks-per-node> --trainer.strategy=ddp
#   --trainer.accelerator=$BNSTUDY_ACCELERATOR
# so the Slurm geometry and Lightning's always agree (Lightning refuses to start otherwise).
#
# What DDP changes for the study (docs/cluster.md has the details):
# - data.batch_size is per process: the optimizer sees batch_size x nodes x GPUs samples per step.
#   BNSTUDY_GLOBAL_BATCH=128 sets data.batch_size = 128 / (nodes x GPUs), keeping the paper's
#   batch and therefore its learning rates.
# - BatchNorm normalizes with the statistics of each process's own slice of the batch unless
#   --trainer.sync_batchnorm=true, which turns every torch BatchNorm (batch and noisy_batch norms)
#   into SyncBatchNorm: statistics over the whole global batch, as on one GPU, at the cost of one
#   all-reduce per BN layer per forward. Without it BN sees batches of 128 / world size, which is
#   a different (noisier) BN than the paper's; report which one was used. LpNorm (l1, l2, linf)
#   has no synchronized version: its statistics stay per process. LayerNorm and GroupNorm are per
#   sample and do not care.
#
# Cluster settings, from the environment (sbatch's own variables; command-line options win):
#   export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=my_project SBATCH_TIMELIMIT=08:00:00
#   export SBATCH_GPUS_PER_NODE=4        # must equal --ntasks-per-node (one process per GPU)
# Paths, read by this script:
#   BNSTUDY_REPO    checkout to run in (default: submit dir); BNSTUDY_PYTHON (default: $BNSTUDY_REPO/.venv/bin/python)
#   BNSTUDY_RUN_DIR run directory (default, from the CLI: runs/<config>/slurm-<job id>, the same
#                   after a requeue, so a requeued job resumes from its checkpoint)
#   BNSTUDY_ACCELERATOR  gpu (default) or cpu (gloo backend, for tests)
#
# Preemption: as in grid.sh, SIGUSR1 120 s before the time limit reaches every rank; rank 0
# writes the hpc checkpoint and requeues the job, which resumes on restart.
#SBATCH --job-name=bnstudy-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${SLURM_JOB_ID:?submit with sbatch: sbatch [--nodes=N --ntasks-per-node=G] slurm/ddp.sh --config ...}"
BNSTUDY_REPO=${BNSTUDY_REPO:-$SLURM_SUBMIT_DIR}
BNSTUDY_PYTHON=${BNSTUDY_PYTHON:-$BNSTUDY_REPO/.venv/bin/python}
BNSTUDY_ACCELERATOR=${BNSTUDY_ACCELERATOR:-gpu}
cd "$BNSTUDY_REPO"
[ -x "$BNSTUDY_PYTHON" ] || { echo "BNSTUDY_PYTHON=$BNSTUDY_PYTHON is not executable" >&2; exit 2; }

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
per_node=${SLURM_NTASKS_PER_NODE:-1}
per_node=${per_node%%(*}  # Slurm writes e.g. "4(x2)" when it describes several nodes
world=$((nodes * per_node))

extra=()
if [ -n "${BNSTUDY_GLOBAL_BATCH:-}" ]; then
    if (( BNSTUDY_GLOBAL_BATCH % world )); then
        echo "BNSTUDY_GLOBAL_BATCH=$BNSTUDY_GLOBAL_BATCH is not divisible by $world processes" >&2
        exit 2
    fi
    extra+=("--data.batch_size=$((BNSTUDY_GLOBAL_BATCH / world))")
fi
[ -n "${BNSTUDY_RUN_DIR:-}" ] && extra+=("--run_dir=$BNSTUDY_RUN_DIR")

# torch threads: at most one per allocated CPU (without cgroups torch would start one per core
# of the node), fewer for tiny models where one is fastest (bnstudy/threads.py)
export BNSTUDY_MAX_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $per_node process(es), $BNSTUDY_ACCELERATOR"
srun "$BNSTUDY_PYTHON" -m bnstudy fit "$@" "${extra[@]}" \
    --trainer.accelerator="$BNSTUDY_ACCELERATOR" --trainer.strategy=ddp \
    --trainer.num_nodes="$nodes" --trainer.devices="$per_node"
