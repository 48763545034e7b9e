"""What a user sees while a command runs: lines from process 0 (`say`) and the progress display
(a tqdm bar on a terminal, plain log lines otherwise)."""

from __future__ import annotations

import sys

import jax
from tqdm import tqdm


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
