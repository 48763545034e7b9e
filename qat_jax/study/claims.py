"""The paper's claims checked against a repro's runs (`qat_jax.study.repro`): the numbers behind
each claim, a verdict by a stated rule that needs several (N, D) points, the fitted law, plots,
report.json and REPORT.md (`qat_jax.study.report`).

Claims (Dremov et al., ICLR 2026):
1. the loss-optimal QAT fraction grows with tokens per parameter byte S;
2. against S, the optima of different bit widths fall on one curve, exp(-6.7297 / ln S)
   (mean absolute error 0.091 in the paper);
3. the QAT loss law fits the runs (R^2 > 0.98 in the paper) and predicts held-out runs;
4. the fused cooldown beats the unfused one at 4 and 6 bits, not at 1 and 2;
5. fewer bits need a larger QAT fraction at the same N and D.

A measured optimum f* is the best fused run's fraction, refined by the parabola through it and
its two neighbours when it is not at the end of the grid. At an end (`edge`) it is censored:
the true optimum may lie beyond the grid, and such optima are left out of the rules. Every f*
has an uncertainty: the spread of f* when the runs' losses are redrawn with the seed noise
measured at the grid's second-seed point (`seed_noise`; DEFAULT_SIGMA where there is none).
A difference counts ("resolved") only when it exceeds twice its uncertainty. A verdict is one of
VERDICTS; "not enough evidence" when the runs do not meet the rule's minimum.
"""

from __future__ import annotations

import math

import numpy as np

from qat_jax import law as law_lib
from qat_jax.law import planner

PAPER_MAE = 0.091
PAPER_R2 = 0.98
VERDICTS = ("holds", "partly", "does not hold", "not enough evidence")
THIN = VERDICTS[3]
DEFAULT_SIGMA = 0.004  # nats: a run's loss noise when the grid measures none (docs/REPRODUCTION.md)
DRAWS = 1000  # redraws of the losses behind each f* uncertainty
MIN_OPTIMA = 6  # claim 1: interior optima, over at least a decade of S
MIN_PER_BITS = 3  # claim 2: interior optima per bit width, for two or more bit widths
MIN_SIZES, MIN_HELDOUT = 3, 10  # claim 3: model sizes in the fit; runs of the held-out size
MIN_FUSION_POINTS = 2  # claim 4: (N, D) points with unfused runs, per bit width
MIN_POINTS = 3  # claim 5: points where two bit widths both have an interior optimum
BYTES_MATCH = 0.02  # models within 2% of each other's served bytes weigh the same


# ----------------------------------------------------------------------------- measured optima


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


def seed_noise(records: list[dict]) -> dict | None:
    """The loss noise between seeds, from every run repeated at another seed: `sigma`, a run's
    noise about its sweep's common shift (what moves f* and the fused-unfused gap; runs of a
    sweep share a trunk, so the shift of the whole sweep does not move them), `sd_diff` and
    `max_abs_diff` of the raw differences, and f* at both seeds per bit width."""
    base = {(r["size"], r["budget"], r["name"]): r for r in records if r.get("seed", 0) == 0}
    diffs = {}
    for r in records:
        other = base.get((r["size"], r["budget"], r["name"]))
        if r.get("seed", 0) != 0 and other is not None:
            key = (r["point"], r["B"])
            diffs.setdefault(key, []).append(r["loss"] - other["loss"])
    if not diffs:
        return None
    raw = np.concatenate([np.array(d) for d in diffs.values()])
    resid = np.concatenate([np.array(d) - np.mean(d) for d in diffs.values() if len(d) > 1])
    dof = len(resid) - sum(len(d) > 1 for d in diffs.values())
    if dof < 3:
        return None
    sigma = float(np.sqrt((resid ** 2).sum() / dof) / math.sqrt(2))
    gs = groups(records)
    f_star = {}
    for g in gs:
        if g["seed"] != 0 and "f_measured" in g:
            g0 = next((h for h in gs if h["seed"] == 0 and h["size"] == g["size"]
                       and h["budget"] == g["budget"] and h["B"] == g["B"]), None)
            if g0 is not None and "f_measured" in g0:
                f_star[f"{g['B']:g}"] = [g0["f_measured"], g["f_measured"]]
    return {"points": sorted({k[0] for k in diffs}), "runs": len(raw), "sigma": sigma,
            "mean_shift": float(raw.mean()), "sd_diff": float(raw.std(ddof=1)),
            "max_abs_diff": float(np.abs(raw).max()), "f_star_by_seed": f_star}


def f_uncertainty(g: dict, sigma: float, key: str = "fused") -> dict:
    """f*'s spread when each fused loss (or, key="penalty", penalty) is redrawn with noise
    sigma: the standard deviation and the 16th to 84th percentile range of the redrawn optima
    (fixed draws: a rerun of the report gives the same numbers)."""
    fs, ls = np.array(g[key]).T
    rng = np.random.default_rng(0)
    opt = _optima(fs, ls[None, :] + sigma * rng.standard_normal((DRAWS, len(ls))))
    lo, hi = np.percentile(opt, [16, 84])
    return {"f_sd": float(opt.std()), "f_lo": float(lo), "f_hi": float(hi)}


def _resolved(diff: float, *sds: float) -> int:
    """+1 or -1 when |diff| exceeds twice the combined uncertainty, else 0."""
    return int(np.sign(diff)) if abs(diff) > 2.0 * math.sqrt(sum(s * s for s in sds)) else 0


# ----------------------------------------------------------------------------- the claims


def _fit_a(S: np.ndarray, f: np.ndarray) -> float:
    """The a of f = exp(-a / ln S) closest in least squares to optima at S > 1 (to 1e-4, on
    a grid over [0.01, 30] refined around its best point)."""
    lo, hi = 0.01, 30.0
    for _ in range(3):
        grid = np.linspace(lo, hi, 301)
        pred = np.exp(-grid[:, None] / np.log(S)[None, :])
        i = int(np.argmin(((pred - f[None, :]) ** 2).sum(1)))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return float(grid[i])


def _a_with_sd(sel: list[dict]) -> tuple[float, float]:
    """a of the optima `sel`, and its sd over 200 redraws of each f* with its own sd."""
    S = np.array([g["S"] for g in sel])
    f = np.array([g["f_measured"] for g in sel])
    sd = np.array([g["f_sd"] for g in sel])
    rng = np.random.default_rng(0)
    draws = [_fit_a(S, np.clip(f + sd * rng.standard_normal(len(f)), 1e-3, 1.0))
             for _ in range(200)]
    return _fit_a(S, f), float(np.std(draws))


def claim_1(gs: list[dict]) -> dict:
    from scipy.stats import spearmanr

    inner = [g for g in gs if g["edge"] is None]
    S = np.array([g["S"] for g in inner])
    f = np.array([g["f_measured"] for g in inner])
    steps = []  # consecutive budgets at one (size, B), both optima interior
    for size in sorted({g["size"] for g in gs}):
        for B in sorted({g["B"] for g in gs}):
            seq = sorted((g for g in inner if g["size"] == size and g["B"] == B),
                         key=lambda g: g["D"])
            steps += [_resolved(b["f_measured"] - a["f_measured"], a["f_sd"], b["f_sd"])
                      for a, b in zip(seq, seq[1:], strict=False)]
    up, down = steps.count(1), steps.count(-1)
    rho, p = (spearmanr(S, f) if len(inner) > 2 else (math.nan, math.nan))
    span = float(S.max() / S.min()) if len(inner) else 0.0
    out = {"optima": len(gs), "interior": len(inner), "S_span": span,
           "spearman_S_f": float(rho), "p_value": float(p), "budget_steps": len(steps),
           "resolved_up": up, "resolved_down": down,
           "rule": f"needs {MIN_OPTIMA} interior optima over at least a decade of S; holds: "
                   f"Spearman(S, f*) >= 0.5 with p < 0.05, and of the budget steps at a fixed "
                   f"size and bit width that are resolved (change > 2 sd) some raise f* and "
                   f"none lowers it; does not hold: rho <= 0 or more resolved steps down than "
                   f"up; partly otherwise"}
    if len(inner) < MIN_OPTIMA or span < 10:
        out["verdict"] = THIN
    elif rho >= 0.5 and p < 0.05 and up > 0 and down == 0:
        out["verdict"] = "holds"
    elif rho <= 0 or down > up:
        out["verdict"] = "does not hold"
    else:
        out["verdict"] = "partly"
    return out


def claim_2(gs: list[dict]) -> dict:
    inner = [g for g in gs if g["edge"] is None and g["S"] > 1]
    per_bit = {}
    for B in sorted({g["B"] for g in inner}):
        sel = [g for g in inner if g["B"] == B]
        if len(sel) >= MIN_PER_BITS:
            a, sd = _a_with_sd(sel)
            per_bit[f"{B:g}"] = {"a": a, "a_sd": sd, "optima": len(sel)}
    pairs = [(x, y) for i, x in enumerate(per_bit.values()) for y in
             list(per_bit.values())[i + 1:]]
    apart = [abs(x["a"] - y["a"]) > 2 * math.hypot(x["a_sd"], y["a_sd"]) for x, y in pairs]
    one_curve = bool(pairs) and not any(apart)
    f = np.array([g["f_measured"] for g in inner])
    S = np.array([g["S"] for g in inner])
    closed = np.array([law_lib.closed_form_fraction(s) for s in S])
    a_all = _fit_a(S, f) if len(inner) else math.nan
    fitted = np.exp(-a_all / np.log(S)) if len(inner) else np.array([])
    out = {"optima": len(inner), "a_per_bits": per_bit, "one_curve": one_curve,
           "mae_vs_closed_form": float(np.abs(f - closed).mean()) if len(f) else math.nan,
           "paper_mae": PAPER_MAE, "a_least_squares": a_all,
           "mae_vs_fitted_a": float(np.abs(f - fitted).mean()) if len(f) else math.nan,
           "rule": f"needs {MIN_PER_BITS} interior optima (S > 1) at each of two or more bit "
                   f"widths; one curve: every two bit widths' least-squares a of "
                   f"exp(-a / ln S) within 2 sd of each other; holds: one curve and MAE <= 0.1 "
                   f"from the paper's a = {law_lib.CLOSED_FORM_A}; partly: one of the two; "
                   f"does not hold: neither"}
    close = out["mae_vs_closed_form"] <= 0.1
    if len(per_bit) < 2:
        out["verdict"] = THIN
    else:
        out["verdict"] = ("holds" if one_curve and close else
                          "partly" if one_curve or close else "does not hold")
    return out


def claim_3(records: list[dict], law, holdout_law, holdout: str | None,
            gs: list[dict]) -> dict:
    sizes = {r["size"] for r in records}
    out = {"r2": law.fit["r2"] if law else None, "rmse": law.fit["rmse"] if law else None,
           "n_runs": law.fit["n_runs"] if law else 0, "paper_r2": PAPER_R2,
           "sizes": len(sizes), "holdout_size": holdout,
           "rule": f"needs {MIN_SIZES} model sizes and {MIN_HELDOUT} runs of the held-out size; "
                   f"holds: R^2 >= {PAPER_R2} and the runs of the largest size, predicted by "
                   f"the law fitted without them, within 1% on average; partly: R^2 >= 0.9 "
                   f"or held-out within 2%; does not hold otherwise"}
    inner = [g for g in gs if g["edge"] is None and g.get("f_law") is not None]
    if inner:
        out["mean_abs_f_law_minus_measured"] = float(np.mean(
            [abs(g["f_law"] - g["f_measured"]) for g in inner]))
    held = [r for r in records if r["size"] == holdout and r.get("seed", 0) == 0
            and (r["fused"] or r["B"] >= law_lib.FP_BITS)]
    if holdout_law is not None and held:
        pred = np.array([planner.predicted_loss(holdout_law, r["N"], r["D_fp"], r["D_qat"],
                                                r["B"], r.get("model_bytes"), r.get("D_cool"))
                         for r in held])
        rel = np.abs(pred / np.array([r["loss"] for r in held]) - 1)
        out.update({"holdout_runs": len(held), "holdout_mean_rel_err": float(rel.mean()),
                    "holdout_max_rel_err": float(rel.max()),
                    "holdout_mean_err_nats": float(np.mean(
                        pred - np.array([r["loss"] for r in held])))})
    hold = out.get("holdout_mean_rel_err", math.inf)
    if law is None or len(sizes) < MIN_SIZES or len(held) < MIN_HELDOUT:
        out["verdict"] = THIN
    elif out["r2"] >= PAPER_R2 and hold <= 0.01:
        out["verdict"] = "holds"
    elif out["r2"] >= 0.9 or hold <= 0.02:
        out["verdict"] = "partly"
    else:
        out["verdict"] = "does not hold"
    return out


def fusion_gains(gs: list[dict], law, sigma: float) -> list[dict]:
    """Per (point, B) with unfused runs: the gain of fusing (unfused loss - fused loss, > 0
    when fused is better) at each shared fraction and on average, its noise (sd of the mean),
    the gain between the two schedules' best runs at the shared fractions (the unfused runs
    cover fewer fractions; their best against the fused best of all fractions would count
    the grid's reach as a gain), and the wasted tokens: the extra share of the budget the
    unfused schedule needs, by the fitted law's slope at the fused optimum, to reach the fused
    loss."""
    rows = []
    for g in gs:
        if not g["unfused"] or g["seed"] != 0:
            continue
        fused = dict(g["fused"])
        shared = [(f, u - fused[f]) for f, u in g["unfused"] if f in fused]
        if not shared:
            continue
        mean = float(np.mean([x for _, x in shared]))
        sd = sigma * math.sqrt(2.0 / len(shared))
        unfused = dict(g["unfused"])
        best = min(unfused[f] for f, _ in shared) - min(fused[f] for f, _ in shared)
        row = {"point": g["point"], "N": g["N"], "D": g["D"], "B": g["B"],
               "gains": {f"{f:g}": x for f, x in shared}, "mean_gain": mean, "sd": sd,
               "best_gain": best, "status": {1: "helps", -1: "hurts", 0: "neutral"}[
                   _resolved(mean, sd)], "wasted_frac": None}
        if law is not None:
            d = planner.tokens_for_gain(law, g["N"], g["D"], g["B"], g["f_measured"], best,
                                        g["M"])
            row["wasted_frac"] = None if d is None else d / g["D"] - 1.0
        rows.append(row)
    return rows


def claim_4(rows: list[dict]) -> dict:
    by_b = {}
    for r in rows:
        by_b.setdefault(r["B"], []).append(r)
    high = [r for B, rs in by_b.items() if B >= 4 for r in rs]
    low = [r for B, rs in by_b.items() if B <= 2 for r in rs]
    out = {"gains": rows, "points_per_bits": {f"{B:g}": len(rs) for B, rs in by_b.items()},
           "rule": f"gain = unfused - fused loss at the same fraction, averaged over fractions, "
                   f"per (N, D) point; needs {MIN_FUSION_POINTS} points at 2 bits and at 4 or "
                   f"6 bits; holds: fusing helps (gain > 2 sd) at every 4- and 6-bit point and "
                   f"at no 2-bit point by more than half the same point's 4-bit gain; does not "
                   f"hold: it helps at fewer than half the 4- and 6-bit points, or at 2 bits as "
                   f"much as at 4 at every point; partly otherwise"}
    enough = (len(low) >= MIN_FUSION_POINTS and any(len(rs) >= MIN_FUSION_POINTS
                                                    for B, rs in by_b.items() if B >= 4))
    four = {r["point"]: r["mean_gain"] for r in by_b.get(4.0, [])}
    low_vs_four = [r["mean_gain"] >= four[r["point"]] for r in low if r["point"] in four]
    low_helps = [r["status"] == "helps" and (r["point"] not in four or
                                             r["mean_gain"] > 0.5 * four[r["point"]])
                 for r in low]
    helps_high = sum(r["status"] == "helps" for r in high)
    if not enough:
        out["verdict"] = THIN
    elif helps_high == len(high) and not any(low_helps):
        out["verdict"] = "holds"
    elif helps_high < len(high) / 2 or (low_vs_four and all(low_vs_four)):
        out["verdict"] = "does not hold"
    else:
        out["verdict"] = "partly"
    return out


def claim_5(gs: list[dict]) -> dict:
    pairs = []
    for point in sorted({g["point"] for g in gs}):
        inner = sorted((g for g in gs if g["point"] == point and g["edge"] is None),
                       key=lambda g: g["B"])
        for lo, hi in zip(inner, inner[1:], strict=False):
            pairs.append({"point": point, "bits": [lo["B"], hi["B"]],
                          "diff": lo["f_measured"] - hi["f_measured"],
                          "sign": _resolved(lo["f_measured"] - hi["f_measured"], lo["f_sd"],
                                            hi["f_sd"])})
    larger = sum(p["sign"] > 0 for p in pairs)
    smaller = sum(p["sign"] < 0 for p in pairs)
    points = len({p["point"] for p in pairs})
    out = {"pairs": pairs, "points": points, "fewer_bits_larger": larger,
           "fewer_bits_smaller": smaller, "unresolved": len(pairs) - larger - smaller,
           "rule": f"at each point, neighbouring bit widths whose optima are both interior; "
                   f"needs {MIN_POINTS} such points; holds: the fewer bits' f* is larger "
                   f"(by > 2 sd) in at least half the pairs and smaller in none; does not "
                   f"hold: resolved smaller at least as often as larger; partly otherwise"}
    if points < MIN_POINTS:
        out["verdict"] = THIN
    elif larger >= len(pairs) / 2 and smaller == 0:
        out["verdict"] = "holds"
    elif smaller >= larger:
        out["verdict"] = "does not hold"
    else:
        out["verdict"] = "partly"
    return out


def memory_check(gs: list[dict], records: list[dict], law) -> list[dict]:
    """Models of equal served bytes (within BYTES_MATCH) trained at one budget at different
    bit widths: each one's best trained loss (FP-only for 16 bits) against the law's
    prediction at its optimal fraction, best first by the trained loss."""
    entries = [{"size": g["size"], "N": g["N"], "D": g["D"], "B": g["B"], "M": g["M"],
                "trained": g["best_loss"], "f_trained": g["f_measured"]}
               for g in gs if g["seed"] == 0 and g["M"] and "best_loss" in g]
    entries += [{"size": r["size"], "N": r["N"], "D": r["D_fp"] + r["D_qat"], "B": r["B"],
                 "M": r["model_bytes"], "trained": r["loss"], "f_trained": 0.0}
                for r in records if r["B"] >= law_lib.FP_BITS and r.get("seed", 0) == 0
                and r.get("model_bytes")]
    classes = []
    for e in sorted(entries, key=lambda e: (e["D"], e["M"])):
        home = next((c for c in classes if c["D"] == e["D"] and abs(e["M"] / c["M"] - 1)
                     <= BYTES_MATCH), None)
        if home is None:
            classes.append({"D": e["D"], "M": e["M"], "rows": [e]})
        elif all(r["B"] != e["B"] for r in home["rows"]):
            home["rows"].append(e)
    out = []
    for c in classes:
        if len(c["rows"]) < 3:
            continue
        for r in c["rows"]:
            r["f_law"], r["law"] = (planner.optimal_fraction(law, r["N"], r["D"], r["B"], r["M"])
                                    if law is not None else (None, None))
        rows = sorted(c["rows"], key=lambda r: r["trained"])
        by_law = sorted(rows, key=lambda r: math.inf if r["law"] is None else r["law"])
        out.append({"D": c["D"], "bytes": [r["M"] for r in rows], "rows": rows,
                    "best_trained_B": rows[0]["B"], "best_law_B": by_law[0]["B"],
                    "order_trained": [r["B"] for r in rows],
                    "order_law": [r["B"] for r in by_law]})
    return out


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


def evaluate(records: list[dict], law, holdout_law, holdout: str | None,
             noise: dict | None = None) -> dict:
    """The claims' numbers and verdicts; `holdout_law` is fitted without the size `holdout`."""
    sigma = noise["sigma"] if noise else DEFAULT_SIGMA
    every = [g for g in groups(records) if "f_measured" in g]
    for g in every:
        g.update(f_uncertainty(g, sigma))
        g["f_law"] = (planner.optimal_fraction(law, g["N"], g["D"], g["B"], g["M"])[0]
                      if law is not None else None)
        g["f_closed_form"] = law_lib.closed_form_fraction(g["S"]) if g["S"] > 1 else None
    gs = [g for g in every if g["seed"] == 0]
    fusion = fusion_gains(gs, law, sigma)
    claims = {"1": claim_1(gs), "2": claim_2(gs),
              "3": claim_3(records, law, holdout_law, holdout, gs),
              "4": claim_4(fusion), "5": claim_5(gs)}
    pen = penalty_groups(gs, sigma)
    by_penalty = {"1": claim_1(pen), "2": claim_2(pen), "5": claim_5(pen)} if pen else {}
    for c in [*claims.values(), *by_penalty.values()]:
        assert c["verdict"] in VERDICTS
    return {"groups": every, "claims": claims, "claims_by_penalty": by_penalty,
            "fixed_cooldown": fixed_cooldown(records, gs, sigma), "noise": noise,
            "sigma": {"value": sigma, "measured": noise is not None},
            "memory_check": memory_check(gs, records, law)}


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
