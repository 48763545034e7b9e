"""Shared helpers: a small config, a shared tokenizer cache, and subprocess runners."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One persistent XLA compilation cache per test process (each xdist worker), shared with the
# CLI subprocesses it starts (they inherit the environment): the suite compiles the same small
# train steps many times, and a hit skips the compile (a quarter of tests/test_train.py's time).
# A fresh directory per session, removed at its end. Set before jax is imported.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qat_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

from qat_jax.configs import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """The slow tests first (the order is otherwise kept): the two xdist workers
    (`--dist loadgroup`) take them at the start and the short ones fill in behind, rather than
    one worker finishing a minutes-long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session):
    """The session's compilation cache goes with it, removed by the process that made it (an
    xdist worker may make its own)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer / token cache for the whole session (BPE is trained once)."""
    return str(tmp_path_factory.mktemp("qat_cache"))


def small_config(cache_dir: str, **overrides):
    """A model small enough that a few dozen steps take seconds on CPU."""
    c = tiny.get_config()
    c.model.vocab_size = 512
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.d_ff = 128
    c.model.seq_len = 32
    c.data.batch_size = 8
    c.data.eval_batches = 2
    c.data.cache_dir = cache_dir
    c.schedule.total_tokens = 8 * 32 * 20  # 20 steps
    c.checkpoint.every_steps = 5
    c.logging.every_steps = 5
    c.logging.eval_every_steps = 10
    c.logging.tensorboard = False
    # the tests' numbers are float32's on every CPU ('auto' is bf16 on a CPU with bf16 dots)
    c.model.matmul_precision = "float32"
    for key, value in overrides.items():
        group, name = key.split(".")
        setattr(getattr(c, group), name, value)
    return c


def one_and_sharded():
    """(name, mesh overrides, devices) of the two meshes the sharding tests compare: one device,
    and data 2 x fsdp 2 x tensor 2 over 8 (for scripts run with n_devices=8)."""
    import jax

    return [("one", {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}, jax.devices()[:1]),
            ("sharded", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, None)]


def fixed_fraction(fraction: float) -> dict:
    """Config overrides for a QAT share of `fraction` (qat.fraction_policy='fixed')."""
    return {"qat.fraction_policy": "fixed", "qat.fraction": fraction}


def overrides_to_flags(config_overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in config_overrides.items()]


SMALL_FLAGS = {
    "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
    "model.n_kv_heads": 2, "model.d_ff": 128, "model.seq_len": 32, "data.batch_size": 8,
    "data.eval_batches": 2, "schedule.total_tokens": 8 * 32 * 20, "checkpoint.every_steps": 5,
    "logging.every_steps": 5, "logging.eval_every_steps": 10, "model.matmul_precision": "float32",
}


def cli_env(n_devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_cli(args: list[str], n_devices: int = 1, check: bool = True, timeout: int = 300,
            **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qat_jax", *args], env=cli_env(n_devices),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"qat-jax {args} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def run_python(code: str, n_devices: int, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter with `n_devices` CPU devices; returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(n_devices),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def final_params(workdir, config):
    """(step, parameters) of the newest checkpoint in `workdir`, restored on one device."""
    import jax

    from qat_jax import ckpt, resolve, sharding, trainstep

    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        checkpoints = ckpt.Checkpoints(workdir, 1, read_only=True)
        step, state = checkpoints.restore_latest(setup.abstract_state)
        checkpoints.close()
    return step, jax.device_get(state.params)


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of `size` (mount's size=, e.g. 3m) at `path`, unmounted afterwards: a disk that
    fills. Skips the test where mounting is not allowed (it needs root)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
