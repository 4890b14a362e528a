"""The loggers of every config (configs/common/loggers.yaml).

StudyCSVLogger, for runs that are resumed: one row per logged step, and a resume replaces the rows
it repeats. Lightning's CSVLogger deletes metrics.csv when its directory is not empty (which would
throw away everything logged before a requeue or a resume), writes a row per log call (two to
four sparse rows per step) and appends rows a resumed run logs again.

StudyWandbLogger: Lightning's WandbLogger with one W&B call per logged step instead of one per
log call, the calls made a few seconds' worth at a time (see its doc).

Both hand their rows on in batches, a few seconds' worth at a time, because a logging step between
training steps is slow out of all proportion on a CPU: one W&B `run.log` took 0.59 ms and 0.31 ms
of the process's CPU with ten tiny DLN steps before it, and 0.07 ms and 0.04 ms right after
another one (its code and data stay in the CPU's caches), and appending one row to metrics.csv
cost 0.18 ms."""
from __future__ import annotations

import csv
import os
import time

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

ROWS_EVERY_S = 5.0  # both loggers hand their rows on at most this often between checkpoints


def _number(text: str):
    """A value read back from metrics.csv, of the type it was logged with: an int stays an int
    (rewritten as "1", not "1.0"), so the rows kept by a resume are the same text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class _StepRowWriter(ExperimentWriter):
    """Keeps every row of metrics.csv in memory, keyed by step; values logged at a step merge into
    its row (a later value of the same key replaces the earlier one).

    save() appends the new rows, except the newest step's (it may still get values), when no row
    already in the file changed and no column is new; otherwise it writes the whole file through a
    temporary file and a rename, so a crash never leaves half a rewritten file.
    save(complete=True) (checkpoints, the end of a fit) writes the newest row too. (Rewriting
    every row and column at every save, as this writer once did, cost a DLN run more than its
    training steps by the end of the run.)"""

    def _check_log_dir_exists(self) -> None:
        self.rows: dict[int, dict] = {}
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                for row in csv.DictReader(f):
                    if not row.get("step"):
                        continue
                    step = int(float(row["step"]))
                    values = {k: _number(v) for k, v in row.items() if k and v not in ("", None)}
                    self.rows.setdefault(step, {}).update(values, step=step)
        self._header: list[str] = []      # the file's columns, as written by this writer
        self._written = -1                # the file holds the rows of the steps <= this
        self._changed: set[int] = set()   # steps whose rows are not in the file as they are now
        self._rewrite = bool(self.rows)   # a resumed run's file is rewritten at the first save

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        for metrics in self.metrics:
            step = int(metrics["step"])
            self.rows.setdefault(step, {}).update(metrics)
            self._changed.add(step)
        self.metrics = []

    def drop_from(self, step: int) -> None:
        """Forget the rows of steps >= step: a run resumed from the checkpoint of that step logs
        them again."""
        for s in [s for s in self.rows if s >= step]:
            del self.rows[s]
            self._changed.discard(s)
            self._rewrite = True

    def save(self, complete: bool = False) -> bool:
        """Write what is due; whether anything was."""
        newest = max(self.rows, default=None)
        held = set() if complete else {newest} & self._changed  # the newest row may still change
        due = sorted(self._changed - held)
        header = set(self._header)
        if not due and not self._rewrite:
            return False
        if not self._rewrite and due[0] > self._written \
                and all(k in header for s in due for k in self.rows[s]):
            with open(self.metrics_file_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._header).writerows(self.rows[s] for s in due)
            self._written = due[-1]
            self._changed = held
            return True
        # a held row that is in the file already stays there (as it is now) until it is complete
        steps = [s for s in sorted(self.rows) if s not in held or s <= self._written]
        keys = sorted({k for s in steps for k in self.rows[s]} - {"step"})
        tmp = f"{self.metrics_file_path}.tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys + ["step"])
            writer.writeheader()
            writer.writerows(self.rows[s] for s in steps)
        os.replace(tmp, self.metrics_file_path)
        self.metrics_keys = self._header = keys + ["step"]
        self._written = steps[-1] if steps else -1
        self._changed, self._rewrite = held, False
        return True


class StudyCSVLogger(CSVLogger):
    """CSVLogger with one row per step that keeps an existing metrics.csv (see the module doc).

    The file is written at most every SAVE_EVERY_S seconds as the fit logs (Lightning asks after
    every log call), and always in full before a checkpoint file is written (write_rows)
    and when the fit ends or fails (finalize). A process killed without any chance to finalize
    (SIGKILL, OOM) loses at most the rows of its last SAVE_EVERY_S seconds, which a run resumed
    from its last checkpoint logs again anyway."""

    SAVE_EVERY_S = ROWS_EVERY_S
    _saved_at = float("-inf")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._fs is not None and self.root_dir:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _StepRowWriter(log_dir=self.log_dir)
        return super().experiment

    def drop_from(self, step: int) -> None:
        self.experiment.drop_from(step)

    @rank_zero_only
    def save(self) -> None:
        # CSVLogger.save is only the writer's save, timed here from the last one that wrote
        if time.monotonic() - self._saved_at >= self.SAVE_EVERY_S and self.experiment.save():
            self._saved_at = time.monotonic()

    @rank_zero_only
    def write_rows(self) -> None:
        """Every row logged so far, the newest too, to metrics.csv. StudyModule calls it as a
        checkpoint is made, before its file is written: after a hard crash (SIGKILL, OOM, a lost
        node), even one right after the file is written, metrics.csv holds every step up to the
        checkpoint the run resumes from. (after_save_checkpoint, Lightning's hook, comes after
        the file: a kill between the two lost the checkpoint step's row.)"""
        self.experiment.save(complete=True)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.experiment.save(complete=True)  # what was logged since write_rows, if anything

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.save(complete=True)


class StudyWandbLogger(WandbLogger):
    """Lightning's WandbLogger, sending each step's values to W&B in one `run.log` call, and
    those calls a few seconds' worth at a time.

    At a logging step the training metrics, the LR monitor and the throughput monitor (and any
    probe due) each log their own dict, and each `run.log` costs about 0.1-0.6 ms, even offline:
    three of them a logging step were 5% of a DLN step at log_every_n_steps=10. Here the values
    of one step wait and merge (a later value of a key replaces the earlier one, as in
    metrics.csv) into one row, complete when another step logs. A complete row goes to W&B at
    once when the last rows went SEND_EVERY_S seconds ago or more; otherwise it waits, and the
    rows waiting go, in order, one right after the other, with the first row completed after
    that (one call right after another costs a fifth of one made between training steps: the
    module doc). Everything logged so far also goes before a checkpoint file is written
    (StudyModule.on_save_checkpoint) and when the fit ends or fails (finalize). What W&B shows
    per trainer/global_step is the same; only the number of W&B history rows falls, and W&B's
    own uploads come every 15 s or so anyway. A process killed without any chance to finalize
    (SIGKILL) loses in W&B at most the rows of the SEND_EVERY_S seconds since the last send
    and the row still open; metrics.csv is written with every checkpoint, as before."""

    SEND_EVERY_S = ROWS_EVERY_S

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: dict = {}
        self._pending_step: int | None = None
        self._rows: list[tuple[int, dict]] = []  # complete rows not yet sent, oldest first
        self._sent_at = float("-inf")           # when the last rows went

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if step is None or self._wandb_init.get("sync_tensorboard"):
            self.write_rows()  # no step to merge by: in order, at once
            super().log_metrics(metrics, step)
            return
        if self._pending and step != self._pending_step:
            self._complete()
            if time.monotonic() - self._sent_at >= self.SEND_EVERY_S:
                self._send()
        self._pending_step = step
        self._pending.update(metrics)

    def _complete(self) -> None:
        if self._pending:
            self._rows.append((self._pending_step, self._pending))
            self._pending = {}

    def _send(self) -> None:
        rows, self._rows = self._rows, []
        for step, metrics in rows:
            super().log_metrics(metrics, step)
        if rows:
            self._sent_at = time.monotonic()

    @rank_zero_only
    def write_rows(self) -> None:
        """Send every value logged so far to W&B now (as StudyCSVLogger.write_rows writes
        metrics.csv: StudyModule calls both before a checkpoint file is written)."""
        self._complete()
        self._send()

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.write_rows()  # what was logged since StudyModule's write_rows, if anything
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.write_rows()
        super().finalize(status)
