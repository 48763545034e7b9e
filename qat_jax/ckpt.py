"""Checkpoints: the train state and the data iterator, saved together by orbax.

Resume order: find the newest step whose checkpoint restores completely (state and data
iterator); an unreadable one (corrupt or partial files) is reported and the previous one is used.
The state is restored straight into the current mesh's shardings, so a checkpoint written on
one mesh restores on another. A sweep's FP trunk keeps its branch points (`keep_steps`) beyond
`max_to_keep`, and its branches restore from it read-only. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from qat_jax import files
from qat_jax.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of a workdir that has some could be restored."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (no space, no permission); the last good one is kept."""


class Checkpoints:
    def __init__(self, workdir: str | Path, max_to_keep: int, keep_steps=(),
                 read_only: bool = False):
        self.directory = files.path(workdir) / "checkpoints"  # local or cloud storage
        self.read_only = read_only
        policy = policies.AnyPreservationPolicy(
            [policies.LatestN(max_to_keep), policies.CustomSteps(list(keep_steps))])
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                                 create=not read_only, read_only=read_only),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter):
        if step in self.manager.all_steps():  # a rerun reaching a saved step: the same state
            return
        with self._write_errors():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

    @contextlib.contextmanager
    def _write_errors(self):
        """A save that fails for lack of space or permission (orbax raises it here or at the
        next save or wait, as a ValueError from tensorstore or an OSError) becomes one clear
        CheckpointError naming the last good checkpoint, whose files are untouched: orbax
        writes a step into a temporary directory, removed here to give the space back."""
        try:
            yield
        except Exception as e:
            text = str(e)
            reason = next((r for k, r in _WRITE_FAILURES if k in text), None)
            if reason is None and not isinstance(e, OSError):
                raise
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                with contextlib.suppress(OSError):
                    tmp.rmtree()
            kept = self.steps()
            raise CheckpointWriteError(
                f"could not write a checkpoint in {self.directory}: "
                f"{reason or (text.splitlines() or [''])[0][:200]}. The last good checkpoint "
                f"is {f'step {kept[-1]}' if kept else 'none'}; free space (or fix the "
                f"permission) and rerun the same command to resume from it") from None

    def restore_latest(self, abstract_state, data_iter=None, at_most: int | None = None):
        """(step, state) of the newest readable checkpoint (at step `at_most` or before, when
        given), with `data_iter` (when given) moved to its position; None when there is none.
        `abstract_state` is a tree of jax.ShapeDtypeStruct carrying the target shardings."""
        steps = [s for s in self.steps() if at_most is None or s <= at_most]
        for i, step in enumerate(reversed(steps)):
            self._check_same_model(step, abstract_state)
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax / tensorstore raise many types for damaged files
                older = steps[-i - 2] if i + 1 < len(steps) else None
                moved = self._move_aside(step)
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s)%s; %s", step,
                            self.directory, type(e).__name__, str(e).splitlines()[0][:200],
                            f", moved to {moved}" if moved else "",
                            f"falling back to step {older}" if older is not None else
                            "no older checkpoint")
                continue
            _check_shapes(restored.state, abstract_state, self.directory / str(step))
            return step, restored.state
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be restored (see the "
                f"warnings above); move that directory aside to start the run afresh")
        return None

    def _check_same_model(self, step: int, abstract_state):
        """A checkpoint whose saved arrays (their shapes and dtypes, read from its metadata)
        are not this config's state is another model, not a damaged file: refused as a config
        mismatch, and left where it is. Unreadable metadata is left to the restore (which
        moves a damaged step aside)."""
        try:
            meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
            tree = getattr(meta.item_metadata, "tree", meta.item_metadata)
            saved = _shapes(tree)
        except Exception:  # damaged metadata: the restore below decides
            return
        want = _shapes(abstract_state)
        if saved and saved != want:  # no arrays in it: the metadata is gone (damage)
            only_saved = sorted(set(saved) - set(want))[:3]
            only_want = sorted(set(want) - set(saved))[:3]
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} holds another model than this config's "
                f"(arrays {only_saved} there, {only_want} here): it was trained with another "
                f"config, and its run's config.json is missing or was replaced. Rerun with the "
                f"config it was trained with, or choose another --workdir; nothing was moved")

    def _move_aside(self, step: int) -> Path | None:
        """Move an unreadable step out of the way (into ../damaged_checkpoints/), so that the
        resumed run saves that step anew instead of trusting the damaged one by its name. A
        read-only manager (a sweep's trunk, seen from a branch) leaves it where it is."""
        if self.read_only or jax.process_index() != 0:
            return None
        src = self.directory / str(step)
        if not src.is_dir():
            return None
        dst = self.directory.parent / "damaged_checkpoints" / f"{step}-{int(time.time())}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        self.manager.reload()
        return dst

    def wait(self):
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self):
        with self._write_errors():
            self.manager.close()


# Text of the errors tensorstore raises for a failed write, and what they mean.
_WRITE_FAILURES = (("No space left on device", "no space left on the device"),
                   ("Disk quota exceeded", "the disk quota is exceeded"),
                   ("Read-only file system", "the file system is read-only"),
                   ("Permission denied", "permission denied"))


def _shapes(tree) -> list[tuple]:
    """The sorted (shape, dtype) of every array leaf of a state or of a checkpoint's metadata
    (their tree types differ: a dataclass against dicts; the arrays do not)."""
    return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)
                  if hasattr(x, "shape") and hasattr(x, "dtype"))


def _check_shapes(state, abstract_state, where):
    got = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
    if got != want:
        raise CheckpointError(f"checkpoint {where} does not match this config's model "
                              f"(shapes differ); use the config it was written with")
