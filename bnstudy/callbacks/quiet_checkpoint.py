"""ModelCheckpoint with the per-step cost of the hooks that do nothing on most steps cut."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class QuietCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for the checkpoint callbacks of every fit (BestCheckpoint, LastCheckpoint).

    Lightning formats every callback's state_key for each hook it calls, six a training step,
    and ModelCheckpoint's is the repr of its settings (2.3 us; two such callbacks came to 2% of a
    DLN step). Here the key is made by `_make_state_key` and kept until one of the settings it
    is made of changes. on_train_batch_end goes to ModelCheckpoint's only when a step count or a
    time interval of ModelCheckpoint's own triggers saves (otherwise it returns without doing
    anything, after reading the trainer's state)."""

    # the attributes `_make_state_key` reads (a subclass whose key reads others adds them)
    KEY_SETTINGS = ("monitor", "mode", "_every_n_train_steps", "_every_n_epochs",
                    "_train_time_interval")

    def _make_state_key(self) -> str:
        return super().state_key

    @property
    def state_key(self) -> str:
        settings = tuple(getattr(self, name) for name in self.KEY_SETTINGS)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != settings:
            cached = self._state_key_cache = (settings, self._make_state_key())
        return cached[1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._every_n_train_steps >= 1 or self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
