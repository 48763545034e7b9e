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
from qat_jax.law import planner  # noqa: E402


def _groups(runs: law_lib.Runs):
    """(N, D, B) -> indices of that group's quantized runs (B < 16)."""
    out = {}
    D = runs.D_fp + runs.D_qat
    for i in np.flatnonzero(runs.B < law_lib.FP_BITS):
        out.setdefault((runs.N[i], D[i], runs.B[i]), []).append(i)
    return out


PLOT_NAMES = ("observed_vs_predicted.png", "loss_vs_fraction.png", "optimal_fraction_vs_S.png")


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
    paths.append(_save(fig, out_dir / PLOT_NAMES[0]))

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
        paths.append(_save(fig, out_dir / PLOT_NAMES[1]))

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
        paths.append(_save(fig, out_dir / PLOT_NAMES[2]))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
