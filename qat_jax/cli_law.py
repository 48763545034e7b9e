"""The law commands of `qat-jax`: `fit` (a loss law to a runs table) and `plan` (the QAT
fraction or bit width for a budget): their flags and what they run (cli.py registers them)."""

from __future__ import annotations

import math
import os

from absl import flags

from qat_jax import cli_process
from qat_jax.errors import UsageError


def fit_flags(fv: flags.FlagValues):
    flags.DEFINE_string("runs", None, "runs table: runs.jsonl of `qat-jax sweep`, or a CSV "
                        "with columns N, D_fp, D_qat, B, loss", flag_values=fv)
    flags.DEFINE_string("law", "qat", "law form (registered in qat_jax.law)", flag_values=fv)
    flags.DEFINE_list("law_options", [], "the form's options as key=value, e.g. "
                      "chinchilla_tokens=fp,s_fp_floor=0.01 (qat law)", flag_values=fv)
    flags.DEFINE_string("out", None, "law file to write (must not exist)", flag_values=fv)
    flags.DEFINE_string("plots", "", "directory for PNG plots", flag_values=fv)
    flags.DEFINE_float("huber_delta", 1e-3, "Huber delta on log-loss residuals",
                       flag_values=fv)
    flags.DEFINE_integer("bootstrap", 0, "refits on resampled runs for 95% intervals",
                         flag_values=fv)


def plan_flags(fv: flags.FlagValues):
    flags.DEFINE_float("params", None, "model parameters N", flag_values=fv)
    flags.DEFINE_float("tokens", None, "total training tokens D", flag_values=fv)
    flags.DEFINE_float("bits", None, "bit width B of the served model", flag_values=fv)
    flags.DEFINE_string("law", "", "law file of `qat-jax fit` (default: the closed form)",
                        flag_values=fv)
    flags.DEFINE_string("memory", "", "memory budget for the weights, e.g. 8GB, 512MiB: "
                        "answers the best bit width and model size (needs --law)",
                        flag_values=fv)
    flags.DEFINE_integer("batch_tokens", 1 << 19, "tokens per optimizer step, for the QAT "
                         "start step (with --config: the config's)", flag_values=fv)


def cmd_fit(fv) -> int:
    from qat_jax import law
    from qat_jax.law import plots

    if not fv.runs or not fv.out:
        raise UsageError("--runs and --out are required")
    if os.path.exists(fv.out):
        raise UsageError(f"--out={fv.out} exists; nothing is overwritten: choose another path")
    if fv.plots and os.path.exists(fv.plots) and not os.path.isdir(fv.plots):
        raise UsageError(f"--plots={fv.plots} is a file; give a directory for the PNG plots")
    if fv.plots:
        from qat_jax.law.plots import PLOT_NAMES

        there = [n for n in PLOT_NAMES if os.path.exists(os.path.join(fv.plots, n))]
        if there:
            raise UsageError(f"--plots={fv.plots} holds an earlier fit's {', '.join(there)}; "
                             f"nothing is overwritten: choose another directory or move them")
    if fv.bootstrap < 0:
        raise UsageError(f"--bootstrap={fv.bootstrap}: the number of refits for 95% "
                         f"intervals, 0 (none) or more")
    if not 0 < fv.huber_delta < math.inf:
        raise UsageError(f"--huber_delta={fv.huber_delta}: a finite number > 0")
    options = {}
    for item in fv.law_options:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--law_options: {item!r} is not key=value")
        options[key.strip()] = _number_or_text(value.strip())
    form = law.get_form(fv.law).with_options(**options)
    runs = law.read_runs(fv.runs)
    print(f"fitting the {fv.law} law to {len(runs)} runs of {fv.runs}"
          + (f" with {fv.bootstrap} bootstrap refits" if fv.bootstrap else ""), flush=True)
    fitted = law.fit(runs, form, delta=fv.huber_delta, bootstrap=fv.bootstrap)
    f = fitted.fit
    print(f"{fv.law} law fitted to {f['n_runs']} runs from {f['n_starts']} starts: objective "
          f"{f['objective']:.6g}, R^2 {f['r2']:.4f}, RMSE {f['rmse']:.4f} (loss)")
    for name, value in fitted.natural().items():
        print(f"  {name:<8} {value:.6g}")
    (n_lo, n_hi), (d_lo, d_hi) = f["domain"]["N"], f["domain"]["D"]
    print(f"fitted to N = {n_lo:.3g} to {n_hi:.3g} parameters and D = {d_lo:.3g} to {d_hi:.3g} "
          f"tokens: `qat-jax plan` says how far outside these a plan lies")
    if fv.plots:
        for path in plots.write_plots(fitted, runs, fv.plots):
            print(f"wrote {path}")
    fitted.save(fv.out)  # last: a failed fit or plot leaves no law.json to block the rerun
    print(f"wrote {fv.out}")
    return 0


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def cmd_plan(fv) -> int:
    from qat_jax import law, quant
    from qat_jax.law import planner

    fitted = law.load_law(fv.law) if fv.law else None
    if not fv.tokens or not 0 < fv.tokens < math.inf:
        raise UsageError(f"--tokens={fv.tokens}: total training tokens, a finite number > 0, "
                         f"is required")
    if fv.batch_tokens <= 0:
        raise UsageError(f"--batch_tokens={fv.batch_tokens} must be positive")
    D = fv.tokens
    from qat_jax import sizes

    shape = None if fv.config is None else planner.ShapeBytes(*sizes.specs(fv.config))
    if fv.memory:
        return _plan_memory(fv, fitted, D, shape)
    if fv.bits is None:
        raise UsageError("--bits is required (or --memory)")
    try:  # the bit widths a run can train: the plan ends in a train command
        quant.quantizer(fv.bits)
    except ValueError as e:
        raise UsageError(f"--bits: {e}") from None
    if shape is not None and fv.params:
        raise UsageError("give --params or --config, not both (--config's model has "
                         f"{shape.params:,} parameters)")
    if shape is None and not (fv.params and 0 < fv.params < math.inf):
        raise UsageError(f"--params={fv.params}: a finite number of parameters > 0, or "
                         f"--config (a model's shape), is required with --tokens and --bits "
                         f"(or --memory)")
    N, B = (fv.params, fv.bits) if shape is None else (shape.params, fv.bits)
    M = law.param_bytes(N, B) if shape is None else shape(N, B)
    S = law.tokens_per_param_byte(D, N, B, M)
    print(f"N = {N:.4g} parameters, D = {D:.4g} tokens, B = {B:g} bits: model {M:.4g} bytes "
          f"({'N B / 8' if shape is None else 'served bytes of --config'}), S = {S:.4g} "
          f"tokens per parameter byte")
    try:
        f = law.closed_form_fraction(S)
        print(f"closed form f*(S) = exp(-{law.CLOSED_FORM_A} / ln S) = {f:.3f}")
    except ValueError as e:
        f = None
        print(f"closed form: {e}")
    if fitted is None:
        print("no --law given: the fraction is the paper's closed form (no predicted loss)")
    else:
        f = _plan_by_law(fv.law, fitted, N, D, B, M, closed_form=f)
    if f is not None:
        _print_run(fv, shape, D, B, f)
    return 0


def _plan_memory(fv, fitted, D: float, shape) -> int:
    """--memory: the best bit widths and model sizes under a weight-memory budget."""
    from qat_jax.law import planner

    if fitted is None:
        raise UsageError("--memory needs --law (the closed form predicts no loss)")
    try:
        M = planner.parse_bytes(fv.memory)
    except ValueError as e:
        raise UsageError(f"--memory={fv.memory}: {e}") from None
    N = 8.0 * M / 4.0  # a model of that memory at 4 bits: does the law see the bits at all?
    at = [planner.predicted_loss(fitted, N, 0.5 * D, 0.5 * D, B) for B in (2.0, 8.0)]
    if abs(at[0] - at[1]) < 1e-9 * abs(at[0]):
        raise UsageError(f"--law={fv.law}: its {fitted.form.name!r} form predicts the same "
                         f"loss at every bit width, so it cannot choose one under --memory; "
                         f"{_refit_hint(fitted.form.name, 'bit widths')}")
    rows = planner.best_bits_under_memory(fitted, M, D,
                                          ratio=None if shape is None else shape.ratio)
    rule = ("N B / 8 bytes" if shape is None else "the config's shape (embedding, norms, "
            "scales: served bytes = N B / 8 x ratio)")
    print(f"memory {M:.4g} bytes, {D:.4g} tokens, model bytes by {rule}; best first:")
    for r in rows:
        doubts = planner.doubts(fitted, r["N"], D, r["B"], r["fraction"], r["loss"])
        print(f"  B {r['B']:>5g}  N {r['N']:.4g}  bytes ratio {r['bytes_ratio']:.3f}  QAT "
              f"fraction {r['fraction']:.3f}  predicted loss {r['loss']:.4f}"
              + (f"  (means nothing: {'; '.join(doubts)})" if doubts else ""))
    ns = [r["N"] for r in rows]  # the largest model, or else the smallest, outside the runs
    far = planner.extrapolation(fitted, max(ns), D) or planner.extrapolation(fitted, min(ns), D)
    if far:
        print(f"an extrapolation: {far}")
    return 0


QAT_FORMS = ("qat_wsd", "qat")  # the forms that see the split and the bit width


def _refit_hint(form: str, varied: str) -> str:
    """What to fit instead: a QAT form, never the one the law already has (a QAT form that
    predicts no difference was fitted to runs that do not vary it)."""
    others = [f for f in QAT_FORMS if f != form]
    if form in QAT_FORMS:
        return (f"its fit is degenerate there: refit it on runs at several {varied} (or try "
                f"qat-jax fit --law={others[0]})")
    return "fit a QAT law (" + " or ".join(f"qat-jax fit --law={f}" for f in others) + ")"


def _plan_by_law(law_path: str, fitted, N: float, D: float, B: float, M: float,
                 closed_form: float | None) -> float | None:
    """The fitted law's optimal QAT fraction, printed with its predicted loss and what a
    fixed 10% split would cost, and how far N and D lie outside the law's runs. Where the plan
    means nothing (`planner.doubts`), it says why, and the run takes `closed_form` instead."""
    from qat_jax.law import planner

    split = [planner.predicted_loss(fitted, N, D * (1 - x), D * x, B, M) for x in (.1, .9)]
    if abs(split[0] - split[1]) < 1e-9 * abs(split[0]):
        raise UsageError(f"--law={law_path}: its {fitted.form.name!r} form predicts the same "
                         f"loss for every QAT split, so it cannot choose one; "
                         f"{_refit_hint(fitted.form.name, 'QAT fractions')}, or leave --law out "
                         f"for the closed form")
    f, loss = planner.optimal_fraction(fitted, N, D, B, M)
    fp = planner.predicted_loss(fitted, N, D, 0.0, 16.0)
    ten = planner.wasted_tokens(fitted, N, D, B, 0.1, M)
    waste = ("more than 1000x the tokens" if ten["extra_frac"] is None else
             f"{100 * ten['extra_frac']:.0f}% more tokens ({ten['extra_tokens']:.4g})")
    print(f"law {law_path}: optimal QAT fraction {f:.3f}, predicted loss {loss:.4f} (full "
          f"precision at the same N and D: {fp:.4f})\n"
          f"a fixed 10% QAT split predicts {ten['loss']:.4f} and needs {waste} to match "
          f"the optimum")
    far = planner.extrapolation(fitted, N, D)
    if far:
        print(f"an extrapolation: {far}")
    doubts = planner.doubts(fitted, N, D, B, f, loss)
    if not doubts:
        return f
    instead = ("no fraction is planned (the closed form is undefined here too)"
               if closed_form is None else
               f"the run below takes the closed form's fraction {closed_form:.3f} instead")
    print(f"warning: this law's plan means nothing here: {'; '.join(doubts)}. Fit a law to "
          f"runs nearer this N and D; {instead}")
    return closed_form


def _print_run(fv, shape, D: float, B: float, f: float):
    """The QAT start step and the `qat-jax train` command of the plan."""
    batch_tokens, config_arg = fv.batch_tokens, ""
    if shape is not None:  # the config's own batch, and the config in the command
        batch_tokens = fv.config.data.batch_size * fv.config.model.seq_len
        config_arg = f"--config={cli_process.config_file(fv)} "
    else:  # the shipped config of that size, or none (the default would train another model)
        (match, config), (nearest, n) = _shipped_config(fv.params)
        if match is None:
            print(f"no shipped config has {fv.params:.4g} parameters (the nearest, {nearest}, "
                  f"has {n:.4g}): write a config of that size and give it as --config "
                  f"(then this plan also uses its batch and served bytes)")
            config_arg = "--config=YOUR_CONFIG.py "
        else:
            batch_tokens = config.data.batch_size * config.model.seq_len
            config_arg = f"--config={match} "
    steps = int(D // batch_tokens)
    print(f"QAT starts at step {steps - round(f * steps):,} of {steps:,} ({batch_tokens:,} "
          f"tokens per step)\nrun it: qat-jax train {config_arg}--config.quant.bits={B:g} "
          f"--config.schedule.total_tokens={int(D)} --config.qat.fraction_policy=fixed "
          f"--config.qat.fraction={f:.4f}")


def _shipped_config(N: float, tol: float = 0.02):
    """The shipped config (configs/tiny.py, configs/paper.py:<size>) whose model has N
    parameters within `tol`: (its name, the config), or (None, None); and the nearest one's
    name and parameter count (for the message when there is none)."""
    from qat_jax import sizes
    from qat_jax.configs import paper, tiny

    shipped = {"configs/tiny.py": tiny.get_config()}
    shipped.update({f"configs/paper.py:{size}": paper.get_config(size) for size in paper.SIZES})
    counts = {k: sizes.param_count(*sizes.specs(c))["total"] for k, c in shipped.items()}
    nearest = min(counts, key=lambda k: abs(math.log(counts[k] / N)))
    if abs(counts[nearest] / N - 1) <= tol:
        return (nearest, shipped[nearest]), (nearest, counts[nearest])
    return (None, None), (nearest, counts[nearest])
