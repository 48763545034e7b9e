"""A run's newest readable checkpoint restored on this machine: what eval, the exports and
generate start from."""

from __future__ import annotations

import jax

from qat_jax import ckpt, resolve, runconfig, rundir, sharding, trainstep


def restore(workdir: str, eval_batches: int | None = None):
    """(run, setup, step, params) of the newest readable checkpoint, on this machine's
    devices (all on the data axis), so a run trained on a pod evaluates on one host; `run` is
    the workdir's saved config resolved (phases.Run), with that mesh."""
    config = runconfig.load_run_config(workdir)
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        if eval_batches is not None:
            config.data.eval_batches = eval_batches
    run = resolve.resolve(config)
    mesh = sharding.make_mesh(run.mesh)
    setup = trainstep.Setup.create(run, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        # read-only: evaluating never changes a run (one may be training in it right now)
        saved = ckpt.Checkpoints(workdir, run.loop.max_to_keep, read_only=True)
        try:
            restored = saved.restore_latest(setup.abstract_state)
        finally:
            saved.close()
    if restored is None:
        raise rundir.RunError(f"{workdir} has no checkpoint to evaluate")
    step, state = restored
    return run, setup, step, state.params
