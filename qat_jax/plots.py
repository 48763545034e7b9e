"""PNG plots of a fitted law against its runs (matplotlib, no display needed): observed vs
predicted loss; loss vs QAT fraction per (N, D, B) with the law's optimum marked; the optimal
fraction vs tokens per parameter byte S, with the paper's closed form for comparison."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qat_jax import law as law_lib  # noqa: E402
from qat_jax import planner  # noqa: E402


def _groups(runs: law_lib.Runs):
    """(N, D, B) -> indices of that group's quantized runs (B < 16)."""
    out = {}
    D = runs.D_fp + runs.D_qat
    for i in np.flatnonzero(runs.B < law_lib.FP_BITS):
        out.setdefault((runs.N[i], D[i], runs.B[i]), []).append(i)
    return out


def write_plots(law: law_lib.Law, runs: law_lib.Runs, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    pred = law(runs.N, runs.D_fp, runs.D_qat, runs.B, runs.model_bytes)

    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(runs.loss, pred, c=np.minimum(runs.B, 8), cmap="viridis", s=14)
    lo, hi = min(runs.loss.min(), pred.min()), max(runs.loss.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="observed loss", ylabel="predicted loss",
           title=f"{law.form.name} law: R^2 {law.fit.get('r2', float('nan')):.4f}, "
                 f"RMSE {law.fit.get('rmse', float('nan')):.4f}")
    fig.colorbar(sc, label="bits (FP shown as 8)")
    paths.append(_save(fig, out_dir / "observed_vs_predicted.png"))

    groups = _groups(runs)
    if groups:
        fig, ax = plt.subplots(figsize=(7, 5))
        fs = np.linspace(0.01, 1.0, 200)
        for (N, D, B), idx in sorted(groups.items()):
            M = runs.model_bytes[idx[0]]
            curve = planner.split_loss(law, N, D, B, fs, M)
            line, = ax.plot(fs, curve, lw=1, label=f"N={N:.3g} D={D:.3g} B={B:g}")
            f_opt, l_opt = planner.optimal_fraction(law, N, D, B, M)
            ax.plot([f_opt], [l_opt], "*", color=line.get_color(), ms=12)
            ax.plot(runs.D_qat[idx] / D, runs.loss[idx], "o", color=line.get_color(), ms=4)
        ax.set(xlabel="QAT fraction", ylabel="loss", title="loss vs QAT fraction (runs: dots, "
               "law: lines, optimum: stars)")
        ax.legend(fontsize=6)
        paths.append(_save(fig, out_dir / "loss_vs_fraction.png"))

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for B in sorted({k[2] for k in groups}):
            pts = [(D / runs.model_bytes[idx[0]], planner.optimal_fraction(
                law, N, D, B, runs.model_bytes[idx[0]])[0])
                for (N, D, b), idx in groups.items() if b == B]
            s, f = np.array(pts).T
            ax.scatter(s, f, label=f"law optimum, {B:g} bits")
        s_axis = np.geomspace(1.5, max(1e5, max(D / runs.model_bytes[idx[0]]
                                                 for (_, D, _), idx in groups.items())), 200)
        ax.plot(s_axis, [law_lib.closed_form_fraction(x) for x in s_axis], "k--",
                label=f"exp(-{law_lib.CLOSED_FORM_A} / ln S) (paper)")
        ax.set(xscale="log", xlabel="S = tokens per parameter byte", ylabel="optimal QAT fraction",
               ylim=(0, 1))
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "optimal_fraction_vs_S.png"))
    return paths


def write_repro_plots(groups: list[dict], law, memory: list[dict], out_dir) -> list[Path]:
    """The repro's plots (qat_jax.claims): loss vs fraction per (point, B) with the measured and
    the law's optima; measured optimal fraction vs S for every bit width with the closed form;
    fused vs unfused; the law's best bit width under a few memory budgets."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if not groups:
        return paths
    points = sorted({(g["N"], g["D"], g["point"]) for g in groups})
    bits = sorted({g["B"] for g in groups})
    fig, axes = plt.subplots(len(points), len(bits), squeeze=False,
                             figsize=(4 * len(bits), 2.6 * len(points)))
    fs = np.linspace(0.02, 1.0, 200)
    for g in groups:
        ax = axes[[p[2] for p in points].index(g["point"])][bits.index(g["B"])]
        f, loss = np.array(g["fused"]).T
        ax.plot(f, loss, "o-", ms=4, label="fused runs")
        if g["unfused"]:
            uf, ul = np.array(g["unfused"]).T
            ax.plot(uf, ul, "s--", ms=4, label="unfused runs")
        if g["fp_loss"] is not None:
            ax.axhline(g["fp_loss"], color="gray", ls=":", label="FP only")
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
    paths.append(_save(fig, out_dir / "loss_vs_fraction.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = dict(zip(sorted({g["size"] for g in groups}), "os^Dv", strict=False))
    for i, B in enumerate(bits):
        for size, m in markers.items():
            sel = [g for g in groups if g["B"] == B and g["size"] == size]
            if sel:
                ax.scatter([g["S"] for g in sel], [g["f_measured"] for g in sel], marker=m,
                           color=f"C{i}", label=f"measured, {B:g} bits, {size}")
                if law is not None:
                    ax.scatter([g["S"] for g in sel], [g["f_law"] for g in sel], marker=m,
                               facecolors="none", edgecolors=f"C{i}", s=60)
    s_max = max(g["S"] for g in groups)
    s_axis = np.geomspace(1.2, max(10.0, s_max * 2), 200)
    ax.plot(s_axis, [law_lib.closed_form_fraction(x) for x in s_axis], "k--",
            label=f"exp(-{law_lib.CLOSED_FORM_A} / ln S) (paper)")
    ax.set(xscale="log", xlabel="S = tokens per parameter byte", ylabel="optimal QAT fraction",
           ylim=(0, 1), title="filled: measured optimum; hollow: fitted law's")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out_dir / "optimal_fraction_vs_S.png"))

    both = [g for g in groups if g["unfused"]]
    if both:
        fig, axes = plt.subplots(1, len(both), squeeze=False, figsize=(4.5 * len(both), 3.5))
        for ax, g in zip(axes[0], both, strict=True):
            for runs, style, label in ((g["fused"], "o-", "fused"), (g["unfused"], "s--",
                                                                      "unfused")):
                f, loss = np.array(runs).T
                ax.plot(f, loss, style, ms=4, label=label)
            ax.set(xlabel="QAT fraction", ylabel="val loss",
                   title=f"{g['point']} {g['B']:g}-bit: fused vs unfused cooldown")
            ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "fused_vs_unfused.png"))

    if memory:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for i, m in enumerate(memory):
            rows = sorted(m["rows"], key=lambda r: r["B"])
            ax.plot([r["B"] for r in rows], [r["loss"] for r in rows], "o-", color=f"C{i}",
                    label=f"{m['memory_bytes']:.3g} bytes")
            best = m["rows"][0]
            ax.plot([best["B"]], [best["loss"]], "*", color=f"C{i}", ms=14)
        all_bits = sorted({r["B"] for m in memory for r in m["rows"]})
        ax.set_ylim(*best_bits_ylim(memory))
        ax.set(xscale="log", xlabel="bits B (model of N = 8 M / B parameters)",
               ylabel="predicted loss at the optimal fraction (clipped)",
               title=f"best bit width under a memory budget (law, D = {memory[0]['D']:,})")
        ax.set_xticks(all_bits, [f"{b:g}" for b in all_bits])
        ax.minorticks_off()
        ax.legend(fontsize=7, title="weight memory M")
        paths.append(_save(fig, out_dir / "best_bits_under_memory.png"))
    return paths


def best_bits_ylim(memory: list[dict]) -> tuple[float, float]:
    """The loss range of the best-bit-width plot: all of the lowest losses, and at most 1 nat
    above the worst budget's best. Tiny models at 16 bits can be predicted far worse; clipping
    keeps the optima readable. `rows` of each budget are sorted best first."""
    lowest = min(r["loss"] for m in memory for r in m["rows"])
    return lowest - 0.05, max(m["rows"][0]["loss"] for m in memory) + 1.0


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
