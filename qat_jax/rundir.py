"""A run's directory before and after a start: what it must hold for `train` to begin or
resume there (`check`), and what a start that failed leaves (`undo_failed_start`: nothing).

Refused before anything loads or compiles: another kind of workdir (a sweep's or a study's),
a finished run, a run with another config, a checkpoints/ that is a file or that is gone while
the metrics show the run got past its first checkpoint, and a Hugging Face start
(model.init_from) that does not fit the config.
"""

from __future__ import annotations

import json
import logging

import jax

from qat_jax import files, kernels, runconfig, sizes
from qat_jax.errors import UserError
from qat_jax.tools import hf

log = logging.getLogger(__name__)


class RunError(UserError, RuntimeError):
    """A run that cannot start or go on, with what to do about it."""


def saved_config_diffs(directory, config) -> list[str]:
    """What `config` changes against the config.json a run in `directory` was started with
    (runconfig.config_diffs; [] where it has none); a damaged one is a RunError."""
    saved = directory / "config.json"
    if not saved.exists():
        return []
    try:
        old = json.loads(saved.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{saved} is damaged ({e}); if this run was started with the config "
                       f"you gave, move that file aside and rerun to resume it") from None
    return runconfig.config_diffs(old, config)


def pin_auto(config, directory):
    """`config` with model.matmul_precision='auto' made the value the run in `directory` was
    started with (its config.json), or for a new run this host's choice: `pin_saved`."""
    saved = directory / "config.json"
    old = None
    if config.model.matmul_precision == "auto" and saved.exists():
        try:
            old = json.loads(saved.read_text())
        except (ValueError, UnicodeDecodeError):
            pass  # a damaged config.json: `check` names it
    return pin_saved(config, old)


def pin_saved(config, saved: dict | None):
    """`config` with model.matmul_precision='auto' made the value of `saved` (a config.json
    this run or study was started with; 'float32' where it predates the key), or where there
    is none this host's choice (kernels.auto_matmul_precision): a run keeps the numerics it
    started with on any machine, and its config.json names them. Other values are left as
    they are (one that differs from the saved value is then refused as a changed config)."""
    if config.model.matmul_precision != "auto":
        return config
    value = None
    if isinstance(saved, dict):
        value = runconfig.upgrade_saved(saved).get("model", {}).get("matmul_precision")
    if value not in ("float32", "bfloat16"):
        value = kernels.auto_matmul_precision(jax.default_backend())
    return runconfig.config_with(config, **{"model.matmul_precision": value})


# What a run writes in its workdir, and whether each is a directory.
ENTRIES = {"config.json": False, "metrics.jsonl": False, "result.json": False,
           "checkpoints": True, "tensorboard": True, "damaged_checkpoints": True}


def check(workdir, config, branch: bool = False):
    """Refuse what `train` must not start or resume in `workdir` (module docstring). A sweep's
    branch (`branch`) starts at its branch point, not at step 0."""
    files.check_workdir_kind(workdir, "run")
    for name, is_dir in ENTRIES.items():
        entry = workdir / name
        if entry.exists() and entry.is_dir() != is_dir:
            raise RunError(f"{entry} is a {'file' if is_dir else 'directory'}, not the run's "
                           f"{name} {'directory' if is_dir else 'file'}: move it aside, or "
                           f"choose another --workdir")
    saved_ckpts = workdir / "checkpoints"
    if config.model.init_from and not saved_ckpts.exists():
        hf.check_matches(sizes.ModelSpec.from_config(config), config.model.init_from)
    if not branch:
        _check_checkpoints_not_lost(workdir, config)
    result = workdir / "result.json"
    if result.exists():
        raise RunError(f"{workdir} holds a finished run ({result}); it is never overwritten: "
                       f"choose a new --workdir, or move that one aside")
    diffs = saved_config_diffs(workdir, config)
    if diffs:
        raise RunError(f"{workdir} holds a run with another config; resuming it with this one "
                       f"would mix two runs. Differences: {'; '.join(diffs)}. Use a new --workdir.")


def _check_checkpoints_not_lost(workdir, config):
    """A run whose metrics went past its first checkpoint but that has no checkpoint left
    (checkpoints/ removed) would silently start again at step 0 and drop its metrics."""
    saved, rows = workdir / "checkpoints", workdir / "metrics.jsonl"
    if (saved.is_dir() and any(saved.iterdir())) or not rows.is_file():
        return
    steps = [0]
    for line in rows.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            steps.append(int(row.get("step", 0)) if isinstance(row, dict) else 0)
        except (ValueError, TypeError):
            continue
    first = config.checkpoint.every_steps
    if max(steps) > first:
        raise RunError(f"{workdir} has metrics up to step {max(steps)} but no checkpoint (the "
                       f"first was due at step {first}): were its checkpoints/ removed? It "
                       f"cannot resume. Put them back, or start afresh in another --workdir")


def entries(workdir) -> set[str] | None:
    """The names in `workdir` (None: it does not exist): what `undo_failed_start` keeps."""
    return {p.name for p in workdir.iterdir()} if workdir.is_dir() else None


def undo_failed_start(workdir, before: set[str] | None):
    """A new run (no config.json before it started) that failed before its first checkpoint
    leaves the workdir as it found it (`before`, from `entries`): what it wrote (config.json,
    metrics, events, an empty checkpoints/) is removed, and the directory too if it made it,
    so the corrected command can start there. A run with a checkpoint, or a resumed one, is
    left as it is."""
    if jax.process_index() != 0 or (before is not None and "config.json" in before):
        return
    saved = workdir / "checkpoints"
    if saved.is_dir() and any(saved.iterdir()):
        return
    try:
        for entry in workdir.iterdir():
            if before is None or entry.name not in before:
                entry.rmtree() if entry.is_dir() else entry.unlink()
        if before is None:
            workdir.rmtree()
    except OSError as e:  # never mask the error that ended the run
        log.warning("could not remove what the failed start wrote in %s: %s", workdir, e)
