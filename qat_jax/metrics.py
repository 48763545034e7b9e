"""What a run records: metrics.jsonl and TensorBoard event files (the console's lines and
progress bar: console.py). Only process 0 writes."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import jax

from qat_jax import files

# On cloud storage an object cannot be appended to: metrics.jsonl and the event file are
# uploaded whole, at most this often (and at the end of the run).
REMOTE_FLUSH_S = 30.0


class MetricsWriter:
    """One JSON object per record in workdir/metrics.jsonl, every scalar mirrored to TensorBoard
    (tensorboardX writes the event files without a TensorFlow runtime).

    A local metrics.jsonl is appended to and flushed at every record; one on cloud storage is
    rewritten whole every REMOTE_FLUSH_S seconds and when the writer closes, and so is the
    TensorBoard event file (written locally, then uploaded)."""

    def __init__(self, workdir, tensorboard: bool):
        self.active = jax.process_index() == 0
        self._tb = self._tb_local = None
        self._path = files.path(workdir) / "metrics.jsonl"
        self._tb_dir = files.path(workdir) / "tensorboard"
        self._remote = files.is_remote(self._path)
        self._lines: list[str] = []  # the file's rows (cloud storage only)
        self._flushed = time.monotonic()
        if not self.active:
            return
        if self._remote and self._path.exists():
            self._lines = self._path.read_text(encoding="utf-8").splitlines(keepends=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            if self._remote:  # events go to a local file, uploaded whole at each flush
                self._tb_local = tempfile.TemporaryDirectory(prefix="qat_jax_tb_")
            self._tb = SummaryWriter(self._tb_local.name if self._remote else str(self._tb_dir))

    def drop_after(self, step: int):
        """Forget the rows of steps after `step` (a resumed run redoes them from its checkpoint),
        and a last line a kill cut short: metrics.jsonl then has one row per step and kind."""
        if not self.active:
            return
        lines = self._lines if self._remote else []
        if not self._remote and self._path.exists():
            try:
                lines = self._path.read_bytes().decode("utf-8").splitlines(keepends=True)
            except UnicodeDecodeError as e:
                raise files.SavedFileError(
                    f"{self._path} is not UTF-8 text ({e.reason} at byte {e.start}), so its "
                    f"rows cannot be kept: move it aside (the run resumes, and its metrics "
                    f"start again from the checkpoint)") from None
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line.rstrip("\n") + "\n")
        if self._remote:
            self._lines = kept
        files.atomic_write(self._path, "".join(kept))

    def write(self, step: int, **scalars):
        if not self.active:
            return
        record = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
        else:
            with files.naming(self._path), open(self._path, "a", encoding="utf-8") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if not self._remote or time.monotonic() - self._flushed > REMOTE_FLUSH_S:
            self.flush()

    def flush(self):
        if not self.active:
            return
        if self._tb is not None:
            self._tb.flush()
        self._sync()

    def _sync(self):
        """Cloud storage: upload metrics.jsonl and the event file, each whole."""
        if self._remote:
            files.atomic_write(self._path, "".join(self._lines))
        if self._tb_local is not None:
            for event_file in Path(self._tb_local.name).iterdir():
                files.atomic_write(self._tb_dir / event_file.name, event_file.read_bytes())
        self._flushed = time.monotonic()

    def close(self):
        if not self.active:
            return
        if self._tb is not None:
            self._tb.close()  # writes its last events
            self._tb = None
        self._sync()
        if self._tb_local is not None:
            self._tb_local.cleanup()
            self._tb_local = None


def _plain(v):
    return float(v) if hasattr(v, "dtype") or isinstance(v, float) else v
