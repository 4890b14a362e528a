"""How long a fit took to reach its first training step."""
from __future__ import annotations

import os
import sys
import time

import lightning as L

# the start-up of the newest fit in this process, in seconds: "fit_s" (wall) and "fit_cpu_s"
# from cli_main's start to the first training step, "process_s" and "process_cpu_s" from the
# process's start (its first fit only). `reproduce`'s workers, which run many fits in one
# process, read it after each.
STARTUP: dict[str, float] = {}


def process_age() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc, 10 ms ticks), so
    that the imports before any bnstudy code ran count too; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupTime(L.Callback):
    """Says at the first training step how long the fit took to get there (parsing, building,
    loading, and for a process's first fit its imports): one line on stderr, and STARTUP.
    `began` is (time.perf_counter(), time.process_time()) when the fit began."""

    fits = 0  # StartupTimes made in this process: the first one's fit paid the imports

    def __init__(self, began: tuple[float, float]):
        StartupTime.fits += 1
        self.began, self.first_in_process, self.said = began, StartupTime.fits == 1, False
        STARTUP.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.said or not trainer.is_global_zero:
            return
        self.said = True
        STARTUP["fit_s"] = time.perf_counter() - self.began[0]
        STARTUP["fit_cpu_s"] = time.process_time() - self.began[1]
        age = process_age() if self.first_in_process else None
        if age is not None:
            STARTUP["process_s"], STARTUP["process_cpu_s"] = age, time.process_time()
        print(f"bnstudy: first training step {STARTUP['fit_s']:.2f} s after the fit began "
              f"({STARTUP['fit_cpu_s']:.2f} s CPU)" + (
                  f", {age:.2f} s after the process started ({time.process_time():.2f} s CPU)"
                  if age is not None else ""), file=sys.stderr, flush=True)
