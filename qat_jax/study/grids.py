"""The study's grids (`qat-jax repro`): the model sizes, the points (a size, a token budget, a
seed; each one sweep), what runs at each, and the config of a point. A grid is data: the
report reads it back from study.json (`grid_from_json`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qat_jax import runconfig

# Model sizes (the rest of the config from qat_jax/configs/repro.py); parameters and served bytes at
# vocab 1024 with the embedding at max(B, 4) bits (sizes.served_bytes).
SIZES = {
    "xxs": {"d_model": 32, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "d_ff": 96},  # 48k
    "xs": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 176},  # 169k
    "s": {"d_model": 128, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 352},  # 537k
    # The smallest model with two layers (38k parameters, 14x below s): the study's grid.
    "xxs2": {"d_model": 24, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64},
    # Shapes of equal served bytes for the memory check: xs2 at 2 bits (92,320 bytes) and xs6
    # at 6 bits (92,448) weigh what xs does at 4 bits (93,056) and xxs in bf16 (92,352).
    "xs2": {"d_model": 80, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 224},  # 244k
    "xs6": {"d_model": 48, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 152},  # 114k
}

def point_name(size: str, budget: int, seed: int = 0) -> str:
    """A study point's name (`Point.name`): its size and token budget, and its seed when
    not 0."""
    return f"{size}-{budget / 1e6:g}M" + (f"-seed{seed}" if seed else "")


FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8)
UNFUSED = (0.1, 0.2, 0.35, 0.5)
FIXED_COOLDOWN = 0.1  # the cooldown share of the fixed-cooldown runs (not tied to f)
FIXED = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8)  # their QAT fractions


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep of the study: a model size and token budget, QAT at `bits` x `fractions`
    (fused cooldown) plus the FP-only run, the unfused cooldown too at the fractions
    `unfused`, with `seed` for the initialisation and the data order. With `controls`, every
    fused schedule's full-precision control (qat_jax.tools.sweep.control); with `fixed` fractions,
    fused runs whose cooldown is the last `fixed_cooldown` of the budget at every fraction.
    `peak_lr`: the point's optimizer.peak_lr (None: the config's)."""

    size: str
    budget: int
    bits: tuple[float, ...] = (2.0, 4.0, 6.0)
    fractions: tuple[float, ...] = FRACTIONS
    unfused: tuple[float, ...] = ()
    seed: int = 0
    controls: bool = True
    fixed: tuple[float, ...] = ()
    fixed_cooldown: float = FIXED_COOLDOWN
    peak_lr: float | None = None

    @property
    def name(self) -> str:
        return point_name(self.size, self.budget, self.seed)

    def n_runs(self) -> int:
        """Runs of the point, controls included (those whose schedule is the FP-only run's, or
        another control's, counted once)."""
        fused = [f for f in self.fractions if 0 < f]
        cools = {round(f, 6) for f in fused} - {0.2} if self.controls else set()
        if self.controls and self.fixed:
            cools.add(round(self.fixed_cooldown, 6))
        return (1 + len(cools) + len(self.bits) * (len(fused) + len(self.unfused)
                                                    + len(self.fixed)))


@dataclasses.dataclass(frozen=True)
class Grid:
    """The study: its points; `holdout` is a model size left out of a second law fit and
    predicted by it; a `smoke` grid checks the pipeline and is not evidence for any claim."""

    name: str
    points: tuple[Point, ...]
    holdout: str | None = None
    smoke: bool = False
    max_epochs: float = 4.0

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.size for p in self.points))

    @property
    def bits(self) -> tuple[float, ...]:
        return tuple(sorted({b for p in self.points for b in p.bits}))

    def to_json(self) -> dict:
        """The grid as study.json and repro.json record it; a point's peak_lr only where it
        sets one (a grid recorded before the key existed reads back the same)."""
        obj = json.loads(json.dumps(dataclasses.asdict(self)))
        for p in obj["points"]:
            if p["peak_lr"] is None:
                del p["peak_lr"]
        return obj


GRIDS = {
    # Three sizes over 14x in N (xxs2, xs, s), every model with 2 layers and every budget at 10
    # or more tokens per parameter (xxs2 at 21, 41 and 62, xs at 10 and 20, s at 10); QAT at 2, 4
    # and 6 bits, 7 fractions (6 at s), each fused schedule with its FP control; the unfused
    # cooldown at two points; the fixed 10% cooldown (not tied to f) at two points; a second
    # seed at every point, a third at the two noisiest. s, the largest, is the size held out
    # of the law's second fit.
    "full": Grid("full", (
        Point("xxs2", 800_000, unfused=UNFUSED),
        Point("xxs2", 1_600_000),
        Point("xxs2", 2_400_000, fixed=FIXED),
        Point("xs", 1_700_000, unfused=UNFUSED, fixed=FIXED),
        Point("xs", 3_400_000),
        Point("xxs2", 800_000, seed=1),
        Point("s", 5_400_000, fractions=FRACTIONS[:6]),
        # Every other point again at a second seed (added after the first seven; a grid grows
        # only at its end, so a study resumes into it): the law's within-group error pooled
        # over two seeds everywhere, and the seed noise measured at every size and budget.
        Point("xxs2", 1_600_000, seed=1),
        Point("xxs2", 2_400_000, seed=1),
        Point("xs", 1_700_000, seed=1),
        Point("xs", 3_400_000, seed=1),
        Point("s", 5_400_000, fractions=FRACTIONS[:6], seed=1),
        # A third seed where the seed noise about a sweep's shift is largest (0.017 nats at
        # xs-1.7M and xxs2-0.8M, 0.002-0.008 elsewhere): replicates where a U curve's shape is
        # least certain, so that its mean curve and optimum are measured about as well as the
        # other points'.
        Point("xs", 1_700_000, seed=2),
        Point("xxs2", 800_000, seed=2),
    ), holdout="s"),
    # The pipeline end to end in about 12 minutes: two sizes (so that the law's fit, the
    # planner, the plots and every claim's rule run), 2 and 4 bits, six fractions with their
    # controls. Below 10 tokens per parameter and with one seed: a smoke test, and its report
    # says so.
    "quick": Grid("quick", (
        Point("xxs2", 400_000, bits=(2.0, 4.0), fractions=FRACTIONS[:6]),
        Point("xs", 1_000_000, bits=(2.0, 4.0), fractions=FRACTIONS[:6]),
    ), holdout="xs", smoke=True),
}


# Each size's peak LR: the best FP-only loss of the half-decade grid 1e-3, 3e-3, 1e-2, 3e-2 at
# the size's smallest budget, seed 0 (benchmarks/lr_probe.py, benchmarks/lr_probe.json). The
# full grid trains every size at configs/repro.py's 3e-3, the best for xs and s, not xxs2;
# a size not named here keeps the config's. The tuned grid is the full grid with each size at
# its own peak LR, the rest unchanged (docs/repro-tuned).
TUNED_LR = {"xxs2": 1e-2}
GRIDS["tuned"] = dataclasses.replace(GRIDS["full"], name="tuned", points=tuple(
    dataclasses.replace(p, peak_lr=TUNED_LR.get(p.size)) for p in GRIDS["full"].points))


def point_config(config, point: Point, data_dir: Path):
    lr = {} if point.peak_lr is None else {"optimizer.peak_lr": point.peak_lr}
    return runconfig.config_with(config, **{f"model.{k}": v for k, v in SIZES[point.size].items()},
                                 **{"schedule.total_tokens": int(point.budget),
                                    "data.source": "array_record", "data.path": str(data_dir),
                                    "seed": config.seed + point.seed,
                                    "data.seed": config.data.seed + point.seed}, **lr)


def grid_from_json(obj: dict) -> Grid:
    points = tuple(Point(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
                   for p in obj["points"])
    return Grid(obj["name"], points, obj.get("holdout"), obj.get("smoke", False),
                obj.get("max_epochs", 4.0))
