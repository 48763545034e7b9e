"""What a run reports: metrics.jsonl, TensorBoard event files, and the progress display
(a tqdm bar on a terminal, plain log lines otherwise). Only process 0 writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
from tqdm import tqdm

from qat_jax.files import atomic_write


class MetricsWriter:
    """Appends one JSON object per record to workdir/metrics.jsonl and mirrors every scalar to
    TensorBoard (tensorboardX writes the event files without a TensorFlow runtime)."""

    def __init__(self, workdir: Path, tensorboard: bool):
        self.active = jax.process_index() == 0
        self._file = self._tb = None
        if not self.active:
            return
        self._file = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def drop_after(self, step: int):
        """Forget the rows of steps after `step` (a resumed run redoes them from its checkpoint),
        and a last line a kill cut short: metrics.jsonl then has one row per step and kind."""
        if not self.active:
            return
        path = Path(self._file.name)
        self._file.close()
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, step: int, **scalars):
        if not self.active:
            return
        record = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self):
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    return float(v) if hasattr(v, "dtype") or isinstance(v, float) else v


def say(text: str):
    """A line for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(text, flush=True)


class Progress:
    """A tqdm bar with loss, lr and tokens/s when stderr is a terminal; otherwise one log line
    per update, so batch logs stay readable."""

    def __init__(self, total: int, initial: int):
        self.enabled = jax.process_index() == 0
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.total = total

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        else:
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  "
                  f"tokens/s {tokens_per_s:,.0f}", flush=True)

    def message(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            say(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
