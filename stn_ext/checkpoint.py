"""Atomic file writes and checkpoints.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over
the target with os.replace (atomic on POSIX and Windows), so a kill at any moment leaves either the
old file or the new one, never a torn one.
"""
import io
import json
import os
import pickle
import tempfile

import torch


def _read_umask():
    mask = os.umask(0)  # the only way to read it; set straight back, once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def check_folder_creatable(out, option="--out (API: out)"):
    """Fail before any work, naming the option, when the run folder ``out`` is not a folder and cannot be made
    one (a file in the way, a missing or read-only parent)."""
    if os.path.isdir(out):
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"stn_ext: {option} {out}: the folder is not writable")
        return
    if os.path.exists(out):
        raise ValueError(f"stn_ext: {option} {out} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"stn_ext: {option} {out}: cannot create the folder, {parent} is not a writable "
                         "folder")


def atomic_write_bytes(path, data):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600; give it the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save(path, state):
    """torch.save ``state`` to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path, map_location="cpu"):
    """The state saved by ``save``: tensors and plain Python types only (``weights_only=True``), so a checkpoint
    from someone else's run folder cannot run code when it is read; anything else is refused."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"stn_ext: no checkpoint at {path} to resume from")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"stn_ext: {path} holds more than tensors and plain Python values, so it is not read "
                         f"(it could run code when unpickled); stn_ext checkpoints never do. {str(e).splitlines()[0]}") from None
