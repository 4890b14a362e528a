"""Checkpoints written to a temporary file and renamed: a failed save leaves the old one."""
from __future__ import annotations

import contextlib
import io
import os

import torch
from lightning.fabric.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own directory, then renames it over the old
    one: a failed save (a full disk, a killed process) leaves the previous checkpoint intact.
    Lightning's own atomic save stages the file in the system temp dir and moves it, which is a
    copy (not atomic) when that is another file system."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        buffer = io.BytesIO()  # serialized first: torch.save would hide a write's OSError
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            # torch's zip writer, closing after a failed write, raises a RuntimeError of its own
            # ("unexpected pos"): report the write's OSError (a full disk), naming the file
            cause = err.__context__ if isinstance(err, RuntimeError) else err
            if isinstance(cause, OSError) and (cause is not err or cause.filename is None):
                raise OSError(cause.errno, cause.strerror, cause.filename or path) from None
            raise
