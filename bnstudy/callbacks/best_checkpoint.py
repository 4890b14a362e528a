"""The best checkpoint (save_top_k), kept right across resumes."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from bnstudy.callbacks.quiet_checkpoint import QuietCheckpoint


class BestCheckpoint(QuietCheckpoint):
    """ModelCheckpoint whose save_top_k holds across resumes. last.ckpt is written at the end of a
    step or of its validation, maybe before this callback's save there, so the best checkpoint
    saved by that validation may not be in the state a resume restores: it would stay forever
    beside the later best ones. On resume,
    checkpoints of this callback unknown to the restored state are adopted (their score is in
    their own state) when they are from before the resume point, and deleted when they are from
    the abandoned steps after it (the resumed run makes them again)."""

    def _make_state_key(self) -> str:  # as ModelCheckpoint's, so checkpoints stay interchangeable
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs, train_time_interval=self._train_time_interval
        ).replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        prefix = (self.filename or "").split("{")[0]
        if trainer.ckpt_path is None or not self.dirpath or not prefix or self.save_top_k < 1:
            return
        known = {os.path.abspath(p) for p in self.best_k_models}
        for path in sorted(Path(self.dirpath).glob(f"{prefix}*.ckpt")):
            if os.path.abspath(path) in known:
                continue
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                step = ckpt["global_step"]
                score = ckpt["callbacks"][self.state_key]["current_score"]
            except Exception:  # not one of ours: leave it alone
                continue
            if step > trainer.global_step:
                trainer.strategy.remove_checkpoint(path)
            elif score is not None:
                self.best_k_models[str(path)] = torch.as_tensor(score)
        while len(self.best_k_models) > self.save_top_k:
            worst = (max if self.mode == "min" else min)(self.best_k_models,
                                                        key=self.best_k_models.get)
            del self.best_k_models[worst]
            trainer.strategy.remove_checkpoint(worst)
        if self.best_k_models:
            best = (min if self.mode == "min" else max)(self.best_k_models,
                                                       key=self.best_k_models.get)
            self.best_model_path, self.best_model_score = best, self.best_k_models[best]
            self.kth_best_model_path = (max if self.mode == "min" else min)(
                self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
