"""A run's files: written so that a kill never leaves half of one under its name, in a workdir
that one process at a time may write."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from qat_jax.errors import UserError

LOCK_FILE = ".qat_jax.lock"


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, then rename it over
    `path`: a reader sees the old file or the new one, never a part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:  # a full disk: no half-written temporary left behind
        tmp.unlink(missing_ok=True)
    return path


class WorkdirLock:
    """An exclusive lock on `directory` while a run, sweep or repro writes it: a second qat-jax
    on the same directory is refused, naming the one that holds it.

    The lock is flock(2) on `.qat_jax.lock`, which the kernel releases when its process ends,
    however it ends: a killed run leaves no stale lock (its file stays, naming the last holder,
    and the next process takes it over). Of a multi-host run, process 0 (the one that writes
    the workdir's files) holds it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        import jax

        if jax.process_index() != 0:
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.directory} is a file, not a directory: choose another "
                            f"--workdir")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.directory} is in use by another qat-jax ({holder}); two "
                            f"processes writing one workdir would mix their checkpoints. Wait "
                            f"for it to end or stop it, or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n"
                      ).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
