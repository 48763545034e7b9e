"""Which law to trust: the study's law variants fitted, compared and stress-tested on the
repro's runs (`qat_jax.study.report`; docs/METHOD.md section 3b).

Each variant is a registered law form with options (`VARIANTS`). For each: the fit to every
law run (`measured.law_records`), its R^2 and RMSE, the within-group RMSE (residuals of the fused
runs of one (point, B) about their mean: the shape of the U curve, which sets f*; "pooled",
the same with the residuals of a run repeated at several seeds averaged first, since seeds are
replicates of one point and no law can follow their noise), how many of
the law's optima are interior, their mean absolute error against the measured interior optima,
the signs of the QAT exponents, and the held-out error (the law fitted without the largest
size, predicting its runs). The variant chosen is the one that predicts the held-out size
best among those whose optima are interior in at least ELIGIBLE of the groups (a law that puts
f* at an end cannot plan f); it is then refitted without the f = 0.05 runs and without each
point (a size and budget, with all its seeds) in turn (`robustness`), and bootstrapped for 95%
intervals of its exponents.
"""

from __future__ import annotations

import numpy as np

from qat_jax import law as law_lib
from qat_jax.law import planner
from qat_jax.study import measured

# name -> (form, options); the paper's form first (the baseline). The earlier schedule-aware
# variants stay as the record of what was tried (docs/REPRODUCTION.md); "wsd" is METHOD.md 3c
# with w fixed, "wsd, annealing by D/N" the same with w scaled by tokens per parameter
# (upsilon).
VARIANTS = {
    "paper": ("qat", {}),
    "schedule+size (reducible), trained, loss": ("qat_schedule", {
        "target": "loss", "gain": "size", "penalty": "trained", "anneal": "reducible"}),
    "wsd": ("qat_wsd", {"pin_fp": False, "anneal_tpp": False}),
    "wsd, annealing by D/N": ("qat_wsd", {"pin_fp": False, "anneal_tpp": True}),
    "wsd, power saturation": ("qat_wsd", {"pin_fp": False, "anneal_tpp": False,
                                          "saturation": "power"}),
}
# A variant that is another with one parameter more, at the value that gives it back: its fit
# starts from the other's optimum too (besides its own grid), so that it ends no worse.
NESTED = {"wsd, annealing by D/N": ("wsd", {"upsilon": 0.0})}
SIGNS = ("omega", "xi", "rho", "psi", "gamma", "eta", "nu", "sigma", "upsilon")  # exponents
INTERIOR = planner.INTERIOR  # a law optimum strictly inside [0, 1]
ELIGIBLE = 0.9  # a variant is chosen only if its optimum is interior in this share of groups
F_MAE_MAX = 0.06  # ... and its optima within this of the measured ones on average (issue 28)
BOOTSTRAP = 32  # refits behind the chosen law's intervals
PAPER_POINT = (86e6, 10e9, 4.0)  # the paper's 86M model at 4 bits and 10B tokens


def variant_form(name: str, records: list[dict]) -> law_lib.Form:
    form, options = VARIANTS[name]
    pin = measured.default_form(measured.law_records(records)).options["pin_fp"]
    return law_lib.get_form(form).with_options(**{"pin_fp": pin, **options})


def _predict(law, records: list[dict]) -> np.ndarray:
    return np.array([planner.predicted_loss(law, r["N"], r["D_fp"], r["D_qat"], r["B"],
                                            r.get("model_bytes"), r.get("D_cool"))
                     for r in records])


def quality(law, records: list[dict], holdout_law=None, holdout: str | None = None) -> dict:
    """The numbers the variants are compared by (see the module docstring)."""
    keep = measured.law_records(records)
    resid = _predict(law, keep) - np.array([r["loss"] for r in keep])
    by_group, by_cell = {}, {}
    for r, x in zip(keep, resid, strict=True):
        if r["B"] < law_lib.FP_BITS and "-cool" not in r.get("name", ""):
            by_group.setdefault((r["point"], r["B"]), []).append(x)
            # one cell per run of the point (its name), whatever its seed
            by_cell.setdefault(_place(r) + (r["B"], r.get("name")), []).append(x)
    pooled = {}  # a (size, budget)'s seeds are replicates: their residuals averaged per run
    for (*place, B, _), v in by_cell.items():
        pooled.setdefault((*place, B), []).append(np.mean(v))
    gs = [g for g in measured.groups(records) if "f_measured" in g]
    f_law = [planner.optimal_fraction(law, g["N"], g["D"], g["B"], g["M"])[0] for g in gs]
    lo, hi = INTERIOR
    errs = [abs(f - g["f_measured"]) for f, g in zip(f_law, gs, strict=True)
            if g["edge"] is None]
    # the same against the optima of the seed-averaged U curves (a point's seeds pooled)
    f_mae_pooled, n_pooled = _f_mae(law, records)
    p = law.natural()
    obs = np.array([r["loss"] for r in keep])
    out = {"r2": float(1 - np.sum(resid ** 2) / np.sum((obs - obs.mean()) ** 2)),
           "rmse": float(np.sqrt(np.mean(resid ** 2))),
           "within_rmse": _within(by_group), "within_rmse_pooled": _within(pooled),
           "groups": len(gs), "interior": int(sum(lo < f < hi for f in f_law)),
           "f_mae": float(np.mean(errs)) if errs else None, "f_mae_groups": len(errs),
           "f_mae_pooled": f_mae_pooled, "f_mae_pooled_groups": n_pooled,
           "signs": {k: p[k] for k in SIGNS if k in p}}
    if holdout_law is not None:
        held = [r for r in keep if r["size"] == holdout and r.get("seed", 0) == 0]
        rel = np.abs(_predict(holdout_law, held) / np.array([r["loss"] for r in held]) - 1)
        out["holdout_mean_rel_err"] = float(rel.mean())
        out["holdout_max_rel_err"] = float(rel.max())
        # the held-out size's optima as the law fitted without it places them
        out["holdout_f_mae"] = _f_mae(holdout_law,
                                      [r for r in records if r["size"] == holdout])[0]
    return out


def _f_mae(law, records: list[dict]) -> tuple[float | None, int]:
    """The law's optima against the interior optima of the records' seed-averaged U curves:
    their mean absolute error (None without any) and how many there are."""
    gs = [g for g in measured.groups(measured.seed_means(records))
          if "f_measured" in g and g["edge"] is None]
    errs = [abs(planner.optimal_fraction(law, g["N"], g["D"], g["B"], g["M"])[0]
                - g["f_measured"]) for g in gs]
    return (float(np.mean(errs)) if errs else None), len(errs)


def _place(r: dict) -> tuple:
    """A run's (size, budget): the point it belongs to whatever its seed."""
    return r.get("size"), r.get("budget", r["point"])


def _within(groups: dict) -> float:
    """The RMS of residuals about their group's mean (NaN without groups)."""
    if not groups:
        return float("nan")
    within = np.concatenate([np.array(v) - np.mean(v) for v in groups.values()])
    return float(np.sqrt(np.mean(within ** 2)))


def compare(records: list[dict], holdout: str | None, fits: dict | None = None) -> dict:
    """Every variant's law (on all runs and without `holdout`) and quality; `chosen`, the one
    with the least held-out error (the first variant where there is no held-out size)."""
    fits = {} if fits is None else fits
    out = {}
    for name in VARIANTS:
        form = variant_form(name, records)
        try:
            form.check_runs(law_lib.Runs.from_records(measured.law_records(records)), name)
        except law_lib.LawError:  # e.g. a schedule-aware form on runs without D_cool
            continue
        inner, at = NESTED.get(name, (None, {}))
        law = fits.get(name) or measured.fit_law(
            records, f"variant {name!r}", form,
            **_nested_starts(form, records, out.get(inner, {}).get("law"), at))
        if law is None:
            continue
        held = None
        if holdout is not None and any(r["size"] == holdout for r in records):
            rest = [r for r in records if r["size"] != holdout]
            held = measured.fit_law(rest, f"variant {name!r} without size {holdout}", form,
                                    **_nested_starts(form, rest, out.get(inner, {}).get(
                                        "holdout_law"), at))
        N, D, B = PAPER_POINT
        out[name] = {"law": law, "holdout_law": held,
                     "quality": {**quality(law, records, held, holdout),
                                 "paper_point": planner.optimal_fraction(law, N, D, B)},
                     "form": form.name, "options": form.options}
    if not out:
        return {"variants": {}, "chosen": None}

    held = any("holdout_mean_rel_err" in v["quality"] for v in out.values())
    return {"variants": out, "chosen": choose({k: v["quality"] for k, v in out.items()}),
            "chosen_by": (f"held-out error among the variants whose f* is interior in at "
                          f"least {ELIGIBLE:.0%} of the groups and within {F_MAE_MAX} of the "
                          f"measured optima on average" if held
                          else "within-group RMSE (no size could be held out)")}


def choose(qualities: dict[str, dict]) -> str:
    """The variant to keep, from each one's `quality`: a law that cannot place the optimum
    (interior in fewer than ELIGIBLE of the groups, or f* off by more than F_MAE_MAX on
    average) is not eligible, planning f being its use; then the least held-out error; where
    no size could be held out, the U curves' fit (within-group RMSE)."""
    def rank(k):
        q = qualities[k]
        eligible = q["groups"] == 0 or (q["interior"] >= ELIGIBLE * q["groups"] and (
            q["f_mae"] is None or q["f_mae"] <= F_MAE_MAX))
        return not eligible, q.get("holdout_mean_rel_err", float("inf")), q["within_rmse"]

    return min(qualities, key=rank)


def _nested_starts(form: law_lib.Form, records: list[dict], inner, at: dict) -> dict:
    """fit_law's keywords for a variant whose special case `inner` (a fitted law: the variant
    with the parameters `at` fixed at those values) is known: its own starts and one more,
    the inner law's optimum (no keywords without one, or where the variant pins parameters)."""
    if inner is None:
        return {}
    runs = law_lib.Runs.from_records(measured.law_records(records))
    pinned = form.pinned(runs, law_lib.fit)
    if pinned:
        return {}
    p = {**inner.params, **at}
    start = np.array([[p[n] for n in form.params]])
    grid = np.asarray(form.grid(runs, pinned, law_lib.fit), np.float64)
    return {"starts": np.vstack([grid, start])}


def robustness(records: list[dict], chosen: law_lib.Law) -> dict:
    """The chosen law refitted without the f = 0.05 runs, and without each point (a size and
    budget, every seed of it: a seed is a replicate, not another point) in turn:
    its optima (interior, error against the measured ones) and within-group RMSE on the data
    kept and, for a point left out, the same numbers for its groups and the error of its runs'
    predicted losses (what the law says of a point it never saw). Each refit starts from the
    chosen law's parameters (as its bootstrap does; a pinned FP part is pinned again, to the
    FP runs kept): the question is how far its optimum moves without those runs, not which of
    the fit's starts wins."""
    form = chosen.form
    pinned = chosen.fit.get("pinned", {})
    warm = {"starts": np.array([[chosen.params[n] for n in form.params if n not in pinned]]),
            "scout_iter": form.max_iter, "polish": 1}
    out = {}
    kept = [r for r in records if abs(r.get("fraction", 0.0) - 0.05) > 0.01]
    law = measured.fit_law(kept, "runs without f = 0.05", form, **warm)
    if law is not None:
        out["without_f0.05"] = quality(law, kept)
    loo = {}
    for place in sorted({_place(r) for r in records}, key=str):
        rest = [r for r in records if _place(r) != place]
        mine_all = [r for r in records if _place(r) == place]  # every seed of the point
        point = min(r["point"] for r in mine_all)
        seeds = sorted({r.get("seed", 0) for r in mine_all})
        if len(seeds) > 1:
            point += f" (seeds {', '.join(map(str, seeds))})"
        law = measured.fit_law(rest, f"runs without point {point}", form, **warm)
        if law is None:
            continue
        q = quality(law, rest)  # on the points it was fitted to
        own = quality(law, mine_all)  # predicted
        mine = measured.law_records(mine_all)
        rel = np.abs(_predict(law, mine) / np.array([r["loss"] for r in mine]) - 1)
        loo[point] = {**q, "point_mean_rel_err": float(rel.mean()),
                      "point_f_mae": own["f_mae"], "point_f_mae_pooled": own["f_mae_pooled"],
                      "point_within_rmse": own["within_rmse"],
                      "point_within_rmse_pooled": own["within_rmse_pooled"],
                      "point_interior": own["interior"], "point_groups": own["groups"]}
    out["leave_one_point_out"] = loo
    return out


def misses(law, records: list[dict]) -> list[dict]:
    """Where the chosen law misses, point by point (a size and budget, its seeds averaged):
    the within-group RMSE of its U curves, and the rise of its FP controls' loss from the
    shortest to the longest cooldown, measured and as the law predicts it (the FP part's
    price of LR area, shared by every QAT run of the point)."""
    means = measured.seed_means(records)
    out = []
    for place in sorted({_place(r) for r in means}, key=lambda p: (p[1], str(p[0]))):
        mine = [r for r in means if _place(r) == place]
        fp = sorted((r for r in measured.law_records(mine)  # a table may give no cooldowns
                     if r["B"] >= law_lib.FP_BITS and r.get("D_cool") is not None),
                    key=lambda r: r["D_cool"] / (r["D_fp"] + r["D_qat"]))
        row = {"point": min(r["point"] for r in mine), "N": mine[0]["N"],
               "tokens_per_param": (mine[0]["D_fp"] + mine[0]["D_qat"]) / mine[0]["N"],
               "within_rmse_pooled": quality(law, mine)["within_rmse_pooled"]}
        if len(fp) >= 2:
            ends = [fp[0], fp[-1]]
            pred = _predict(law, ends)
            row.update({"cooldowns": [r["D_cool"] / (r["D_fp"] + r["D_qat"]) for r in ends],
                        "fp_rise": ends[1]["loss"] - ends[0]["loss"],
                        "fp_rise_law": float(pred[1] - pred[0])})
        out.append(row)
    return out


def study(records: list[dict], holdout: str | None, bootstrap: int = BOOTSTRAP) -> dict:
    """The variants compared (`compare`), and the chosen one's bootstrap intervals, robustness
    and prediction at PAPER_POINT; `law` and `holdout_law` are the chosen variant's laws."""
    cmp = compare(records, holdout)
    if cmp["chosen"] is None:
        return {"law": None, "holdout_law": None, "variants": {}, "chosen": None}
    best = cmp["variants"][cmp["chosen"]]
    law = best["law"]
    runs = law_lib.Runs.from_records(measured.law_records(records), "law runs")
    intervals = law_lib.bootstrap_intervals(law, runs, bootstrap) if bootstrap else {}
    N, D, B = PAPER_POINT
    f, loss = planner.optimal_fraction(law, N, D, B)
    return {"law": law, "holdout_law": best["holdout_law"], "chosen": cmp["chosen"],
            "chosen_by": cmp["chosen_by"],
            "variants": {k: {"form": v["form"], "options": v["options"], **v["quality"]}
                         for k, v in cmp["variants"].items()},
            # the exponents (logs of coefficients left out: a coefficient's sign is fixed)
            "intervals_95": {k: v for k, v in intervals.items() if not k.startswith("log_")},
            "robustness": robustness(records, law), "misses": misses(law, records),
            "paper_point": {"N": N, "D": D, "B": B, "f_star": f, "loss": loss,
                            "N_max_fitted": max(r["N"] for r in records),
                            "doubts": planner.doubts(law, N, D, B, f, loss)}}


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_lines(s: dict) -> list[str]:
    """The law section of REPORT.md: the variants, the chosen law's intervals and signs, its
    robustness, and its plan for the paper's 86M model."""
    if not s.get("chosen"):
        return []
    lines = ["## The law", "",
             f"Variants fitted to the fused and FP runs (controls included); chosen by "
             f"{s['chosen_by']}. Within-group RMSE: residuals of each (point, B)'s fused "
             f"runs about their mean (the U curve's shape, which sets f*); pooled: with a "
             f"run's residuals at its point's seeds averaged first (seeds are replicates). "
             f"f* MAE: the law's optima against the measured interior ones (pooled: "
             f"against those of the seed-averaged U curves). Held-out: the largest size's "
             f"losses and (seed-averaged) optima as the law fitted without it predicts them.",
             "",
             "| variant | form | R^2 | RMSE | within-group RMSE | pooled | interior f* | "
             "f* MAE (pooled) | "
             f"held-out mean err, f* MAE | {PAPER_POINT[0] / 1e6:g}M plan: f*, loss | "
             + " | ".join(SIGNS) + " |",
             "|---" * (10 + len(SIGNS)) + "|"]
    for name, v in s["variants"].items():
        sg = v["signs"]
        held = v.get("holdout_mean_rel_err")
        lines.append(f"| {name}{' (chosen)' if name == s['chosen'] else ''} | {v['form']} | "
                     f"{v['r2']:.4f} | {v['rmse']:.4f} | {v['within_rmse']:.4f} | "
                     f"{v['within_rmse_pooled']:.4f} | "
                     f"{v['interior']}/{v['groups']} | {_mae(v)} | "
                     f"{'-' if held is None else format(100 * held, '.2f') + '%'}"
                     f"{_held_f(v)} | "
                     f"{v['paper_point'][0]:.3f}, {v['paper_point'][1]:.4g} | "
                     + " | ".join(_f(sg.get(k), ".3g") for k in SIGNS) + " |")
    lines.append("")
    if s["intervals_95"]:
        iv = s["intervals_95"]
        lines += [f"Bootstrap 95% intervals of the chosen law ({BOOTSTRAP} refits to resampled "
                  f"runs): " + "; ".join(
                      f"{k} [{lo:.3g}, {hi:.3g}] ({_sign(lo, hi)})"
                      for k, (lo, hi) in iv.items() if k in SIGNS) + ".", ""]
    r = s["robustness"]
    lines += ["Robustness of the chosen form (refitted), on the runs it was fitted to and, for "
              "a point left out, on that point's runs (predicted):", "",
              "| fit without | interior f* | f* MAE (pooled) | within-group RMSE | pooled | "
              "left-out point: interior f*, f* MAE (pooled) | its within-group RMSE, pooled | "
              "its mean err |",
              "|---|---|---|---|---|---|---|---|"]
    rows = ([("the f = 0.05 runs", r["without_f0.05"])] if "without_f0.05" in r else [])
    rows += [(f"point {p}", q) for p, q in r["leave_one_point_out"].items()]
    for label, q in rows:
        own = ("-", "-", "-")
        if "point_mean_rel_err" in q:
            own = (f"{q['point_interior']}/{q['point_groups']}, "
                   f"{_mae(q, 'point_f_mae', 'point_f_mae_pooled')}",
                   f"{_num(q['point_within_rmse'])}, {_num(q['point_within_rmse_pooled'])}",
                   f"{_num(100 * q['point_mean_rel_err'], '.2f')}%")
        lines.append(f"| {label} | {q['interior']}/{q['groups']} | {_mae(q)} | "
                     f"{q['within_rmse']:.4f} | {q['within_rmse_pooled']:.4f} | "
                     + " | ".join(own) + " |")
    lines += _misses_lines(s.get("misses", []))
    pp = s["paper_point"]
    verdict = (f" **This law does not extrapolate there**: {'; '.join(pp['doubts'])}."
               if pp["doubts"] else "")
    lines += ["", f"The chosen law's plan for the paper's {pp['N'] / 1e6:g}M-parameter model at "
              f"{pp['B']:g} bits and {pp['D'] / 1e9:g}B tokens, an extrapolation to "
              f"{pp['N'] / pp['N_max_fitted']:.0f}x the largest model fitted: f* = "
              f"{pp['f_star']:.3f}, loss {pp['loss']:.4g}.{verdict}", ""]
    return lines


def _misses_lines(rows: list[dict]) -> list[str]:
    """The table of `misses`."""
    if not rows:
        return []
    out = ["", "Where the chosen law misses, by point (seeds averaged): its U curves' within-"
           "group RMSE, and the rise of the FP controls' loss from the shortest to the longest "
           "cooldown, measured and predicted:", "",
           "| point | N | tokens per parameter | within-group RMSE | FP controls: cooldowns | "
           "rise, measured | rise, law |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cool = ("-", "-", "-") if "fp_rise" not in r else (
            f"{r['cooldowns'][0]:.2f} to {r['cooldowns'][1]:.2f}", f"{r['fp_rise']:+.4f}",
            f"{r['fp_rise_law']:+.4f}")
        out.append(f"| {r['point']} | {r['N']:,} | {r['tokens_per_param']:.1f} | "
                   f"{r['within_rmse_pooled']:.4f} | " + " | ".join(cool) + " |")
    return out


def _held_f(v: dict) -> str:
    """The held-out size's f* error, after its loss error in the variants table."""
    x = v.get("holdout_f_mae")
    return "" if x is None else f", f* {x:.3f}"


def _mae(q: dict, key: str = "f_mae", pooled: str = "f_mae_pooled") -> str:
    """An f* MAE and, in parentheses, the same against the seed-averaged optima."""
    return f"{_f(q[key])} ({_f(q.get(pooled))})"


def _num(x: float, spec: str = ".4f") -> str:
    """A number of the robustness table; a law's prediction far outside the range it was
    fitted to can be astronomically off, and is then written as such (3 digits, exponent)."""
    return format(x, spec) if abs(x) < 100 else format(x, ".3g")


def _sign(lo: float, hi: float) -> str:
    return "positive" if lo > 0 else "negative" if hi < 0 else "sign not resolved"
