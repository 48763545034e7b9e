"""A run's files: written so that a kill never leaves half of one under its name, in a workdir
that one process at a time may write.

A workdir is a local directory or a location on cloud storage (gs://bucket/dir, s3://...): every
path goes through `path()`, an etils.epath.Path, which reads and writes both (gs:// through
gcsfs: `pip install -e ".[gcs]"`). Orbax writes checkpoints there itself (tensorstore)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from etils import epath

from qat_jax.errors import UserError

LOCK_FILE = ".qat_jax.lock"


# The fsspec back-end each cloud scheme needs, and the extra that installs it.
BACKENDS = {"gs": ("gcsfs", "pip install -e '.[gcs]'"), "s3": ("s3fs", "pip install s3fs")}


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as a path that may be local or on cloud storage (pathlib would turn gs://b/x into the
    local gs:/b/x). A local one is made absolute, with ~ expanded. A cloud path whose back-end
    is not installed is a UserError saying what to install."""
    if not is_remote(p):
        return epath.Path(os.path.abspath(os.path.expanduser(p)))
    scheme = os.fspath(p).split("://", 1)[0]
    if scheme in BACKENDS:
        module, install = BACKENDS[scheme]
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"{p}: {scheme}:// paths need {module}, which is not installed "
                            f"({install})") from None
    return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
    """Whether `p` is on cloud storage (a URI such as gs://, s3://), not a local path."""
    return "://" in os.fspath(p)


def atomic_write(where: str | os.PathLike, data: bytes | str) -> epath.Path:
    """Write `data` (text as UTF-8) to a temporary file beside `where`, then rename it over
    `where`: a reader sees the old file or the new one, never a part of it. On cloud storage an
    object is replaced whole when its upload completes, so it is written directly."""
    target = path(where)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(target):
        target.write_bytes(data)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(target.with_name(f".{target.name}.{os.getpid()}.tmp"))
    try:
        with naming(target):
            tmp.write_bytes(data)
            os.replace(tmp, target)
    finally:  # a full disk: no half-written temporary left behind
        tmp.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def naming(path: str | os.PathLike):
    """An OSError raised inside that names no file (a full disk's failed write does not) is
    raised again naming `path`, so that the message says where."""
    try:
        yield
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None


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
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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


class SavedFileError(UserError, ValueError):
    """A file qat-jax wrote earlier (config.json, metrics.jsonl, runs.jsonl, a cache) that
    cannot be read back: the message names it, what is wrong, and the fix."""


def read_json(p, fix: str, kind: type = dict):
    """The JSON value of a saved file, which must be a `kind` (dict by default): the one
    reader of every saved JSON file. Anything else (missing, truncated, not UTF-8, another
    type) is a SavedFileError naming the file and `fix` (what to do about it)."""
    p = path(p)
    try:
        value = json.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SavedFileError(f"{p}: no such file; {fix}") from None
    except UnicodeDecodeError as e:
        raise SavedFileError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             f"{fix}") from None
    except (OSError, ValueError) as e:
        raise SavedFileError(f"{p} cannot be read ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:120]}); {fix}") from None
    if not isinstance(value, kind):
        raise SavedFileError(f"{p} holds a {type(value).__name__}, not a "
                             f"{'JSON object' if kind is dict else kind.__name__}; {fix}")
    return value


def read_jsonl(p, fix: str) -> list[dict]:
    """The rows of a saved JSON-lines file (blank lines skipped), each of which must be a JSON
    object: the one reader of runs.jsonl and metrics.jsonl. A bad line is a SavedFileError
    naming the file, the line and `fix`."""
    p = path(p)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SavedFileError(f"{p}: no such file; {fix}") from None
    except UnicodeDecodeError as e:
        raise SavedFileError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             f"{fix}") from None
    except OSError as e:
        raise SavedFileError(f"{p} cannot be read ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:120]}); {fix}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SavedFileError(f"{p}, line {i}: not JSON ({e}); {fix}") from None
        if not isinstance(row, dict):
            raise SavedFileError(f"{p}, line {i}: {line.strip()[:40]!r} is not a JSON object "
                                 f"(each line is one run or row); {fix}")
        rows.append(row)
    return rows


# What marks a directory as one kind of qat-jax workdir: a run's, a sweep's or a study's.
WORKDIR_MARKS = {"run": ("config.json", "checkpoints", "result.json"),
                 "sweep": ("trunk", "runs", "sweep.json"),
                 "study": ("repro.json", "sweeps")}


def check_workdir_kind(directory, kind: str) -> None:
    """Refuse `directory` for a `kind` ('run', 'sweep' or 'study') when it holds another
    kind's files (a run inside a sweep's directory, or the reverse, would mix the two), or
    other workdirs (workdirs/, a sweep's runs/): a directory of runs is not a run."""
    directory = path(directory)
    for other, marks in WORKDIR_MARKS.items():
        found = [m for m in marks if other != kind and (directory / m).exists()]
        if found:
            raise UserError(f"{directory} holds a {other}'s files ({', '.join(found)}), not a "
                            f"{kind}'s: the two would mix. Choose another --workdir for this "
                            f"{kind}")
    if not directory.is_dir() or any((directory / m).exists() for m in WORKDIR_MARKS[kind]):
        return
    nested = sorted(p.name for p in directory.iterdir() if p.is_dir() and any(
        (p / m).exists() for m in ("config.json", "sweep.json", "repro.json")))
    if nested:
        shown = ", ".join(nested[:5]) + (f", ... ({len(nested)} in all)"
                                         if len(nested) > 5 else "")
        raise UserError(f"{directory} holds other qat-jax workdirs ({shown}), not a {kind} of "
                        f"its own: give one of them to resume it, or a new --workdir")
