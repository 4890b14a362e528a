"""scripts/vgg_search.py: its grading (the claim rules on a record, cut to a shorter budget) and
its must-have table on synthetic records whose answer is known; end to end with a tiny budget
(real fits through the CLI, a subprocess and the script's main in this process): the JSON, the
tables, a rerun that skips what is recorded, a run's record that does not depend on the runs
before it in the same process, and the benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "vgg_search.py"
sys.path.insert(0, str(SCRIPT.parent))
import vgg_search  # noqa: E402


def record(norm="none", lr=0.1, seed=0, reach=None, steps=1500, diverged=None, stopped=None,
           final_test=None) -> dict:
    """A search record: one batch's training accuracy logged every 10 steps (steps 9, 19, ...),
    at chance (0.1) until logged step `reach` and 1.0 from there; the test accuracy every 25
    steps, 0.1 before `reach` and 0.97 after (the last one `final_test` if given)."""
    last = stopped or (diverged if diverged is not None else steps)
    train = [(s, 1.0 if reach is not None and s >= reach else 0.1) for s in range(9, last, 10)]
    test = [(s, 0.97 if reach is not None and s >= reach else 0.1) for s in range(24, last, 25)]
    if final_test is not None:
        test[-1] = (test[-1][0], final_test)
    return {"key": f"{norm} {lr} {seed}", "depth": 11, "width": 0.125, "norm": norm, "lr": lr,
            "seed": seed, "layout": "nchw", "early_stop": stopped is not None, "max_steps": steps,
            "steps_run": last, "diverged_step": diverged, "cpu_ms_per_step": 40.0,
            "stopped": "diverged" if diverged is not None else "clear" if stopped else "budget",
            "train_acc": train, "test_acc": test}


def test_grade_reads_the_claim_rules_and_a_shorter_budget_cuts_the_record():
    r = record(reach=609)
    # the running mean of the last 3 logged values: (0.1 + 1 + 1) / 3 < 0.9, so 3 values of 1.0
    g = vgg_search.grade(r, 1500)
    assert g["train_90"] == 629 and g["train_50"] == 619 and g["test_90"] == 624
    assert g["trains"] and g["left_chance"] and not g["at_chance"] and g["outcome"] == "trains"
    assert g["final_train_acc"] == 1.0 and g["final_test_acc"] == 0.97
    short = vgg_search.grade(r, 620)  # reached 1.0 at 609, 619: the mean of 3 is 0.7
    assert not short["trains"] and short["train_50"] == 619 and short["train_90"] is None
    assert short["final_test_acc"] == 0.1 and short["at_chance"] and short["outcome"] == "chance"
    assert vgg_search.grade(r, 600)["train_50"] is None

    d = record(diverged=213)
    assert vgg_search.grade(d, 1500)["outcome"] == "diverged at 213"
    assert vgg_search.grade(d, 1500)["at_chance"] and vgg_search.grade(d, 1000)["at_chance"]
    assert vgg_search.grade(d, 200)["outcome"] == "chance"  # not yet diverged at 200
    ended = vgg_search.grade(record(reach=300, final_test=0.15), 1500)
    assert ended["trains"] and ended["at_chance"] and ended["outcome"] == "trains, ends at chance"
    assert vgg_search.grade(record(reach=300, final_test=0.5), 1500)["outcome"] == "trains"
    assert vgg_search.grade(record(reach=1480, final_test=0.5), 1500)["outcome"] == "partial"

    # what a record can say about a budget: up to the step it ran, or beyond where it stopped
    # clear or diverged; never beyond its own budget
    assert vgg_search.gradable(record(reach=100, stopped=300), 1000)
    assert vgg_search.gradable(d, 1000) and not vgg_search.gradable(r, 2000)
    assert not vgg_search.gradable({**r, "steps_run": 700}, 1000)  # cut short: no answer at 1000


def test_the_criteria_table_counts_seeds_and_pairs_them():
    runs = [record("none", 0.1, 0, reach=300), record("none", 0.1, 1, reach=900),
            record("batch", 0.1, 0, reach=30), record("batch", 0.1, 1, reach=40),
            record("none", 0.5, 0, diverged=50), record("none", 0.5, 1, reach=500),
            record("batch", 0.5, 0, reach=60), record("batch", 0.5, 1, reach=70)]
    rows = {line.split("|")[3].strip(): line for line in
            vgg_search.criteria(runs, 1000).splitlines()[2:]
            + vgg_search.criteria(runs, 800).splitlines()[2:]}
    # seed 1 reaches 90% at 929 with 1,000 steps and not at all with 800; its lr 0.5 run trains
    assert rows["1000"].split("|")[5:11] == [" 2/2 ", " 2/2 ", " 2/2 ", " 1/2 ", " 2/2 ",
                                             " 929 (93%) "]
    assert rows["800"].split("|")[5:11] == [" 1/2 ", " 1/2 ", " 1/2 ", " 1/2 ", " 2/2 ",
                                            " never in a seed "]
    # BN slower than the standard network in a seed is counted there
    late_bn = [r for r in runs if r["key"] != "batch 0.1 0"] + [record("batch", 0.1, 0, reach=400)]
    assert vgg_search.criteria(late_bn, 1000).splitlines()[2].split("|")[6] == " 1/2 "
    # without BN's runs (the NHWC check runs the standard network only) the comparison is open
    alone = vgg_search.criteria([r for r in runs if r["norm"] == "none"], 1000).splitlines()[2]
    assert alone.split("|")[5:10] == [" 2/2 ", " - ", " 2/2 ", " 1/2 ", " - "]
    # a full run of a seed stands for that seed beside its early-stopped twin
    twin = {**record("none", 0.5, 1, reach=500, stopped=600), "early_stop": True}
    table = vgg_search.table(runs + [twin], 1000)
    assert "| 11 | 0.125 | 1000 | 0.5 | none | 0,1 |" in table


def search(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_quick_search_writes_the_json_and_the_tables(tmp_path, capsys, monkeypatch):
    out = tmp_path / "search.json"
    proc = search("--quick", "--out", str(out))
    runs = {r["key"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"vgg11 w0.0625 none lr0.1 seed0 steps20",
                         "vgg11 w0.0625 batch lr0.1 seed0 steps20"}
    for r in runs.values():
        assert r["steps_run"] == 20 and r["stopped"] == "budget" and r["diverged_step"] is None
        # metrics.csv's series: training accuracy every 10 steps, the test split every 10 (--quick)
        assert [s for s, _ in r["train_acc"]] == [9, 19] == [s for s, _ in r["test_acc"]]
        # graded as the claims read a run: the mean of the last 3 logged training accuracies
        assert r["final_train_acc"] == pytest.approx(sum(a for _, a in r["train_acc"]) / 2)
        assert r["final_test_acc"] == r["test_acc"][-1][1]
        assert 0 <= r["final_train_acc_eval"] <= 1 and r["cpu_ms_per_step"] > 0
    assert "| 11 | 0.0625 | 20 | 0.1 | none | 0 |" in proc.stdout
    assert "| 11 | 0.0625 | 20 | 0.1 | batch | 0 |" in proc.stdout
    assert "| 11 | 0.0625 | 20 | nchw |" in proc.stdout  # the criteria table

    # a second invocation skips a run the JSON holds (planted here: it must stay as it is) and
    # adds the new one: that run, first in its process, repeats bit for bit the same run made
    # after another one in the first process
    doc = json.loads(out.read_text())
    planted = {**runs["vgg11 w0.0625 none lr0.1 seed0 steps20"],
               "key": "vgg11 w0.0625 none lr0.1 seed0 steps20 full", "final_test_acc": -1.0}
    out.write_text(json.dumps({**doc, "runs": doc["runs"] + [planted]}))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert vgg_search.main(["--candidates", "11:0.0625", "--norms", "batch", "none", "--lrs",
                            "0.1", "--seeds", "0", "--steps", "20", "--val-every", "10",
                            "--full", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "none lr0.1 seed0 steps20 full: in" in stdout and stdout.count("already") == 1
    again = {r["key"]: r for r in json.loads(out.read_text())["runs"]}
    assert len(again) == 4 and again[planted["key"]]["final_test_acc"] == -1.0
    alone = again["vgg11 w0.0625 batch lr0.1 seed0 steps20 full"]
    after = runs["vgg11 w0.0625 batch lr0.1 seed0 steps20"]
    assert not alone["early_stop"] and after["early_stop"]
    assert alone["test_acc"] == after["test_acc"] and alone["train_acc"] == after["train_acc"]
    assert alone["final_train_loss"] == after["final_train_loss"]

    # the benchmark: interleaved rounds, kept beside the runs
    assert vgg_search.main(["--bench", "8", "--rounds", "2", "--candidates", "11:0.0625",
                            "--norms", "none", "--layouts", "nchw", "nhwc", "--out",
                            str(out)]) == 0
    bench = json.loads(out.read_text())["bench"]
    assert [(b["round"], b["layout"]) for b in bench] == [(0, "nchw"), (0, "nhwc"),
                                                          (1, "nchw"), (1, "nhwc")]
    assert all(b["cpu_ms_per_step"] > 0 for b in bench)
    assert "| 11 | 0.0625 | none | nhwc | 2 |" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["runs"]) == 4
