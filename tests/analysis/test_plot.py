"""`python -m bnstudy plot` on real run directories."""
from __future__ import annotations

import pytest

from bnstudy.analysis.plot import run_labels
from bnstudy.analysis.runs import read_metrics
from bnstudy.cli import cli_main, main
from tiny_fits import tiny_args


@pytest.mark.slow
def test_plot_compares_runs_labelled_by_what_differs(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    runs = []
    for norm in ("batch", "none"):
        cli_main(["fit", *tiny_args("dln.yaml"), f"--model.norm={norm}", f"--run_dir=r-{norm}"])
        runs.append(in_tmp / f"r-{norm}")
    assert run_labels(runs) == ["norm=batch", "norm=none"]
    series = read_metrics(runs[0])
    assert [step for step, _ in series["train/loss"]] == [0, 1, 2]
    out = in_tmp / "fig.png"
    assert main(["plot", *map(str, runs), "--metrics", "train/loss", "val/loss",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_names_run_dirs_without_metrics(in_tmp, capsys):
    (in_tmp / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["plot", str(in_tmp / "empty")])
    assert "no metrics.csv in" in capsys.readouterr().err
