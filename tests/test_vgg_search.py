"""scripts/vgg_search.py end to end with a tiny budget (a real subprocess, then the script's main in
this process; real fits through the CLI): the JSON it writes, the table it prints, that a rerun skips what is recorded, and that a
run's record does not depend on the runs before it in the same process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "vgg_search.py"


def search(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_quick_search_writes_the_json_and_the_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "search.json"
    proc = search("--quick", "--out", str(out))
    runs = {r["key"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"vgg11 w0.0625 none lr0.1 seed0 steps6",
                         "vgg11 w0.0625 batch lr0.1 seed0 steps6"}
    for r in runs.values():
        assert r["steps_run"] == 6 and r["stopped"] == "budget" and r["diverged_step"] is None
        assert [s for s, _ in r["test_curve"]] == [3, 6]  # --val-every 3 in --quick
        assert 0 <= r["final_train_acc"] <= 1 and 0 <= r["final_test_acc"] <= 1
        assert r["cpu_ms_per_step"] > 0
    assert "| 11 | 0.0625 | 6 | 0.1 | none | 0 |" in proc.stdout
    assert "| 11 | 0.0625 | 6 | 0.1 | batch | 0 |" in proc.stdout

    # a second invocation skips a run the JSON holds (planted here: it must stay as it is) and
    # adds the new one: that run, first in its process, repeats bit for bit the same run made
    # after another one in the first process
    doc = json.loads(out.read_text())
    planted = {**runs["vgg11 w0.0625 none lr0.1 seed0 steps6"],
               "key": "vgg11 w0.0625 none lr0.1 seed0 steps6 full", "final_test_acc": -1.0}
    out.write_text(json.dumps({**doc, "runs": doc["runs"] + [planted]}))
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # in this process: the script as a module
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import vgg_search

    assert vgg_search.main(["--candidates", "11:0.0625", "--norms", "batch", "none", "--lrs",
                            "0.1", "--seeds", "0", "--steps", "6", "--val-every", "3", "--full",
                            "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "none lr0.1 seed0 steps6 full: in" in stdout and stdout.count("already") == 1
    again = {r["key"]: r for r in json.loads(out.read_text())["runs"]}
    assert len(again) == 4 and again[planted["key"]]["final_test_acc"] == -1.0
    alone = again["vgg11 w0.0625 batch lr0.1 seed0 steps6 full"]
    after = runs["vgg11 w0.0625 batch lr0.1 seed0 steps6"]
    assert not alone["early_stop"] and after["early_stop"]
    assert alone["test_curve"] == after["test_curve"] and alone["train_curve"] == after["train_curve"]
    assert alone["final_train_loss"] == after["final_train_loss"]
    assert "| 11 | 0.0625 | 6 (full) | 0.1 | batch | 0 |" in stdout
