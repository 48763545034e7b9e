"""Signals as requests: SIGTERM (preemption) and Ctrl-C (SIGINT) stop a training run between
steps, after a checkpoint, on every host at the same step."""

from __future__ import annotations

import signal

import jax

from qat_jax import console


class Preemption:
    """SIGTERM (preemption) and Ctrl-C (SIGINT) become a request the loop acts on between
    steps: save, then exit. A second Ctrl-C stops at once (the last checkpoint is kept).

    Python's own SIGINT raises KeyboardInterrupt wherever the main thread is, which is lost
    when that is inside a callback of the runtime ("Exception ignored in: _xla_gc_callback"):
    a flag is never lost. On one host our handler sets it. On several hosts every host must
    stop at the same step, so JAX's preemption sync point decides (jax.distributed's service
    catches SIGTERM on all hosts); a flag set on one host alone would leave the others
    waiting in a collective. Ctrl-C is a flag on each host in both cases."""

    def __init__(self):
        self.signal: str | None = None  # 'SIGTERM' or 'SIGINT' once requested
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        self._old = {signal.SIGINT: signal.signal(signal.SIGINT, self._handle)}
        if not self._multihost:
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == "SIGINT":  # the second Ctrl-C: now
            # A KeyboardInterrupt raised here can be swallowed by a runtime callback like the
            # first press; the process's own handler (the CLI's) may offer a stop that cannot.
            stop_now = getattr(self._old[signal.SIGINT], "stop_now", None)
            if stop_now is not None:
                stop_now()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            console.say("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again "
                        "to stop at once, losing the steps since the last checkpoint)")

    def __exit__(self, *exc):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)

    def reached(self, step: int) -> bool:
        if self.signal == "SIGINT":
            return True
        if self._multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None
