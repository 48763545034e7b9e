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

The measured optima f*, their censoring at an end of the grid (left out of the rules) and
their uncertainties under the measured seed noise are qat_jax/study/measured.py's.
A difference counts ("resolved") only when it exceeds twice its uncertainty. A verdict is one of
VERDICTS; "not enough evidence" when the runs do not meet the rule's minimum.
"""

from __future__ import annotations

import math

import numpy as np

from qat_jax import law as law_lib
from qat_jax.law import planner
from qat_jax.study.measured import (
    DEFAULT_SIGMA,
    f_uncertainty,
    fixed_cooldown,
    groups,
    penalty_groups,
)

PAPER_MAE = 0.091
PAPER_R2 = 0.98
VERDICTS = ("holds", "partly", "does not hold", "not enough evidence")
THIN = VERDICTS[3]
MIN_OPTIMA = 6  # claim 1: interior optima, over at least a decade of S
MIN_PER_BITS = 3  # claim 2: interior optima per bit width, for two or more bit widths
MIN_SIZES, MIN_HELDOUT = 3, 10  # claim 3: model sizes in the fit; runs of the held-out size
MIN_FUSION_POINTS = 2  # claim 4: (N, D) points with unfused runs, per bit width
MIN_POINTS = 3  # claim 5: points where two bit widths both have an interior optimum
BYTES_MATCH = 0.02  # models within 2% of each other's served bytes weigh the same


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
