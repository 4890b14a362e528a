"""Run directories that protect their runs, one-line errors for bad input, signals, and a CLI that
explains itself. Real processes, real signals, real corrupted files, a real failing write."""
from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from bnstudy.cli import cli_main, main
from conftest import REPO, assert_same_metrics
from test_cli import assert_identical

# VGG-11 at 1/8 width on digits: a few hundred ms to build, ~10-20 ms a step
TINY = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.width=0.125",
        "--data.batch_size=16", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=10",
        "--trainer.limit_val_batches=2", "--last_checkpoint.every_n_train_steps=10"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def bnstudy(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnstudy", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env or ENV, **kw)


def one_error_line(stderr: str, prefix: str = "bnstudy: error: ") -> str:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(prefix), stderr[-3000:]
    assert "Traceback" not in stderr and "weights_only=False" not in stderr
    return errors[0]


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def fit(run_dir: Path, *extra: str, steps: int = 20):
    return cli_main(["fit", *TINY, "--trainer.enable_progress_bar=false",
                     f"--trainer.max_steps={steps}", f"--run_dir={run_dir}", *extra])


@pytest.fixture
def quiet(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return in_tmp


# -- the CLI explains itself ------------------------------------------------------------------

def test_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys, io, contextlib\nfrom bnstudy.cli import main, available\n"
            "out = io.StringIO()\nwith contextlib.redirect_stdout(out): rc = main(['--help'])\n"
            "assert rc == 0 and 'torch' not in sys.modules and 'lightning' not in sys.modules\n"
            "print(out.getvalue()); print('SUBS', ' '.join(available()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text, subs = proc.stdout.rsplit("SUBS", 1)
    assert text.startswith("usage: bnstudy ")
    subs = subs.split()
    assert {"fit", "validate", "test", "plot", "grid"} <= set(subs)
    for name in subs:  # one line each, with its help
        assert re.search(rf"^  {name}\s+\S", text, re.M), name
    assert "predict" not in subs
    unknown = bnstudy("fitt")
    assert unknown.returncode == 2 and "unknown subcommand 'fitt'" in unknown.stderr


def test_fit_help_leads_with_the_configs_model_and_data_options():
    proc = bnstudy("fit", "--config", "configs/quickstart.yaml", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    model, data, usage = (out.index("== model: bnstudy.modules.VGGModule =="),
                          out.index("== data: bnstudy.data.DigitsData =="),
                          out.index("usage: bnstudy"))
    assert model < data < usage  # the config's options first, LightningCLI's full list after
    assert "--model.norm" in out[model:data] and "--data.batch_size" in out[data:usage]
    assert "default: 0.25" in out[model:data]  # the value in this config (the class says 1.0)
    assert "num_classes_of(data) --> model.init_args.num_classes" in out  # where links come from
    assert "functools.partial" not in out
    short = bnstudy("fit", "--model.help", "VGGModule")  # short class names work
    assert short.returncode == 0 and "--model.norm" in short.stdout, short.stderr[-800:]
    assert short.stdout.startswith("usage: bnstudy")


def test_step_limited_progress_bar_counts_steps(tmp_path):
    proc = bnstudy("fit", *TINY, "--trainer.max_steps=12", f"--run_dir={tmp_path / 'run'}",
                   env={**ENV, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"Step\s.*12/12", proc.stdout), proc.stdout[-2000:]
    assert "/-2" not in proc.stdout and "Epoch" not in proc.stdout
    assert "Tip" not in proc.stdout + proc.stderr  # no third-party promotion


# -- a run directory protects its run ----------------------------------------------------------

HOLD_LOCK = """
import sys, time
from bnstudy.rundir import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(600)
"""


def test_lock_refuses_a_second_process_and_a_dead_holders_lock_is_taken_over(quiet):
    run_dir = quiet / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = bnstudy("fit", *TINY, "--trainer.max_steps=2", f"--run_dir={run_dir}")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2
        assert f"is in use by pid {holder.pid} on host {os.uname().nodename}" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").read_text().split()[0] == str(holder.pid)  # stale, left behind
    cli = fit(run_dir, steps=2)  # taken over
    assert cli.trainer.global_step == 2
    assert (run_dir / ".lock").read_text().split()[0] == str(os.getpid())


def run_files(run_dir):
    """Every file of a run directory with its bytes, except wandb's own debug logs: wandb's
    service process outlives the run and may still append its last lines to them."""
    return {p: p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and not (p.parent.name == "logs" and "wandb" in p.parts)}


def test_resume_with_another_config_is_refused_before_anything_is_written(quiet, capsys):
    run_dir = quiet / "run"
    fit(run_dir, steps=3)
    before = run_files(run_dir)
    rc = main(["fit", *TINY, "--trainer.max_steps=5", f"--run_dir={run_dir}",
               "--model.norm=none", "--model.lr=0.05"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "model.init_args.lr (0.1 -> 0.05), model.init_args.norm ('batch' -> 'none')" in line
    assert "--resume_allow" in line and "--run_dir" in line
    assert run_files(run_dir) == before
    # a documented override for a change the user knows is safe
    rc = main(["fit", *TINY, "--trainer.enable_progress_bar=false", "--trainer.max_steps=5",
               f"--run_dir={run_dir}", "--model.lr=0.05", "--resume_allow=[model.init_args.lr]"])
    assert rc == 0
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_a_randomly_seeded_run_resumes_with_its_own_seed(quiet):
    """seed_everything: true draws a seed; a resume (a Slurm requeue too) keeps that seed instead
    of drawing another, which the config check would refuse."""
    run_dir = quiet / "run"
    fit(run_dir, "--seed_everything=true", steps=3)
    seed = yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    fit(run_dir, "--seed_everything=true", steps=5)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"] == seed
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_removing_a_run_that_never_started_spares_its_neighbours(tmp_path):
    """A failed start removes its run directory and the parents it created while they are empty;
    a run another process started meanwhile in one of those parents stays."""
    from bnstudy.rundir import remove_new_run_dir

    ours, theirs = tmp_path / "runs" / "a" / "run1", tmp_path / "runs" / "b" / "run2"
    for d in (ours, theirs):
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("step\n0\n")
    remove_new_run_dir(ours, created=tmp_path / "runs")
    assert not (tmp_path / "runs" / "a").exists()
    assert (theirs / "metrics.csv").read_text() == "step\n0\n"
    remove_new_run_dir(theirs, created=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def _checkpoint_of(run_dir: Path, *extra: str) -> Path:
    fit(run_dir, *extra, steps=1)
    return run_dir / "checkpoints" / "last.ckpt"


def test_bad_checkpoints_are_one_line_and_leave_nothing_behind(quiet, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a W&B run would leave files in the run dir
    good = _checkpoint_of(quiet / "good")
    dln = cli_main(["fit", "--config", str(REPO / "configs" / "dln.yaml"),
                    "--trainer.max_steps=1", "--data.num_samples=16", "--run_dir=dln",
                    "--trainer.enable_progress_bar=false"]).trainer
    assert dln.global_step == 1
    data = good.read_bytes()
    bad = {
        "missing.ckpt": (None, "does not exist"),
        "truncated.ckpt": (data[: len(data) // 2], "truncated or damaged"),
        "random.ckpt": (os.urandom(4096), "not a PyTorch checkpoint"),
        "notes.ckpt": (b"these are my notes\n" * 20, "not a PyTorch checkpoint"),
    }
    for name, (content, message) in bad.items():
        if content is not None:
            (quiet / name).write_bytes(content)
    cases = [(name, [], message) for name, (_, message) in bad.items()]
    cases += [(str(good), ["--model.norm=none"], "it was trained with norm='batch' "
                                                 "(this config: 'none')"),
              ("dln/checkpoints/last.ckpt", [], "is from a DLNModule, not a VGGModule")]
    for i, (path, extra, message) in enumerate(cases):
        for sub in ("fit", "test") if i == 1 else ("fit",):
            run_dir = quiet / f"new{i}{sub}"
            rc = main([sub, *TINY, *extra, f"--ckpt_path={path}", f"--run_dir={run_dir}"])
            line = one_error_line(capsys.readouterr().err)
            assert rc == 2 and message in line and path in line, (sub, path, line)
            assert not run_dir.exists(), (sub, path)  # no directory, no W&B run


def test_data_root_without_data_and_unwritable_run_dir(quiet, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["fit", "--config", str(REPO / "configs" / "vgg_bn.yaml"), f"--data.root={empty}",
               "--data.download=false", "--model.width=0.0625", "--run_dir=nodata"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "CIFAR-10 not found under" in line and str(empty) in line
    assert not Path("nodata").exists()
    # a run directory that cannot be made: below a file, and (not as root, who may write
    # anywhere) below a read-only directory
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc = main(["fit", *TINY, "--trainer.max_steps=2", f"--run_dir={afile / 'run'}"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"run directory {afile / 'run'}: {afile} is not a directory" in line
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        rc = main(["fit", *TINY, "--trainer.max_steps=2", f"--run_dir={ro / 'run'}"])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and f"run directory {ro / 'run'} is not writable" in line


FILL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from bnstudy.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_failed_checkpoint_save_keeps_the_last_good_checkpoint(quiet):
    run_dir = quiet / "run"
    fit(run_dir, steps=10)
    last = run_dir / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    # resume with files limited to half a checkpoint: the next save fails with a real OSError
    proc = subprocess.run([sys.executable, "-c", FILL_DISK, str(len(good) // 2), "fit", *TINY,
                           "--trainer.max_steps=20", f"--run_dir={run_dir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "File too large" in line and "last.ckpt" in line
    assert last.read_bytes() == good  # intact, and no temporary file left
    assert sorted(p.name for p in last.parent.iterdir() if "tmp" in p.name) == []
    assert torch.load(last, weights_only=True)["global_step"] == 10


# -- signals and resumes ---------------------------------------------------------------------

def _wait_for_new_checkpoint(proc, last: Path, since: float, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if last.exists() and last.stat().st_mtime > since:
            return True
        time.sleep(0.02)
    raise AssertionError("no checkpoint written")


def test_killed_run_reports_it_and_every_resume_ends_bit_identical(quiet):
    """A fit is stopped by SIGTERM/SIGINT at random steps three times; each stop exits 128 +
    signal with a resumable checkpoint; the resumed run ends exactly like an uninterrupted one,
    with one metrics.csv row per step and the best-checkpoint policy kept."""
    steps = 150
    args = [*TINY, "--model.norm=noisy_batch", "--trainer.enable_progress_bar=false",
            f"--trainer.max_steps={steps}", "--last_checkpoint.every_n_train_steps=5",
            "--trainer.val_check_interval=25"]
    whole = quiet / "whole"
    cli_main(["fit", *args, f"--run_dir={whole}"])
    run_dir = quiet / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    rng = random.Random(os.getpid())
    kills = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        since = last.stat().st_mtime if last.exists() else 0.0
        proc = subprocess.Popen([sys.executable, "-m", "bnstudy", "fit", *args,
                                 f"--run_dir={run_dir}"], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if _wait_for_new_checkpoint(proc, last, since):
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        if proc.returncode == 0:
            break  # it finished before the signal: nothing left to interrupt
        if sig == signal.SIGKILL:  # a hard crash: no handler runs, nothing is saved on the way out
            assert proc.returncode == -signal.SIGKILL, err[-3000:]
            step = torch.load(last, weights_only=True)["global_step"]
            logged = {int(r["step"]) for r in rows(run_dir)}
            assert set(range(step)) <= logged, "metrics.csv lost rows before the checkpoint"
            continue
        assert proc.returncode == 128 + sig, err[-3000:]
        m = re.search(rf"stopped by {sig.name} at the end of step (\d+); resumable checkpoint "
                      rf"(\S+); rerun", err)
        assert m, err[-3000:]
        step = int(m.group(1))
        assert torch.load(m.group(2), weights_only=True)["global_step"] == step
        kills.append(step)
    assert kills, "no run was interrupted"
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "fit", *args, f"--run_dir={run_dir}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert_identical(value, b["state_dict"][key], key)  # noisy BN's generators too
    killed_rows = rows(run_dir)
    assert len({r["step"] for r in killed_rows}) == len(killed_rows)  # one row a step
    assert_same_metrics(whole, run_dir)  # every value, probes and counters too, timings aside
    best = sorted(p.name for p in last.parent.glob("best-*.ckpt"))
    assert best == sorted(p.name for p in (whole / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1


def test_a_run_resumed_between_two_probe_steps_logs_what_an_uninterrupted_one_does(quiet):
    """Stopped after step 15 (ActivationStats records step 15 for the change it logs at the due
    step 16) and resumed: every value of metrics.csv is an uninterrupted run's, timings aside.
    So act/*/dmean at step 16 (the moments of step 15 are in the checkpoint), and the throughput
    monitor's train/batches and train/samples, which go on counting instead of starting again."""
    whole, resumed = quiet / "whole", quiet / "resumed"
    fit(whole, "--trainer.log_every_n_steps=1", steps=20)
    fit(resumed, "--trainer.log_every_n_steps=1", steps=16)
    fit(resumed, "--trainer.log_every_n_steps=1", steps=20)
    assert_same_metrics(whole, resumed)
    counted = [r for r in rows(resumed) if r["train/batches"]]
    assert (counted[-1]["train/batches"], counted[-1]["train/samples"]) == ("20", str(20 * 16))
    assert rows(resumed)[16]["step"] == "16" and rows(resumed)[16]["act/layer02/dmean"]


class SigtermInSanityCheck(L.Callback):
    """Sends its own process SIGTERM in the sanity check: Lightning's SIGTERM handler is up,
    bnstudy's (StepEndSignals, from the start of training) not yet."""

    def on_validation_batch_start(self, trainer, *args) -> None:
        if trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("data", ["digits", "cifar"])
def test_sigterm_before_training_began_is_exit_143_not_a_finished_run(quiet, capsys, data,
                                                                       request):
    """SIGTERM before training began goes to Lightning's handler, whose SIGTERMException, a
    SystemExit without a code, would end the process with exit code 0 (and `reproduce` would take
    the run as finished): raised in the sanity check when validation has batches left (cifar:
    several), else after the first training step, without a checkpoint (digits: one validation
    batch). Both stop with 143, before any step: the new run directory is removed."""
    run_dir = quiet / "run"
    extra = []
    if data == "cifar":
        root = request.getfixturevalue("tiny_cifar")
        extra = ["--data=bnstudy.data.CIFAR10Data", f"--data.root={root}",
                 "--data.download=false", "--data.batch_size=16", "--data.eval_batch_size=8"]
    rc = main(["fit", *TINY, *extra, "--trainer.max_steps=5", f"--run_dir={run_dir}",
               "--trainer.callbacks+=test_robust.SigtermInSanityCheck"])
    assert rc == 128 + signal.SIGTERM
    assert "bnstudy: stopped by SIGTERM" in capsys.readouterr().err
    assert not run_dir.exists()  # it never took a step: nothing is left


# -- tidy outputs ------------------------------------------------------------------------------

def documented_columns() -> list[str]:
    """The metrics.csv columns the README lists (its table under 'metrics.csv columns')."""
    text = (REPO / "README.md").read_text()
    table = text.split("metrics.csv columns", 1)[1].split("\n\n", 2)[1]
    cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


def _pattern(doc: str) -> re.Pattern:
    regex = re.escape(doc).replace("NN", r"\d\d").replace("<name>", r"[\w./-]+")
    regex = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m.group(1).replace(",", "|")
                   .replace("\\", "") + ")", regex)
    return re.compile(regex + "$")


def test_metrics_csv_one_row_per_step_and_columns_as_documented(quiet):
    run_dir = quiet / "run"
    fit(run_dir, steps=12)
    cli_main(["test", *TINY, "--trainer.enable_progress_bar=false",
              f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"--run_dir={run_dir}"])
    found = rows(run_dir)
    steps = [int(r["step"]) for r in found]
    assert steps == sorted(set(steps))  # one row per step, in order
    assert "train/loss" in found[0] and found[0]["train/loss"] and found[0]["lr-SGD"]
    columns = set(found[0])
    documented = documented_columns()
    patterns = {doc: _pattern(doc) for doc in documented}
    undocumented = sorted(c for c in columns if not any(p.match(c) for p in patterns.values()))
    assert undocumented == []
    conditional = {doc for doc in documented  # not in a short healthy fit without this probe
                   if doc.startswith(("landscape_random/", "train/device/", "diverged_step"))}
    unseen = [doc for doc, p in patterns.items()
              if doc not in conditional and not any(p.match(c) for c in columns)]
    assert unseen == []
    assert (run_dir / "config.yaml").read_text().count("ckpt_path: null") == 1  # fit's, kept


# -- sweeps are checked before anything is submitted -----------------------------------------

def test_grid_catches_a_parameter_the_cli_does_not_know(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "typo.yaml"
    sweep.write_text(yaml.safe_dump({
        "method": "grid", "parameters": {"model.nrom": {"values": ["none", "batch"]}},
        "command": ["${env}", "${interpreter}", "-m", "bnstudy", "fit", "--config",
                    "configs/quickstart.yaml", "${args}"]}))
    # slurm/grid.sh parses every run's command before sbatch: nothing is submitted
    runs = tmp_path / "runs"
    sh = subprocess.run(["bash", "slurm/grid.sh", str(sweep)], cwd=REPO, capture_output=True,
                        text=True, timeout=300,
                        env={**{k: v for k, v in ENV.items() if not k.startswith("SLURM_")},
                             "BNSTUDY_PYTHON": sys.executable, "BNSTUDY_RUNS": str(runs)})
    line = one_error_line(sh.stderr, "bnstudy grid: error: ")
    assert sh.returncode == 2 and "sbatch" not in sh.stderr
    assert "run 0 (-m bnstudy fit --config configs/quickstart.yaml --model.nrom=none)" in line
    assert "unknown key model.nrom (not an argument of bnstudy.modules.VGGModule)" in line
    assert not (runs / "grid.txt").exists()
    monkeypatch.chdir(REPO)  # the sweep's config paths are relative to the repository, as on the cluster
    # a grid file, and extra arguments every run gets, are checked the same way
    good = tmp_path / "grid.txt"
    good.write_text("-m bnstudy fit --config configs/quickstart.yaml --model.norm=none\n")
    assert main(["grid", "--check", str(good), "--", "--trainer.max_steps=3"]) == 0
    assert "1 runs parse" in capsys.readouterr().err
    assert main(["grid", "--check", str(good), "--", "--trainer.max_stepz=3"]) == 2
    line = one_error_line(capsys.readouterr().err, "bnstudy grid: error: ")
    assert "unknown key trainer.max_stepz" in line


def test_config_check_ignores_new_options_paths_and_checkpoint_cadence():
    """A run made by an older bnstudy (no such key stored), moved or named by another path, or
    resumed with another last.ckpt cadence is the same run; a changed setting is not."""
    from bnstudy.rundir import config_differences

    stored = {"run_dir": "runs/a", "model": {"init_args": {"lr": 0.1}},
              "last_checkpoint": {"every_n_train_steps": 100},
              "trainer": {"default_root_dir": "runs/a", "logger": [{"init_args": {"save_dir": "runs/a"}}]}}
    current = {"run_dir": "/abs/runs/a", "model": {"init_args": {"lr": 0.1, "compile": False}},
               "last_checkpoint": {"every_n_train_steps": None, "every_minutes": 10.0},
               "trainer": {"default_root_dir": "/abs/runs/a",
                           "logger": [{"init_args": {"save_dir": "/abs/runs/a"}}]}}
    assert config_differences(stored, current, []) == []
    current["model"]["init_args"]["lr"] = 0.5
    assert config_differences(stored, current, []) == ["model.init_args.lr"]
