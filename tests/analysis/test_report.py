"""`python -m bnstudy report` on tiny real runs (real fits with the instruments on): every figure
whose runs exist is drawn and listed, skipped figures name what feeds them, the runs table shows
what differs, the claims' verdicts follow the data, and the W&B report run is in W&B's offline
files."""
from __future__ import annotations

import contextlib
import html
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

import wandb_records
from bnstudy.analysis import claims
from bnstudy.analysis.figures import FIGURES
from bnstudy.analysis.runs import load_runs, run_from_history
from bnstudy.cli import cli_main, main
from conftest import REPO

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*srun")]

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# the quickstart (VGG-11 on digits, instruments at steps 0, 1, 2, 4, 8, 16, 25) made tinier
VGG = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_steps=30",
       "--model.width=0.125", "--trainer.val_check_interval=10", "--trainer.log_every_n_steps=2",
       *QUIET]
# the paper's DLN (25 layers, its instruments) on 64 samples
DLN = ["--config", str(REPO / "configs" / "dln.yaml"), "--trainer.max_steps=30",
       "--data.num_samples=64", "--data.steps_per_epoch=5", "--trainer.check_val_every_n_epoch=1",
       "--trainer.log_every_n_steps=1", *QUIET]
RUNS = {
    "vgg/none-0.1": VGG + ["--model.norm=none"],
    "vgg/batch-0.1": VGG + ["--model.norm=batch"],
    "vgg/batch-0.1-seed1": VGG + ["--model.norm=batch", "--seed_everything=1"],
    "vgg/none-0.5": VGG + ["--model.norm=none", "--model.lr=0.5"],
    "vgg/batch-0.5": VGG + ["--model.norm=batch", "--model.lr=0.5"],
    "vgg/noisy-0.1": VGG + ["--model.norm=noisy_batch"],
    "vgg/noise-0.1": VGG + ["--model.norm=noise"],
    "vgg/l1-0.1": VGG + ["--model.norm=l1"],
    "dln/none": DLN + ["--model.norm=none"],
    "dln/batch": DLN + ["--model.norm=batch"],
}
DRAWN = {"fig1_accuracy", "fig1_activations", "fig2_noisy_bn", "fig2_activations",
         "fig3_ics_vgg", "fig3_ics_dln", "fig4_landscape_vgg", "fig5_lp_vgg",
         "fig6_activations_lp", "fig8_moment_drift", "fig9_activations_dln",
         "fig10_landscape_dln", "fig10_landscape_random_dln", "fig11_grad_diff_vs_step",
         "fig12_landscape_lp_vgg", "q_seeds", "q_eos_dln",
         "q_theorem41"}  # configs/dln*.yaml carry BNGradientBound since fdcdb8d
WANDB_RUN = "dln/none"  # also logged to W&B (offline files), to read it back as --wandb would
SKIPPED = {"fig5_lp_dln": "sweeps/fig5_lp_dln.yaml", "fig13_landscape_lp_dln": "dln_l1.yaml",
           "q_optimizer": "sweeps/q_optimizer.yaml", "q_init": "sweeps/q_init_vgg.yaml",
           "q_eos_vgg": "bnstudy.instruments.Curvature",
           "fig4_landscape_random_vgg": "RandomLandscape",
           "q_spectrum": "python -m bnstudy spectrum", "q_surface": "python -m bnstudy surface"}


@pytest.fixture(scope="session")
def run_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_runs")
    import wandb

    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"  # W&B files cost time: one run has them
    try:
        for name, args in RUNS.items():
            if name != WANDB_RUN:
                cli_main(["fit", *args, f"--run_dir={root / name}"])
        wandb.teardown()  # wandb keeps the first run's settings (disabled) until torn down
        os.environ["WANDB_MODE"] = "offline"
        cli_main(["fit", *RUNS[WANDB_RUN], f"--run_dir={root / WANDB_RUN}"])
    finally:
        os.environ["WANDB_MODE"] = previous if previous is not None else "offline"
    return root


@pytest.fixture(scope="session")
def report(run_root, tmp_path_factory) -> dict:
    """The report of every run, through the command line: a glob and a folder of runs."""
    out = tmp_path_factory.mktemp("report") / "out"
    stdout = io.StringIO()
    assert os.environ.get("WANDB_MODE") == "offline"  # conftest: W&B logs to offline files
    with contextlib.redirect_stdout(stdout):
        rc = main(["report", str(run_root / "vgg" / "*"), str(run_root / "dln"), "--out", str(out)])
    assert rc == 0
    return {"out": out, "stdout": stdout.getvalue(), "index": (out / "index.html").read_text()}


@pytest.mark.slow
def test_every_figure_with_runs_is_drawn_and_listed(report):
    out, index = report["out"], report["index"]
    assert {p.stem for p in out.glob("*.png")} == DRAWN
    for name in DRAWN:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert f"src='{name}.png'" in index, name
    assert {s.name for s in FIGURES} >= DRAWN | set(SKIPPED)


@pytest.mark.slow
def test_figures_take_the_runs_their_predicates_name(run_root):
    runs = {r.id: r for r in load_runs([run_root])}
    fed = {spec.name: sorted(r.id for r in spec.runs(list(runs.values()))) for spec in FIGURES}
    assert fed["fig1_accuracy"] == ["vgg/batch-0.1", "vgg/batch-0.1-seed1", "vgg/batch-0.5",
                                    "vgg/none-0.1", "vgg/none-0.5"]
    assert fed["fig2_noisy_bn"] == ["vgg/batch-0.1", "vgg/batch-0.1-seed1", "vgg/noise-0.1",
                                    "vgg/noisy-0.1", "vgg/none-0.1"]
    assert fed["fig3_ics_dln"] == ["dln/batch", "dln/none"]
    assert fed["q_eos_dln"] == ["dln/batch", "dln/none"]  # configs/dln*.yaml carry Curvature
    assert fed["q_seeds"] == ["vgg/batch-0.1", "vgg/batch-0.1-seed1"]


@pytest.mark.slow
def test_skipped_figures_name_the_runs_that_feed_them(report):
    lines = [line for line in report["stdout"].splitlines() if line.startswith("skipped")]
    assert len(lines) == len(SKIPPED)
    for name, feed in SKIPPED.items():
        assert any(line.startswith(f"skipped {name}: no runs; fed by") and feed in line
                   for line in lines), (name, lines)
        assert feed in report["index"]


def table(index: str, after: str) -> list[list[str]]:
    """Rows of the first HTML table after the heading `after` (header row first), cells as
    text."""
    body = index.split(after, 1)[1].split("</table>", 1)[0]
    return [[html.unescape(re.sub(r"<[^>]+>", " ", c)).strip()
             for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
            for row in body.split("<tr>")[1:]]


@pytest.mark.slow
def test_runs_table_shows_the_keys_that_differ(report):
    rows = table(report["index"], "<h2>Runs</h2>")
    header, body = rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert header[0] == "run" and header[-5:] == ["steps", "final train loss", "final train acc",
                                                  "final test acc", "diverged"]
    assert {"model", "norm", "lr", "depth", "seed_everything"} <= set(header)
    assert "optimizer" not in header and "width" not in header  # the same in every run
    assert set(body) == set(RUNS)
    assert body["vgg/none-0.5"]["lr"] == "0.5" and body["vgg/l1-0.1"]["norm"] == "l1"
    assert body["dln/batch"]["model"] == "dln" and body["vgg/batch-0.1-seed1"]["seed_everything"] == "1"
    assert body["vgg/batch-0.1"]["steps"] == "29"
    assert 0 <= float(body["vgg/batch-0.1"]["final test acc"]) <= 1


@pytest.mark.slow
def test_claims_are_computed_from_the_runs(report, run_root):
    rows = table(report["index"], "<h2>Claims</h2>")
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    results = claims.evaluate(load_runs([run_root]))
    for claim, row in zip(results, rows[1:]):
        assert claim.verdict in claims.VERDICTS, (claim.number, claim.note)
        assert claim.numbers and row[-1].startswith(claim.verdict)
        assert claim.rule in row[2]
    # claim 1 read the lr 0.5 pair, claim 2 the noise control, claim 5 the l1 run
    assert any("lr 0.5" in n for n in results[0].numbers)
    assert any("noise without BN" in n for n in results[1].numbers)
    assert any("l1" in n for n in results[4].numbers)
    saved = json.loads((report["out"] / "claims.json").read_text())
    assert [c["verdict"] for c in saved] == [c.verdict for c in results]


def write_run(path: Path, config: dict, norm: str, metrics: dict[str, list[float]],
              **model_args) -> None:
    """A run directory written by hand: the config of a real run with another norm (and model
    arguments), and a metrics.csv with the given values at steps 0, 1, 2, ..."""
    path.mkdir(parents=True)
    cfg = json.loads(json.dumps(config))
    cfg["model"]["init_args"].update(norm=norm, **model_args)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    n = max(len(v) for v in metrics.values())
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *metrics])
        for step in range(n):
            writer.writerow([step, *[v[step] if step < len(v) else "" for v in metrics.values()]])


def accuracy(final: float, curve: list[float]) -> dict[str, list[float]]:
    return {"train/loss": [2.0] * len(curve), "train/acc": curve, "val/acc": [final]}


SLOW, FAST = [0.1] * 6 + [0.6, 0.9, 0.95, 0.96], [0.1] * 2 + [0.6, 0.9, 0.95, 0.97, 0.98]


@pytest.mark.slow
def test_claims_follow_the_data_in_index_html_and_claims_json(run_root, tmp_path):
    config = yaml.safe_load((run_root / "vgg" / "none-0.1" / "config.yaml").read_text())
    write_run(tmp_path / "runs" / "none", config, "none", accuracy(0.9, SLOW[:4] + FAST[4:]))
    write_run(tmp_path / "runs" / "batch", config, "batch", accuracy(0.8, SLOW))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    rows = table((out / "index.html").read_text(), "<h2>Claims</h2>")
    assert rows[1][-1].startswith("not shown") and "BN reaches 0.9" in rows[1][-1]
    assert all(r[-1].startswith("no runs") for r in rows[2:])
    saved = json.loads((out / "claims.json").read_text())
    assert [c["verdict"] for c in saved] == [
        next(v for v in claims.VERDICTS if r[-1].startswith(v)) for r in rows[1:]]
    assert saved[0]["verdict"] == claims.NOT_SHOWN and saved[0]["parts"]
    # ... shown once the data says BN is faster
    shutil.rmtree(tmp_path / "runs" / "batch")
    write_run(tmp_path / "runs" / "batch", config, "batch", accuracy(0.95, FAST))
    assert claims.claim1(load_runs([tmp_path / "runs"])).verdict == claims.SHOWN


@pytest.mark.slow
def test_wandb_report_run_in_offline_files(report):
    run_file = wandb_records.run_file(report["out"])
    records = wandb_records.read_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "report" and run.project == "bnstudy"
    logged = {k: v for row in wandb_records.history(report["out"]) for k, v in row.items()}
    assert {f"figures/{name}" for name in DRAWN} <= set(logged)
    assert logged["figures/fig1_accuracy"]["_type"] == "image-file"
    assert logged["runs"]["_type"] == logged["claims"]["_type"] == "table-file"
    assert logged["claims"]["nrows"] == 5 and logged["runs"]["nrows"] == len(RUNS)


def test_wandb_option_refuses_offline(tmp_path, monkeypatch, capsys):
    assert main(["report", "--wandb", "me/bnstudy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WANDB_MODE=offline" in err
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert main(["report", "--wandb", "me/bnstudy/abc123", "--out", str(tmp_path)]) == 2
    assert "no W&B API key" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_path_without_runs_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing*"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bnstudy report: error: no run directories (config.yaml + metrics.csv) in " \
                  f"{tmp_path / 'nothing*'}"


@pytest.mark.slow
def test_sweep_figures_from_optimizer_and_init_grids(run_root, tmp_path, capsys):
    """The open-question figures (their grids are too big to fit here): runs written by hand."""
    config = yaml.safe_load((run_root / "vgg" / "none-0.1" / "config.yaml").read_text())
    for opt in ("sgd", "adam"):
        for norm in ("none", "batch"):
            for lr in (0.01, 0.1):
                diverged = opt == "adam" and norm == "none" and lr == 0.1
                metrics = accuracy(0.1 if diverged else 0.5 + lr, [0.1, 0.5])
                if diverged:
                    metrics = {**metrics, "train/loss": [2.0, float("nan")], "diverged": [0, 1]}
                write_run(tmp_path / "opt" / f"{opt}-{norm}-{lr}", config, norm, metrics,
                          optimizer=opt, lr=lr)
    for init in ("glorot", "kaiming"):
        for scale in (0.5, 2.0):
            write_run(tmp_path / "init" / f"{init}-{scale}", config, "batch",
                      accuracy(0.3 * scale, [0.1, 0.5]), init=init, init_scale=scale)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "opt"), str(tmp_path / "init"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote " + str(out / "q_optimizer.png") + " (8 runs)" in printed
    assert "wrote " + str(out / "q_init.png") + " (8 runs)" in printed  # + the sgd runs
    for name in ("q_optimizer", "q_init"):
        assert (out / f"{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_wandb_history_reads_as_the_run_directory(run_root):
    """--wandb builds runs from W&B's config and history rows: the same rows in a real fit's
    offline W&B file give the run that its config.yaml and metrics.csv give."""
    run_dir = run_root / WANDB_RUN
    from_wandb = run_from_history(WANDB_RUN, wandb_records.config(run_dir),
                                  wandb_records.history(run_dir))
    from_dir = load_runs([run_dir])[0]
    assert from_wandb.settings == from_dir.settings and from_wandb.model == "dln"
    assert from_wandb.metrics == from_dir.metrics
    assert {"train/loss", "ics/l2/layer09", "landscape/beta_eff", "act/layer11/q50"} \
        <= set(from_wandb.metrics)
