"""Training callbacks that are not instruments (those are in bnstudy/instruments/), one per file as
Lightning keeps its own: the divergence guard, checkpoints, signals at step end, the progress bar,
throughput, start-up time, W&B/config bookkeeping, the trajectory's checkpoints and the fit's
closing lines."""
from bnstudy.callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from bnstudy.callbacks.best_checkpoint import BestCheckpoint
from bnstudy.callbacks.divergence_guard import DivergedError, DivergenceGuard
from bnstudy.callbacks.fit_summary import FitSummary
from bnstudy.callbacks.last_checkpoint import LastCheckpoint
from bnstudy.callbacks.logger_save_config_callback import LoggerSaveConfigCallback
from bnstudy.callbacks.quiet_checkpoint import QuietCheckpoint
from bnstudy.callbacks.resume_logs import ResumeLogs
from bnstudy.callbacks.startup_time import StartupTime
from bnstudy.callbacks.step_end_signals import Interrupted, StepEndSignals
from bnstudy.callbacks.step_progress_bar import StepProgressBar
from bnstudy.callbacks.throughput_at_log_steps import ThroughputAtLogSteps
from bnstudy.callbacks.trajectory_checkpoint import TrajectoryCheckpoint

__all__ = ["AtomicCheckpointIO", "BestCheckpoint", "DivergedError", "DivergenceGuard",
           "FitSummary", "Interrupted", "LastCheckpoint", "LoggerSaveConfigCallback",
           "QuietCheckpoint", "ResumeLogs", "StartupTime", "StepEndSignals", "StepProgressBar",
           "ThroughputAtLogSteps", "TrajectoryCheckpoint"]
