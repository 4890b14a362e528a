"""QuietCheckpoint: the checkpoint callbacks' state keys are ModelCheckpoint's (checkpoints stay
interchangeable), made once and remade when a setting they are made of changes."""
from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.callbacks import ModelCheckpoint

from bnstudy.callbacks.best_checkpoint import BestCheckpoint
from bnstudy.callbacks.last_checkpoint import LastCheckpoint


def test_best_checkpoint_key_is_model_checkpoints_and_follows_its_settings(tmp_path):
    best = BestCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min")
    assert best.state_key == ModelCheckpoint(dirpath=tmp_path, monitor="val/loss",
                                             mode="min").state_key
    best.monitor, best.mode = "val/acc", "max"
    assert best.state_key == ModelCheckpoint(dirpath=tmp_path, monitor="val/acc",
                                             mode="max").state_key
    best._train_time_interval = timedelta(minutes=5)
    assert "timedelta(seconds=300)" in best.state_key


def test_last_checkpoint_key_counts_its_own_steps(tmp_path):
    def key(steps):  # the key its state had while ModelCheckpoint counted the steps
        return ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=steps, every_n_epochs=0
                               ).state_key.replace("ModelCheckpoint", "LastCheckpoint")

    last = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=7)
    assert last.state_key == key(7)
    last.every_n_steps = 9
    assert last.state_key == key(9)
