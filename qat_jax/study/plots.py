"""The repro's plots (`qat_jax.study.report`), the ones a reader of the paper looks for: loss vs QAT
fraction per (point, B) with the measured and the law's optima; the optimal fraction vs S with
the paper's closed form and our fitted constant; fused vs unfused by bit width; the law's loss
over (D_fp, D_qat) at one N; the best bit width under a memory budget, law and trained runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qat_jax import law as law_lib
from qat_jax.law import planner
from qat_jax.law.plots import _save, plt


def write_repro_plots(report: dict, law, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [g for g in report["groups"] if g["seed"] == 0]
    if not groups:
        return []
    paths = [loss_vs_fraction(groups, law, out_dir / "loss_vs_fraction.png"),
             optimum_vs_S(groups, report["claims"]["2"], law,
                          out_dir / "optimal_fraction_vs_S.png")]
    gains = report["claims"]["4"]["gains"]
    if gains:
        paths.append(fused_vs_unfused(gains, out_dir / "fused_vs_unfused.png"))
    if law is not None:
        big = max(groups, key=lambda g: (g["N"], g["D"]))
        paths.append(law_surface(law, big, out_dir / "law_loss_over_splits.png"))
    if report["memory"]:
        paths.append(best_bits(report["memory"], report["memory_check"],
                               out_dir / "best_bits_under_memory.png"))
    return paths


def loss_vs_fraction(groups: list[dict], law, path: Path) -> Path:
    points = sorted({(g["N"], g["D"], g["point"]) for g in groups})
    bits = sorted({g["B"] for g in groups})
    fig, axes = plt.subplots(len(points), len(bits), squeeze=False,
                             figsize=(3.6 * len(bits), 2.4 * len(points)))
    fs = np.linspace(0.02, 1.0, 200)
    for ax in axes.flat:
        ax.set_visible(False)
    for g in groups:
        ax = axes[[p[2] for p in points].index(g["point"])][bits.index(g["B"])]
        ax.set_visible(True)
        f, loss = np.array(g["fused"]).T
        ax.plot(f, loss, "o-", ms=3, label="fused runs")
        if g["unfused"]:
            uf, ul = np.array(g["unfused"]).T
            ax.plot(uf, ul, "s--", ms=3, label="unfused runs")
        if g["fp_loss"] is not None:
            ax.axhline(g["fp_loss"], color="gray", ls=":", label="FP only")
        ax.axvspan(g["f_lo"], g["f_hi"], color="C0", alpha=0.15)
        ax.axvline(g["f_measured"], color="C0", lw=1, label=f"measured f* {g['f_measured']:.2f}")
        if law is not None:
            ax.plot(fs, planner.split_loss(law, g["N"], g["D"], g["B"], fs, g["M"]), "k-", lw=0.8,
                    label="law")
            ax.axvline(g["f_law"], color="k", ls="--", lw=1, label=f"law f* {g['f_law']:.2f}")
        lo = min(loss.min(), g["fp_loss"] or loss.min())
        ax.set_ylim(lo - 0.02, lo + 1.5 * (loss.max() - lo) + 0.03)
        ax.set_title(f"{g['point']} {g['B']:g}-bit (S={g['S']:.3g})", fontsize=8)
        ax.set_xlabel("QAT fraction", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    return _save(fig, path)


def optimum_vs_S(groups: list[dict], claim2: dict, law, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    markers = dict(zip(sorted({g["size"] for g in groups}), "osD^vP", strict=False))
    for i, B in enumerate(sorted({g["B"] for g in groups})):
        for size, m in markers.items():
            sel = [g for g in groups if g["B"] == B and g["size"] == size]
            inner = [g for g in sel if g["edge"] is None]
            edge = [g for g in sel if g["edge"] is not None]
            if inner:
                ax.errorbar([g["S"] for g in inner], [g["f_measured"] for g in inner],
                            yerr=[g["f_sd"] for g in inner], fmt=m, color=f"C{i}", ms=5,
                            label=f"{B:g} bits, {size}")
            if edge:
                ax.scatter([g["S"] for g in edge], [g["f_measured"] for g in edge], marker="x",
                           color=f"C{i}", s=30)
            if law is not None and sel:
                ax.scatter([g["S"] for g in sel], [g["f_law"] for g in sel], marker=m,
                           facecolors="none", edgecolors=f"C{i}", s=60, lw=0.7)
    s_axis = np.geomspace(1.2, max(10.0, max(g["S"] for g in groups) * 2), 200)
    ax.plot(s_axis, [law_lib.closed_form_fraction(x) for x in s_axis], "k--",
            label=f"exp(-{law_lib.CLOSED_FORM_A} / ln S) (paper)")
    a = claim2.get("a_least_squares")
    if a is not None and np.isfinite(a):
        ax.plot(s_axis, np.exp(-a / np.log(s_axis)), "k:", label=f"exp(-{a:.2f} / ln S) (fit)")
    ax.set(xscale="log", xlabel="S = tokens per served byte", ylabel="optimal QAT fraction",
           ylim=(0, 1), title="measured f* +- sd (x: at the grid's end); hollow: the law's")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def fused_vs_unfused(gains: list[dict], path: Path) -> Path:
    bits = sorted({r["B"] for r in gains})
    fig, axes = plt.subplots(1, len(bits), squeeze=False, figsize=(4.2 * len(bits), 3.4),
                             sharey=True)
    for ax, B in zip(axes[0], bits, strict=True):
        for j, r in enumerate(x for x in gains if x["B"] == B):
            fs = [float(f) for f in r["gains"]]
            ax.plot(fs, list(r["gains"].values()), "o-", color=f"C{j}", ms=4,
                    label=f"{r['point']}: mean {r['mean_gain']:+.4f} +- {r['sd']:.4f}")
            ax.axhspan(r["mean_gain"] - 2 * r["sd"], r["mean_gain"] + 2 * r["sd"],
                       color=f"C{j}", alpha=0.08)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set(xlabel="QAT fraction", title=f"{B:g} bits")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("unfused - fused loss (> 0: fusing helps)")
    return _save(fig, path)


def law_surface(law, g: dict, path: Path) -> Path:
    """The law's loss over (D_fp, D_qat) at the group's N and B, with lines of equal total D
    and the optimal split along them."""
    B = g["B"]
    M = g["M"] / law_lib.param_bytes(g["N"], B) if g["M"] else 1.0
    d_fp = np.geomspace(g["D"] / 30, g["D"] * 3, 80)
    d_qat = np.geomspace(g["D"] / 300, g["D"] * 3, 80)
    X, Y = np.meshgrid(d_fp, d_qat)
    Z = np.asarray(law(np.full_like(X, g["N"]), X, Y, np.full_like(X, B),
                       np.full_like(X, law_lib.param_bytes(g["N"], B) * M)))
    fig, ax = plt.subplots(figsize=(6, 4.8))
    cs = ax.contourf(X, Y, Z, levels=24, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="predicted loss")
    totals = np.geomspace(g["D"] / 10, g["D"] * 3, 6)
    best = [planner.optimal_fraction(law, g["N"], D, B, law_lib.param_bytes(g["N"], B) * M)[0]
            for D in totals]
    for D in totals:
        f = np.linspace(0.001, 0.999, 100)
        ax.plot((1 - f) * D, f * D, color="w", lw=0.5, alpha=0.6)
    ax.plot([(1 - f) * D for f, D in zip(best, totals, strict=True)],
            [f * D for f, D in zip(best, totals, strict=True)], "r*-", label="optimal split")
    ax.set(xscale="log", yscale="log", xlim=(d_fp[0], d_fp[-1]), ylim=(d_qat[0], d_qat[-1]),
           xlabel="FP tokens D_fp", ylabel="QAT tokens D_qat",
           title=f"law at N = {g['N']:,.0f}, {B:g} bits (white: equal D)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def best_bits(memory: list[dict], checks: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, m in enumerate(memory):
        rows = sorted(m["rows"], key=lambda r: r["B"])
        ax.plot([r["B"] for r in rows], [r["loss"] for r in rows], "o-", color=f"C{i}",
                label=f"law: {m['memory_bytes']:,.0f} bytes, D = {m['D']:,.0f}")
        ax.plot([m["rows"][0]["B"]], [m["rows"][0]["loss"]], "*", color=f"C{i}", ms=14)
    for i, c in enumerate(checks):
        ax.plot([r["B"] for r in c["rows"]], [r["trained"] for r in c["rows"]], "kD", ms=6,
                mfc="none" if i else "k", label=f"trained, D = {c['D']:,.0f}")
    all_bits = sorted({r["B"] for m in memory for r in m["rows"]})
    ax.set_ylim(*best_bits_ylim(memory, checks))
    ax.set(xscale="log", xlabel="bits B (the largest model of that width within the budget)",
           ylabel="loss at the optimal fraction", title="best bit width under a memory budget")
    ax.set_xticks(all_bits, [f"{b:g}" for b in all_bits])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return _save(fig, path)


def best_bits_ylim(memory: list[dict], checks: list[dict] = ()) -> tuple[float, float]:
    """The loss range of the best-bit-width plot: all of the lowest losses (and the trained
    ones), and at most 1 nat above the worst budget's best. Tiny models at 16 bits can be
    predicted far worse; clipping keeps the optima readable. `rows` are sorted best first."""
    lowest = min(r["loss"] for m in memory for r in m["rows"])
    top = max(m["rows"][0]["loss"] for m in memory) + 1.0
    trained = [r["trained"] for c in checks for r in c["rows"]]
    if trained:
        lowest, top = min(lowest, min(trained)), max(top, max(trained) + 0.05)
    return lowest - 0.05, top
