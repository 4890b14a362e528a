"""metrics.csv as StudyCSVLogger writes it: appended as a run goes, yet at every save exactly the
file that rewriting every row would give (the writer's first version did that, at a cost that grew
with the run), through resumes that drop rows and values that arrive late. And when both loggers
hand their rows on: metrics.csv at most every SAVE_EVERY_S seconds and whole at a checkpoint, W&B
a few seconds' worth of rows at a time, in order, one row a step."""
from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import lightning as L

import wandb_records
from bnstudy.callbacks import AtomicCheckpointIO
from bnstudy.cli import cli_main
from bnstudy.loggers import StudyCSVLogger, StudyWandbLogger
from tiny_fits import tiny_args


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
    logger.SAVE_EVERY_S = 0  # every save writes: this test is the writer's
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


def _steps_in(path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_metrics_csv_is_written_at_most_every_few_seconds_and_whole_at_a_checkpoint(tmp_path):
    logger = StudyCSVLogger(tmp_path, name="", version="")
    logger.SAVE_EVERY_S = 1.0
    path = tmp_path / "metrics.csv"
    for step in (0, 1):
        logger.log_metrics({"loss": float(step)}, step=step)
        logger.save()  # as Lightning calls it, after every log call
    assert _steps_in(path) == [0]  # the first save writes; the newest row may still change
    for step in (2, 3):
        logger.log_metrics({"loss": float(step)}, step=step)
        logger.save()
    assert _steps_in(path) == [0]  # within SAVE_EVERY_S of the last write: nothing new
    logger.write_rows()  # a checkpoint is about to be written: every row, the newest too
    assert _steps_in(path) == [0, 1, 2, 3]
    logger.log_metrics({"loss": 4.0}, step=4)
    logger.log_metrics({"loss": 5.0}, step=5)
    time.sleep(1.1)
    logger.save()
    assert _steps_in(path) == [0, 1, 2, 3, 4]
    logger.finalize("success")
    assert _steps_in(path) == [0, 1, 2, 3, 4, 5]


def test_wandb_gets_a_few_seconds_of_rows_at_a_time_in_order(tmp_path, monkeypatch):
    import wandb

    if wandb.run is not None:  # another test's, in this process: WandbLogger would join it
        wandb.finish()
    # mode given, not WANDB_MODE: W&B keeps the mode of the first run in a process (an earlier
    # test's, maybe disabled) and reads the variable again only for a run that names none
    logger = StudyWandbLogger(project="bnstudy-test", save_dir=str(tmp_path), mode="offline")
    logger.SEND_EVERY_S = 2.0  # far longer than the calls below take, even on a loaded machine
    run = logger.experiment
    sent = []
    log = run.log

    def spy(data, *args, **kwargs):  # W&B's own log, called through, its rows recorded
        sent.append(dict(data))
        return log(data, *args, **kwargs)

    def steps():
        return [row["trainer/global_step"] for row in sent]

    monkeypatch.setattr(run, "log", spy)
    logger.log_metrics({"loss": 0.0}, step=0)
    logger.log_metrics({"lr": 0.1}, step=0)  # the same step: merged into its row
    logger.log_metrics({"loss": 1.0}, step=1)  # step 0's row complete, nothing sent yet: it goes
    assert sent == [{"loss": 0.0, "lr": 0.1, "trainer/global_step": 0}]
    logger.log_metrics({"loss": 2.0}, step=2)
    logger.log_metrics({"loss": 3.0}, step=3)
    assert steps() == [0]  # complete rows wait until SEND_EVERY_S after the last send
    time.sleep(2.1)
    logger.log_metrics({"loss": 4.0}, step=4)  # then every row waiting goes, in order
    assert steps() == [0, 1, 2, 3] and sent[1] == {"loss": 1.0, "trainer/global_step": 1}
    logger.log_metrics({"loss": 5.0}, step=5)
    assert steps() == [0, 1, 2, 3]
    logger.after_save_checkpoint(None)  # everything so far, the open row too
    assert steps() == [0, 1, 2, 3, 4, 5]
    logger.log_metrics({"loss": 6.0}, step=6)
    time.sleep(2.1)  # logging steps further apart than SEND_EVERY_S: each row goes when complete
    logger.log_metrics({"loss": 7.0}, step=7)
    assert steps() == [0, 1, 2, 3, 4, 5, 6]
    logger.finalize("success")
    assert steps() == list(range(8))
    run.finish()
    history = [row for row in wandb_records.history(tmp_path) if "loss" in row]
    assert [(row["trainer/global_step"], row["loss"]) for row in history] == [
        (s, float(s)) for s in range(8)]


class HoldWandbRows(L.Callback):
    """Makes StudyWandbLogger hold its rows for the whole fit and records every row it sends."""

    sent: list[int] = []

    def setup(self, trainer, pl_module, stage) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, StudyWandbLogger):
                logger.SEND_EVERY_S = 1e9
                run, log = logger.experiment, logger.experiment.log

                def spy(data, *args, _log=log, **kwargs):
                    HoldWandbRows.sent.append(data["trainer/global_step"])
                    return _log(data, *args, **kwargs)

                run.log = spy


class SentAtCheckpointFile(AtomicCheckpointIO):
    """Records, as each checkpoint file is in place (before Lightning calls the loggers'
    after_save_checkpoint), the steps of metrics.csv and those sent to W&B."""

    seen: list[tuple[int, list[int], list[int]]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        steps = _steps_in(Path(path).parent.parent / "metrics.csv")
        self.seen.append((checkpoint["global_step"], steps, sorted(set(HoldWandbRows.sent))))


def test_every_row_is_in_metrics_csv_and_sent_to_wandb_before_a_checkpoint_file(in_tmp):
    """A run killed right after a checkpoint file resumes past the rows logged before it, so
    both loggers must have them by then, whatever their batching."""
    HoldWandbRows.sent.clear(), SentAtCheckpointFile.seen.clear()
    run_dir = in_tmp / "run"
    cli_main(["fit", *tiny_args("dln.yaml"), "--trainer.max_steps=6",
              "--last_checkpoint.every_n_train_steps=2",
              "--trainer.callbacks=test_loggers.HoldWandbRows",
              "--trainer.plugins=test_loggers.SentAtCheckpointFile", f"--run_dir={run_dir}"])
    saved = [step for step, _, _ in SentAtCheckpointFile.seen]
    assert {2, 4, 6} <= set(saved), saved
    for step, csv_steps, wandb_steps in SentAtCheckpointFile.seen:
        assert csv_steps and csv_steps == wandb_steps, (step, csv_steps, wandb_steps)
        assert max(csv_steps) >= step - 1, (step, csv_steps)  # the step just trained is there
