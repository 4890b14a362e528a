"""metrics.csv as StudyCSVLogger writes it: appended as a run goes, yet at every save exactly the
file that rewriting every row would give (the writer's first version did that, at a cost that grew
with the run), through resumes that drop rows and values that arrive late."""
from __future__ import annotations

import csv
import random

from bnstudy.loggers import StudyCSVLogger


def reference(rows: dict[int, dict], steps) -> str:
    """The file the rewrite-everything writer made of `rows` (only `steps`)."""
    keys = sorted({k for s in steps for k in rows[s]} - {"step"})
    lines = [",".join(keys + ["step"])]
    for s in sorted(steps):
        lines.append(",".join(str(rows[s].get(k, "")) for k in keys) + f",{s}")
    return "\r\n".join(lines) + "\r\n"


def test_appended_file_equals_the_rewritten_one(tmp_path):
    rng = random.Random(0)
    logger = StudyCSVLogger(tmp_path, name="", version="")
    path = tmp_path / "metrics.csv"
    truth: dict[int, dict] = {}
    appends = rewrites = 0
    step = 0
    for _ in range(400):
        # a step's values come in several calls (Lightning's logs, the monitors, the probes),
        # a new key now and then, rarely a value for an earlier step (a late divergence report)
        step += rng.choice([0, 0, 1, 1, 3])
        at = step if rng.random() > 0.05 else rng.randrange(0, step + 1)
        key = f"k{rng.randrange(12 if step > 50 else 4)}"
        value = round(rng.uniform(-1, 1), 6)
        logger.log_metrics({key: value}, step=at)
        truth.setdefault(at, {"step": at})[key] = value
        if rng.random() < 0.3:
            before = path.stat().st_ino if path.exists() else None
            complete = rng.random() < 0.2  # a checkpoint
            if complete:
                logger.after_save_checkpoint(None)
            else:
                logger.save()
            if path.exists():
                text = path.read_bytes().decode()
                newest = max(truth)
                if complete:
                    assert text == reference(truth, truth), step
                else:  # every row but the newest as rewriting gives it; that one maybe not yet
                    with open(path, newline="") as f:
                        found = {int(r["step"]): r for r in csv.DictReader(f)}
                    assert set(found) - {newest} == set(truth) - {newest}, step
                    for s, row in found.items():
                        want = {k: str(v) for k, v in truth[s].items()}
                        got = {k: v for k, v in row.items() if v != ""}
                        # the newest row may be an earlier state of itself (values replaced since)
                        assert got == want or (s == newest and got.keys() <= want.keys()), s
                appends += before is not None and path.stat().st_ino == before
                rewrites += path.stat().st_ino != before
        if rng.random() < 0.01:  # a resume from a checkpoint: the later rows are logged again
            cut = rng.randrange(0, step + 1)
            logger.drop_from(cut)
            truth = {s: r for s, r in truth.items() if s < cut}
            step = cut
    logger.finalize("success")
    assert path.read_bytes().decode() == reference(truth, truth)
    assert appends > 3 * rewrites > 0  # appending is the rule


def test_a_resumed_run_continues_the_file(tmp_path):
    first = StudyCSVLogger(tmp_path, name="", version="")
    for s in range(5):
        first.log_metrics({"a": float(s)}, step=s)
    first.finalize("success")
    again = StudyCSVLogger(tmp_path, name="", version="")  # a resume: reads the file back
    again.drop_from(3)
    again.log_metrics({"a": 30.0, "b": 1.0}, step=3)
    again.log_metrics({"a": 40.0}, step=4)
    again.finalize("success")
    with open(tmp_path / "metrics.csv") as f:
        got = [(r["step"], r["a"], r["b"]) for r in csv.DictReader(f)]
    assert got == [("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "30.0", "1.0"),
                   ("4", "40.0", "")]
