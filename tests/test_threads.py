"""Thread selection (bnstudy.threads) in real processes: the affinity mask, Slurm's CPU count, the
user's explicit choice, and a real fit of the tiny DLN settling on one thread."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# Runs in a fresh interpreter, where torch starts with its own default thread count.
PROBE = r"""
import json, os, sys
import torch
from bnstudy.threads import available_cpus, choose_threads
out = {}
cpus = sorted(os.sched_getaffinity(0))
torch.set_num_threads(len(cpus))                       # torch's default on this machine
out["all"] = [available_cpus(), choose_threads()]
os.sched_setaffinity(0, {cpus[0]})                     # pinned to one CPU, as taskset does
out["pinned"] = [available_cpus(), choose_threads(), choose_threads(requested=3)]
os.sched_setaffinity(0, set(cpus))
os.environ["SLURM_CPUS_PER_TASK"] = "1"
out["slurm"] = choose_threads()
del os.environ["SLURM_CPUS_PER_TASK"]
out["tiny"] = choose_threads(macs=2_500_000)           # the DLN's step
out["big"] = choose_threads(macs=10**12)
os.environ["OMP_NUM_THREADS"] = "5"                    # the user's explicit setting wins
out["env"] = choose_threads(macs=10)
torch.set_num_threads(1)                               # set by the user before the fit: kept
del os.environ["OMP_NUM_THREADS"]
out["user_torch"] = choose_threads(macs=10**12)
print(json.dumps(out))
"""


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_CPUS_PER_TASK",
                        "BNSTUDY_MAX_THREADS")}
    return {**env, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity and at least 2 CPUs")
def test_thread_choice_follows_affinity_slurm_and_explicit_settings():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=clean_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n = len(os.sched_getaffinity(0))
    assert out["all"] == [n, n]
    assert out["pinned"] == [1, 1, 3]
    assert out["slurm"] == 1
    assert out["tiny"] == 1 and out["big"] == n
    assert out["env"] == 5
    assert out["user_torch"] == 1


FIT = r"""
import sys, torch
from bnstudy.cli import cli_main
torch.set_num_threads(2)
args = ["fit", "--config", "configs/dln_bn.yaml", "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false", "--data.num_samples=64",
        "--data.steps_per_epoch=2", "--trainer.callbacks=[]"]
from bnstudy.threads import ThreadsForFit
def chosen(cli):
    return [c.chosen for c in cli.trainer.callbacks if isinstance(c, ThreadsForFit)][0]
cli = cli_main(args + ["--run_dir=" + sys.argv[1] + "/a"])
print("default", chosen(cli), "after", torch.get_num_threads())
cli = cli_main(args + ["--run_dir=" + sys.argv[1] + "/b", "--threads=2"])
print("explicit", chosen(cli), "after", torch.get_num_threads())
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs at least 2 CPUs")
def test_a_fit_of_the_tiny_dln_runs_on_one_thread_unless_told(tmp_path):
    """The DLN's 10x10 layers are fastest on one thread (two thrash when a core is busy); an
    explicit --threads wins."""
    proc = subprocess.run([sys.executable, "-c", FIT, str(tmp_path)], capture_output=True,
                          text=True, env=clean_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the choice holds for the fit; afterwards the process has its own count back
    assert "default 1 after 2" in proc.stdout and "explicit 2 after 2" in proc.stdout
