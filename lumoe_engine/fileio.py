"""File helpers shared by the bank, the gate, the ledger, the store and the stream: safe ids, atomic durable writes.

Torch-free, so that whatever records requests needs nothing heavier than the standard library here.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Union

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def validate_expert_id(expert_id: object) -> str:
    """Return ``expert_id`` if it is a safe expert id, else raise ValueError saying what is allowed.

    Allowed: 1 to 128 characters from ``A-Z a-z 0-9 . _ -`` (so no path separator), and not ``.`` or ``..``:
    the id is also the file name ``<id>.safetensors`` and must not escape the store.
    """
    if not isinstance(expert_id, str) or not _ID_RE.fullmatch(expert_id) or expert_id in (".", ".."):
        raise ValueError(
            f"expert id {expert_id!r} is not allowed: use 1 to 128 characters from A-Z, a-z, 0-9, '.', '_', '-' "
            f"(no path separators, not '.' or '..')")
    return expert_id


def fsync_dir(path: Path) -> None:
    """fsync a folder (so a rename in it is durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], data: Union[bytes, str], durable: bool = True) -> Path:
    """Write ``data`` (bytes, or text written as UTF-8) to ``path`` atomically: a temporary file in the same folder
    (created with its parents when missing), fsync, rename, fsync of the folder. ``durable=False`` skips both fsyncs:
    still atomic, but a power loss may lose the latest writes. Returns ``path``. The project's one atomic write:
    the bank, the gate, the ledger, the store, step records, metrics and summaries all go through it."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return path
