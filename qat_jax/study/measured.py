"""What the study's runs measured, before any claim is judged (`qat_jax.study.claims`): each
(point, B)'s fused runs and its measured optimum f* (the best fused run's fraction, refined by
the parabola through it and its two neighbours; censored at an end of the grid: `edge`), the
QAT penalties over the schedule-matched controls and their optimum, the fixed-cooldown runs,
the seed noise and each f*'s uncertainty under it; and the law fits the study makes of its
runs (`law_records`, `fit_law`)."""

from __future__ import annotations

import math

import numpy as np

from qat_jax import law as law_lib

DEFAULT_SIGMA = 0.004  # nats: a run's loss noise when the grid measures none (docs/REPRODUCTION.md)
DRAWS = 1000  # redraws of the losses behind each f* uncertainty


def measured_optimum(fs: np.ndarray, losses: np.ndarray) -> float:
    return float(_optima(np.asarray(fs, np.float64), np.asarray(losses, np.float64)[None])[0])


def _optima(fs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """measured_optimum of each row of `losses` (rows: draws; columns: the fractions fs)."""
    i = np.argmin(losses, axis=1)
    out = fs[i].copy()
    inner = (i > 0) & (i < len(fs) - 1)
    if inner.any():
        j = i[inner]
        x0, x1, x2 = fs[j - 1], fs[j], fs[j + 1]
        rows = losses[inner]
        k = np.arange(len(j))
        y0, y1, y2 = rows[k, j - 1], rows[k, j], rows[k, j + 1]
        # The parabola through the three points: its curvature and vertex.
        d1, d2 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
        a = (d2 - d1) / (x2 - x0)
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = (x0 + x1) / 2 - d1 / (2 * a)
        out[inner] = np.where(a > 0, np.clip(vertex, x0, x2), x1)
    return out


def groups(records: list[dict]) -> list[dict]:
    """One entry per (point, B): its fused runs sorted by fraction, the point's FP-only loss,
    the measured optimum, the unfused runs where there are some, and where the fused runs
    have schedule-matched controls (`control`) their QAT penalties (loss - control's loss)
    with the penalty's own optimum `f_penalty` (censored at an end: `edge_penalty`)."""
    fp = {r["point"]: r["loss"] for r in records
          if r["B"] >= law_lib.FP_BITS and r.get("name", "fp") == "fp"}
    fp_named = {(r["point"], r.get("name")): r["loss"] for r in records
                if r["B"] >= law_lib.FP_BITS}
    out = {}
    for r in records:
        if r["B"] >= law_lib.FP_BITS or "-cool" in r.get("name", ""):
            continue  # FP runs and controls; the fixed-cooldown runs are judged on their own
        g = out.setdefault((r["point"], r["B"]), {
            "point": r["point"], "size": r["size"], "budget": r.get("budget"),
            "seed": r.get("seed", 0), "N": r["N"], "D": r["D_fp"] + r["D_qat"], "B": r["B"],
            "M": r.get("model_bytes"), "fused": [], "unfused": [], "penalty": [],
            "fp_loss": fp.get(r["point"])})
        f = r["D_qat"] / (r["D_fp"] + r["D_qat"])
        g["fused" if r["fused"] else "unfused"].append((f, r["loss"]))
        ctrl = fp_named.get((r["point"], r.get("control")))
        if r["fused"] and ctrl is not None:
            g["penalty"].append((f, r["loss"] - ctrl))
    result = []
    for g in out.values():
        g["fused"].sort()
        g["unfused"].sort()
        g["penalty"].sort()
        if len(g["penalty"]) >= 2:  # the optimum of the penalty alone: f* with the schedule
            fs, ps = np.array(g["penalty"]).T  # held fixed (the confound removed)
            g["f_penalty"] = measured_optimum(fs, ps)
            i = int(np.argmin(ps))
            g["edge_penalty"] = "lowest" if i == 0 else "highest" if i == len(ps) - 1 else None
        g["S"] = law_lib.tokens_per_param_byte(g["D"], g["N"], g["B"], g["M"])
        if len(g["fused"]) >= 2:
            fs, ls = np.array(g["fused"]).T
            g["f_measured"] = measured_optimum(fs, ls)
            g["best_loss"] = float(ls.min())
            i = int(np.argmin(ls))
            g["edge"] = "lowest" if i == 0 else "highest" if i == len(ls) - 1 else None
        result.append(g)
    return sorted(result, key=lambda g: (g["seed"], g["B"], g["N"], g["D"]))


def seed_means(records: list[dict]) -> list[dict]:
    """The runs with every point's seeds averaged: one record per (size, budget, run name),
    its loss the mean over the seeds that ran it (`seeds`, how many), its other fields the
    lowest seed's (the point's own name). Seeds are replicates: their mean U curve is the
    best estimate of a point's optimum."""
    by_run = {}
    for r in sorted(records, key=lambda r: r.get("seed", 0)):
        by_run.setdefault((r["size"], r.get("budget"), r.get("name")), []).append(r)
    return [{**rs[0], "loss": float(np.mean([r["loss"] for r in rs])), "seeds": len(rs)}
            for rs in by_run.values()]


def seed_noise(records: list[dict]) -> dict | None:
    """The loss noise between seeds, from every run repeated at another seed: `sigma`, a run's
    noise about its sweep's common shift (what moves f* and the fused-unfused gap; runs of a
    sweep share a trunk, so the shift of the whole sweep does not move them), `sd_diff` and
    `max_abs_diff` of the raw differences, the same per repeated point (`by_point`), and f* at
    both seeds per point and bit width (`f_star_by_seed`)."""
    base = {(r["size"], r["budget"], r["name"]): r for r in records if r.get("seed", 0) == 0}
    diffs = {}
    for r in records:
        other = base.get((r["size"], r["budget"], r["name"]))
        if r.get("seed", 0) != 0 and other is not None:
            diffs.setdefault((r["point"], r["B"]), []).append(r["loss"] - other["loss"])
    overall = _noise(diffs)
    if overall is None:
        return None
    by_point = {}
    for point in sorted({k[0] for k in diffs}):
        mine = _noise({k: d for k, d in diffs.items() if k[0] == point})
        if mine is not None:
            by_point[point] = mine
    gs = groups(records)
    f_star = []
    for g in gs:
        if g["seed"] != 0 and "f_measured" in g:
            g0 = next((h for h in gs if h["seed"] == 0 and h["size"] == g["size"]
                       and h["budget"] == g["budget"] and h["B"] == g["B"]), None)
            if g0 is not None and "f_measured" in g0:
                f_star.append({"point": g0["point"], "repeat": g["point"], "B": g["B"],
                               "f": [g0["f_measured"], g["f_measured"]]})
    return {"points": sorted({k[0] for k in diffs}), **overall, "by_point": by_point,
            "f_star_by_seed": f_star}


def within_noise_floor(gs: list[dict], sigma: float) -> tuple[float, float]:
    """The within-group RMSE that run noise `sigma` alone leaves a law that follows every mean
    U curve exactly (lawstudy's within-group RMSE: a (point, B)'s fused runs about their mean),
    per seed and with each point's seeds pooled: a group of n runs keeps (n - 1) / n of the
    noise's variance about its mean, and the mean of k seeds 1 / k of it."""
    n = np.array([len(g["fused"]) for g in gs], np.float64)
    seeds = {}
    for g in gs:
        key = (g["size"], g["budget"], g["B"])
        seeds[key] = seeds.get(key, 0) + 1
    k = np.array([seeds[(g["size"], g["budget"], g["B"])] for g in gs], np.float64)
    per_seed = sigma * math.sqrt(np.sum(n - 1) / np.sum(n))
    # pooled: one group per (size, budget, B) of n runs, each the mean of its k seeds
    pooled = sigma * math.sqrt(np.sum((n - 1) / k / k) / np.sum(n / k))
    return float(per_seed), float(pooled)


def _noise(diffs: dict) -> dict | None:
    """seed_noise's figures over the differences `diffs` ((point, B) -> a list of seed
    differences): None with fewer than 3 degrees of freedom about the groups' shifts."""
    if not diffs:
        return None
    raw = np.concatenate([np.array(d) for d in diffs.values()])
    resid = [np.array(d) - np.mean(d) for d in diffs.values() if len(d) > 1]
    dof = sum(len(d) for d in resid) - len(resid)
    if dof < 3:
        return None
    ss = sum(float((d ** 2).sum()) for d in resid)
    return {"runs": len(raw), "sigma": float(np.sqrt(ss / dof) / math.sqrt(2)),
            "mean_shift": float(raw.mean()), "sd_diff": float(raw.std(ddof=1)),
            "max_abs_diff": float(np.abs(raw).max())}


def f_uncertainty(g: dict, sigma: float, key: str = "fused") -> dict:
    """f*'s spread when each fused loss (or, key="penalty", penalty) is redrawn with noise
    sigma: the standard deviation and the 16th to 84th percentile range of the redrawn optima
    (fixed draws: a rerun of the report gives the same numbers)."""
    fs, ls = np.array(g[key]).T
    rng = np.random.default_rng(0)
    opt = _optima(fs, ls[None, :] + sigma * rng.standard_normal((DRAWS, len(ls))))
    lo, hi = np.percentile(opt, [16, 84])
    return {"f_sd": float(opt.std()), "f_lo": float(lo), "f_hi": float(hi)}


def fixed_cooldown(records: list[dict], gs: list[dict], sigma: float) -> list[dict]:
    """Per (point, B) with fixed-cooldown runs (a fused QAT phase whose LR cooldown is the
    same last share of the budget at every fraction: the confound removed by design): their
    losses by fraction, their optimum and its sd, beside the same group's fused-cooldown and
    penalty optima."""
    by = {}
    for r in records:
        if "-cool" in r.get("name", "") and r["B"] < law_lib.FP_BITS:
            f = r["D_qat"] / (r["D_fp"] + r["D_qat"])
            by.setdefault((r["point"], r["B"]), []).append((f, r["loss"]))
    out = []
    for (point, B), runs in sorted(by.items()):
        runs.sort()
        if len(runs) < 2:
            continue
        fs, ls = np.array(runs).T
        i = int(np.argmin(ls))
        g = next((h for h in gs if h["point"] == point and h["B"] == B), {})
        row = {"point": point, "B": B, "runs": runs, "f_fixed": measured_optimum(fs, ls),
               "edge": "lowest" if i == 0 else "highest" if i == len(ls) - 1 else None,
               "f_fused": g.get("f_measured"), "f_penalty": g.get("f_penalty")}
        row.update({k.replace("f_", "f_fixed_"): v for k, v in
                    f_uncertainty({"fused": runs}, sigma).items()})
        out.append(row)
    return out


def penalty_groups(gs: list[dict], sigma: float) -> list[dict]:
    """The groups with penalties at every fused fraction, their optimum taken from the
    penalties (the schedule held fixed) instead of the losses: what claims 1, 2 and 5 are
    judged on again where the fused cooldown confounds f with the cooldown's length. A
    penalty is the difference of two runs: its noise is sqrt(2) sigma."""
    out = []
    for g in gs:
        if "f_penalty" not in g or len(g["penalty"]) != len(g["fused"]):
            continue
        h = {**g, "f_measured": g["f_penalty"], "edge": g["edge_penalty"]}
        h.update(f_uncertainty(g, math.sqrt(2.0) * sigma, "penalty"))
        out.append(h)
    return out


# ----------------------------------------------------------------------------- law fits


def law_records(records: list[dict]) -> list[dict]:
    """The runs a law is fitted to: fused QAT runs (the fixed-cooldown ones too: the law's
    schedule term models them) and full-precision runs (FP-only and controls); not the
    unfused runs, whose schedule has two cooldowns."""
    return [r for r in records if r["fused"] or r["B"] >= law_lib.FP_BITS]


def default_form(records: list[dict]) -> law_lib.Form:
    """The schedule-aware law (qat_schedule) where every run gives its cooldown (D_cool), the
    paper's (qat) otherwise; the FP runs pin the FP part where there are more of them than
    it has parameters."""
    sched = all(r.get(law_lib.COOL) is not None for r in records)
    form = law_lib.qat_schedule if sched else law_lib.qat
    fp_params = len((law_lib.chinchilla_schedule if sched else law_lib.chinchilla).params)
    pin = sum(r["B"] >= law_lib.FP_BITS for r in records) > fp_params
    return form.with_options(pin_fp=pin)


def fit_law(records: list[dict], where: str, form: law_lib.Form | None = None, **fit_kw):
    """A law (`form`, default `default_form`) fitted to the `law_records` (every seed); None
    when the runs are too few for it or all of one model size."""
    keep = law_records(records)
    if len({r["N"] for r in keep}) < 2:  # one model size cannot pin the law's N terms
        return None
    form = default_form(keep) if form is None else form
    runs = law_lib.Runs.from_records(keep, where)
    if len(runs) <= len(form.params):
        return None
    return law_lib.fit(runs, form, **fit_kw)


def byte_ratios(records: list[dict]):
    """The shape of the smallest model of the study as B -> its served bytes over N B / 8 (from
    the records' model_bytes; 1, the paper's rule, for a B they do not give)."""
    n_min = min(r["N"] for r in records)
    ratios = {r["B"]: r["model_bytes"] / law_lib.param_bytes(r["N"], r["B"])
              for r in records if r["N"] == n_min and r.get("model_bytes")}
    return lambda B: ratios.get(B, 1.0)
