"""The `qat-jax` process around the commands: its logging, Ctrl-C, the jax backend's start-up
errors and jax.distributed's flags (cli.py parses flags and runs the commands)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from absl import flags
from absl import logging as absl_logging

from qat_jax.errors import UsageError


def setup_logging():
    # Keep the console to our own lines and warnings; orbax and jax log a lot at INFO.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="qat-jax: %(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_line_library_errors)
    sys.unraisablehook = _one_line_unraisable(sys.unraisablehook)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _one_line_unraisable(default):
    """Errors raised where Python cannot propagate them (tensorstore's callbacks into the event
    loop of a save that already failed) as one line each, once; one through our code keeps
    the full form."""
    seen = set()

    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if any("qat_jax" in f.filename for f in frames):
            return default(unraisable)
        line = f"qat-jax: ignored: {unraisable.exc_type.__name__}: {unraisable.exc_value}"
        if line not in seen:
            seen.add(line)
            print(line[:300], file=sys.stderr)

    return hook


# orbax's warnings that are its normal working when a checkpoint is only read (eval, export,
# generate open the manager read-only; a step's items keep their metadata one level up).
_ROUTINE_WARNINGS = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
                     "Metadata file does not exist")


def _one_line_library_errors(record: logging.LogRecord) -> bool:
    """A library's error (orbax's background save threads log each failure with its traceback
    before our own error says what happened and what to do) as its first line only; orbax's
    routine warnings not at all."""
    if record.levelno == logging.WARNING and "site-packages" in record.pathname:
        return not record.getMessage().startswith(_ROUTINE_WARNINGS)
    if record.levelno >= logging.ERROR and "site-packages" in record.pathname:
        record.msg = (record.getMessage().splitlines() or [""])[0][:300]
        record.args, record.exc_info, record.exc_text = (), None, None
    return True


def init_distributed(fv):
    """jax.distributed.initialize() from the flags, each checked first: a coordinator that is
    not host:port, a process_id out of range, or no cluster to find peers in is a UsageError."""
    import jax

    address, n, i = fv.coordinator_address, fv.num_processes, fv.process_id
    if not (fv.distributed or address):
        if n is not None or i is not None:
            raise UsageError("--num_processes and --process_id are read only with --distributed "
                             "or --coordinator_address")
        return
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--coordinator_address={address!r}: expected host:port with a port "
                             f"in 1..65535 (e.g. 10.0.0.1:1234), the address of process 0")
        try:
            socket.getaddrinfo(host.strip("[]"), int(port))
        except OSError as e:
            raise UsageError(f"--coordinator_address={address!r}: the host {host!r} does not "
                             f"resolve ({e.strerror or e}); give process 0's address") from None
    if n is not None and n < 1:
        raise UsageError(f"--num_processes={n}: must be at least 1")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise UsageError(f"--process_id={i}: must be in 0..{'N-1' if n is None else n - 1}"
                         f"{'' if n is None else f' (--num_processes={n})'}")
    if address:
        print(f"jax.distributed: joining {n or 'the'} process(es) at {address} (up to 5 min)",
              flush=True)
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i)
    except (ValueError, RuntimeError) as e:  # JaxRuntimeError is a RuntimeError
        detail = (str(e).splitlines() or [""])[0][:200]
        raise UsageError(
            f"jax.distributed.initialize() failed ({detail}). On TPU pods, SLURM and Open MPI it "
            f"finds its peers itself; elsewhere give --coordinator_address=HOST:PORT, "
            f"--num_processes and --process_id to every process; on one host drop --distributed"
        ) from None


def in_backend_start(e: BaseException) -> bool:
    """Whether `e` was raised while jax started its backends (xla_bridge), where a platform
    named in JAX_PLATFORMS that is not installed ends in a RuntimeError or an assertion."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).name == "xla_bridge.py"


def run(main):
    """The process: main(argv), with Ctrl-C made dependable. Python's own SIGINT handling raises
    KeyboardInterrupt wherever the main thread is, and jax's runtime callbacks swallow it
    ("Exception ignored in: _xla_gc_callback"); then a second Ctrl-C must end the command at
    once. After an interrupt the process ends without the interpreter's teardown, which can
    crash (a segfault) while the runtime's threads are still at work; our files are written
    whole or not at all, and training saves before it stops."""
    signal.signal(signal.SIGINT, _interrupt)
    code = main(sys.argv[1:])
    if code == 130 or _INTERRUPTS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


_INTERRUPTS: list[float] = []


def _interrupt(signum, frame):
    _INTERRUPTS.append(time.monotonic())
    if len(_INTERRUPTS) > 1:  # the first was lost in a callback, or the user will not wait
        _stop_now()
    raise KeyboardInterrupt


def _stop_now():
    """Ends the process at once with 130, past any callback that would swallow an exception."""
    sys.stdout.flush()
    print("\nqat-jax: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


_interrupt.stop_now = _stop_now  # what a training loop's second Ctrl-C calls (preemption.py)


def distributed_flags(fv: flags.FlagValues):
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host; on "
                      "TPU pods and SLURM it finds its peers itself)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host GPUs)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-host GPUs)",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index (multi-host GPUs)",
                         flag_values=fv)


def config_file(fv) -> str:
    """The --config argument (FILE[:ARG]) a command's config was loaded from (cli.py keeps it
    on the flag: the config file is executed once, there)."""
    return fv["config"].file_argument
