"""A CSV logger that survives resumes: Lightning's CSVLogger deletes metrics.csv when its directory
is not empty, which would throw away everything logged before a requeue or --ckpt_path resume."""
from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep an existing metrics.csv and append to it. Rows logged after the last checkpoint of
        # an interrupted run stay in the file: a step can appear twice, the later row wins.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class StudyCSVLogger(CSVLogger):
    """CSVLogger that appends to an existing metrics.csv instead of deleting it."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._fs is not None and self.root_dir:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment
