"""A CSV logger for runs that are resumed: one row per logged step, and a resume replaces the rows
it repeats. Lightning's CSVLogger deletes metrics.csv when its directory is not empty (which would
throw away everything logged before a requeue or a resume), writes a row per log call (two to
four sparse rows per step) and appends rows a resumed run logs again."""
from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
    its row (a later value of the same key replaces the earlier one). save() rewrites the whole
    file through a temporary file and a rename, so a crash never leaves half a file."""

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
        self._dirty = False

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        for metrics in self.metrics:
            self.rows.setdefault(int(metrics["step"]), {}).update(metrics)
        self.metrics = []
        self._dirty = True

    def drop_from(self, step: int) -> None:
        """Forget the rows of steps >= step: a run resumed from the checkpoint of that step logs
        them again."""
        for s in [s for s in self.rows if s >= step]:
            del self.rows[s]
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        keys = sorted({k for row in self.rows.values() for k in row} - {"step"})
        tmp = f"{self.metrics_file_path}.tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys + ["step"])
            writer.writeheader()
            writer.writerows(self.rows[s] for s in sorted(self.rows))
        os.replace(tmp, self.metrics_file_path)
        self.metrics_keys = keys + ["step"]
        self._dirty = False


class StudyCSVLogger(CSVLogger):
    """CSVLogger with one row per step that keeps an existing metrics.csv (see the module doc)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._fs is not None and self.root_dir:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _StepRowWriter(log_dir=self.log_dir)
        return super().experiment

    def drop_from(self, step: int) -> None:
        self.experiment.drop_from(step)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # rows reach the disk with every checkpoint: after a hard crash (SIGKILL, OOM, a lost
        # node) metrics.csv holds every step up to the checkpoint the run resumes from
        self.save()
