"""A callback for bench/bench_startup.py: at a fit's first training step it prints the clock and
the process's CPU time, so that the time since the process was launched is known. Given as
`--trainer.callbacks+=first_step.FirstStep` with bench/ on PYTHONPATH: it works with any
checkout's `fit`, old ones included."""
import sys
import time

import lightning as L


class FirstStep(L.Callback):
    def __init__(self):
        self.seen = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.seen:
            self.seen = True
            print(f"FIRST_STEP {time.time():.6f} {time.process_time():.6f}", file=sys.stderr,
                  flush=True)
