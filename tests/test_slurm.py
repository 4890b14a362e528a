"""slurm/*.sh against a real single-node Slurm on 127.0.0.1 (scripts/slurm_local_up.sh starts
munged, slurmctld and slurmd): a grid array, a requeued task that resumes exactly, a 2-process
DDP fit on CPU (gloo), and a W&B agent worker that survives Slurm's warning signal.

Skipped when Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge). When
it is installed but not running and we are root, the up-script is run first."""
from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/quickstart.yaml", "--model.width=0.0625",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
WAIT_S = 240  # per job; a tiny fit takes ~10-20 s on 2 loaded cores


def _node_state() -> str:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld",
                           "slurmd", "munged") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found); "
                    "apt-get install slurmctld slurmd slurm-client munge")
    if not re.match(r"idle|mixed|allocated", _node_state()):
        if os.geteuid() != 0:
            pytest.skip("Slurm is installed but not running, and starting it needs root: "
                        "sudo scripts/slurm_local_up.sh")
        up = subprocess.run([str(REPO / "scripts" / "slurm_local_up.sh")], capture_output=True,
                            text=True, timeout=180)
        if up.returncode != 0:
            pytest.fail(f"scripts/slurm_local_up.sh failed:\n{up.stdout}\n{up.stderr}")
    jobs: list[str] = []
    yield jobs
    for job in jobs:  # a test that failed half-way leaves nothing running
        subprocess.run(["scancel", job], capture_output=True)


def job_env(**extra: str) -> dict:
    env = dict(os.environ, BNSTUDY_REPO=str(REPO), BNSTUDY_PYTHON=sys.executable,
               WANDB_MODE="offline")
    env.update(extra)
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_"))]:
        del env[key]  # pytest itself may run inside a Slurm job
    return env


def submit(jobs: list[str], command: list[str], env: dict) -> str:
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job = re.search(r"(\d+)", out.stdout.strip().splitlines()[-1]).group(1)
    jobs.append(job)
    return job


def tasks(job: str) -> dict[str, dict]:
    """scontrol's record of every task of a job (finished ones too, for MinJobAge), by
    ArrayTaskId ('' for a plain job)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    records = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields.get("ArrayTaskId", "")] = fields
    return records


def wait_done(job: str, timeout: float = WAIT_S) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if out.returncode == 0 and not out.stdout.strip():
            return tasks(job)
        time.sleep(1)
    raise AssertionError(f"job {job} still queued or running after {timeout} s: {tasks(job)}")


def wait_for_text(path: Path, text: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def metric_rows(run_dir: Path, column: str) -> list[tuple[int, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), r[column]) for r in csv.DictReader(f) if r.get(column)]


def write_sweep(path: Path, parameters: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "method": "grid",
        "command": ["${env}", "${interpreter}", "-m", "bnstudy", "fit", "--config",
                    "configs/quickstart.yaml", "${args}"],
        "parameters": parameters}))
    return path


def test_grid_array_runs_every_point_in_its_own_directory(slurm, tmp_path):
    """`bash slurm/grid.sh SWEEP` expands the sweep, sizes the array to it and submits; more tasks
    than CPUs queue up, and every task trains its own grid point in its own run directory."""
    sweep = write_sweep(tmp_path / "tiny.yaml",
                        {"model.norm": {"values": ["none", "batch", "l2"]}, "model.lr": {"value": 0.05}})
    runs = tmp_path / "runs"
    env = job_env(BNSTUDY_RUNS=str(runs))
    job = submit(slurm, ["bash", "slurm/grid.sh", str(sweep), "--model.width=0.0625",
                         "--trainer.max_steps=4", "--trainer.log_every_n_steps=1",
                         "--trainer.enable_progress_bar=false"], env)
    states = wait_done(job)

    assert sorted(states) == ["0", "1", "2"]
    for task, fields in states.items():
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), fields
    lines = (runs / "grid.txt").read_text().splitlines()
    assert [line.split()[-1] for line in lines] == [
        "--model.norm=none", "--model.norm=batch", "--model.norm=l2"]
    wandb_ids = set()
    for i, norm in enumerate(["none", "batch", "l2"]):
        run_dir = runs / f"{i:04d}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["init_args"]["norm"] == norm
        assert config["model"]["init_args"]["lr"] == 0.05
        assert config["run_dir"] == str(run_dir)
        assert [s for s, _ in metric_rows(run_dir, "train/loss")] == [0, 1, 2, 3]
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert (runs / f"slurm-{job}_{i}.out").is_file()
        wandb_ids.add((run_dir / "wandb_id").read_text().strip())
    assert len(wandb_ids) == 3


@pytest.mark.slow
def test_requeued_task_resumes_and_ends_like_an_uninterrupted_run(slurm, tmp_path):
    """Two array tasks train the same config and seed; task 0 gets SIGUSR1 (what Slurm sends
    before the time limit) half-way: it writes its hpc checkpoint, requeues itself, resumes from
    that checkpoint under the same W&B run id and ends with exactly task 1's metrics and weights."""
    sweep = write_sweep(tmp_path / "one.yaml", {"model.lr": {"value": 0.1}})
    grid = tmp_path / "grid.txt"
    out = subprocess.run([sys.executable, "-m", "bnstudy", "grid", str(sweep)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    grid.write_text(out.stdout * 2)  # the same run twice: task 0 interrupted, task 1 not
    max_steps = 1200
    runs = tmp_path / "runs"
    env = job_env(BNSTUDY_RUNS=str(runs))
    job = submit(slurm, [
        "sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/slurm-%A_%a.out",
        "slurm/grid.sh", str(grid), "--model.width=0.0625", f"--trainer.max_steps={max_steps}",
        "--trainer.val_check_interval=200", "--trainer.log_every_n_steps=5",
        "--checkpoint.save_top_k=-1",  # so last.ckpt is the final state, to compare weights
        "--trainer.enable_progress_bar=false"], env)

    log0 = tmp_path / f"slurm-{job}_0.out"
    wait_for_text(log0, "SLURM auto-requeueing enabled")  # the handler is set: training starts
    time.sleep(2.0)
    subprocess.run(["scancel", "--signal=USR1", f"{job}_0"], check=True)
    states = wait_done(job)

    assert (states["0"]["JobState"], states["0"]["Restarts"]) == ("COMPLETED", "1"), states["0"]
    assert (states["1"]["JobState"], states["1"]["Restarts"]) == ("COMPLETED", "0"), states["1"]
    interrupted, reference = runs / "0000", runs / "0001"
    hpc = torch.load(interrupted / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert 0 < hpc["global_step"] < max_steps  # it really stopped half-way
    log = log0.read_text()
    assert "restart 1" in log and f"Restoring states from the checkpoint path at {interrupted}/hpc_ckpt_1.ckpt" in log

    # same final metrics, logged at the same steps, and bit-identical final weights
    for column in ("val/acc", "val/loss"):
        assert metric_rows(interrupted, column) == metric_rows(reference, column)
    assert metric_rows(reference, "val/acc")[-1][0] == max_steps - 1
    final = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
             for d in (interrupted, reference)]
    assert final[0]["global_step"] == final[1]["global_step"] == max_steps
    for name, tensor in final[1]["state_dict"].items():
        assert torch.equal(final[0]["state_dict"][name], tensor), name

    # one W&B run, continued: both attempts wrote under the id kept in the run directory
    run_id = (interrupted / "wandb_id").read_text().strip()
    attempts = sorted((interrupted / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts)


@pytest.mark.slow
def test_ddp_runs_two_processes_on_cpu(slurm, tmp_path):
    """ddp.sh with --ntasks-per-node=2: Slurm starts 2 ranks, Lightning joins them over gloo,
    the fit completes; the global batch is split between the ranks."""
    run_dir = tmp_path / "ddp"
    env = job_env(BNSTUDY_ACCELERATOR="cpu", BNSTUDY_RUN_DIR=str(run_dir),
                  BNSTUDY_GLOBAL_BATCH="32")
    job = submit(slurm, ["sbatch", "--parsable", "--ntasks-per-node=2",
                         f"--output={tmp_path}/slurm-%j.out", "slurm/ddp.sh", *TINY,
                         "--trainer.max_steps=6", "--trainer.log_every_n_steps=1"], env)
    states = wait_done(job)

    assert (states[""]["JobState"], states[""]["ExitCode"]) == ("COMPLETED", "0:0"), states
    log = (tmp_path / f"slurm-{job}.out").read_text()
    for text in ("distributed_backend=gloo", "GLOBAL_RANK: 0, MEMBER: 1/2",
                 "GLOBAL_RANK: 1, MEMBER: 2/2", "Starting with 2 processes"):
        assert text in log
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    trainer = config["trainer"]
    assert (trainer["strategy"], str(trainer["devices"]), trainer["num_nodes"]) == ("ddp", "2", 1)
    assert config["data"]["init_args"]["batch_size"] == 16  # 32 over 2 ranks
    assert [s for s, _ in metric_rows(run_dir, "train/loss")] == list(range(6))


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers: `wandb agent` pointed at it
    stays alive (waiting for W&B) for ~20 s, long enough to signal its job."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.slow
def test_agent_worker_survives_sigusr1(slurm, tmp_path, silent_server):
    """agent.sh: Slurm's warning signal (B:SIGUSR1, to the batch shell) is passed on to training
    processes only; the `wandb agent` process goes on (here until its own W&B timeout)."""
    env = job_env(WANDB_BASE_URL=silent_server, WANDB_API_KEY="k" * 40, WANDB_MODE="online",
                  WANDB_DIR=str(tmp_path))
    job = submit(slurm, ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out",
                         "slurm/agent.sh", "someone/bnstudy/abcd1234"], env)
    log = tmp_path / f"slurm-{job}.out"
    wait_for_text(log, "Starting wandb agent", timeout=120)
    time.sleep(1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_for_text(log, "USR1: passing it to the training process(es)", timeout=30)
    states = wait_done(job, timeout=120)

    text = log.read_text()
    # the agent ended by itself (it cannot reach W&B: exit 1), not by the signal (exit 138 / 0:10)
    assert states[""]["ExitCode"] == "1:0", (states[""], text)
    assert text.index("passing it") < text.rindex("Error:"), text
