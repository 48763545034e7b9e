import math

import numpy as np
import pytest

from qat_jax import law, sizes
from qat_jax.law import planner

# A QAT law with an interior optimal fraction (values chosen for the test, not fitted).
PARAMS = {"a": math.log(400), "b": math.log(2000), "e": math.log(1.8), "alpha": 0.34,
          "beta": 0.37, "log_theta": math.log(0.3), "kappa": 0.6, "log_phi": math.log(3.0),
          "chi": 0.4, "psi": 0.05, "omega": 0.5, "log_lambda": math.log(0.5), "mu": 0.3,
          "nu": 0.05, "xi": 0.4, "rho": 0.1}
LAW = law.Law(law.qat, PARAMS)


def shaped_config():
    from qat_jax.configs import tiny

    return tiny.get_config()


@pytest.mark.parametrize("N,D,B", [(1e9, 2e10, 4.0), (3e8, 1e12, 2.0), (1e8, 5e9, 1.58)])
def test_optimal_fraction_matches_dense_grid(N, D, B):
    f, loss = planner.optimal_fraction(LAW, N, D, B)
    fs = np.linspace(1e-4, 1.0, 100_000)
    losses = LAW(np.full_like(fs, N), (1 - fs) * D, fs * D, np.full_like(fs, B))
    assert 0.05 < f < 0.99  # interior
    assert f == pytest.approx(fs[np.argmin(losses)], abs=2e-5)
    assert loss <= losses.min() + 1e-12
    assert planner.optimal_fraction(LAW, N, D, 16.0) == (0.0, pytest.approx(
        planner.predicted_loss(LAW, N, D, 0.0, 16.0)))


def test_wasted_tokens():
    N, D, B = 1e9, 2e10, 4.0
    f_opt, target = planner.optimal_fraction(LAW, N, D, B)
    at_opt = planner.wasted_tokens(LAW, N, D, B, f_opt)
    assert at_opt["extra_frac"] == pytest.approx(0.0, abs=1e-6)
    ten = planner.wasted_tokens(LAW, N, D, B, 0.1)
    assert ten["extra_frac"] > 0.1 and ten["loss"] > target
    # The split 0.1 with the extra tokens reaches the optimal loss.
    d = ten["tokens_needed"]
    assert planner.predicted_loss(LAW, N, 0.9 * d, 0.1 * d, B) == pytest.approx(target, rel=1e-9)


def test_tokens_for_gain():
    """The tokens at which a split's predicted loss drops by a given gain (the repro's wasted
    tokens of the unfused cooldown): D itself for no gain, more for more."""
    N, D, B, f = 1e9, 2e10, 4.0, 0.3
    assert planner.tokens_for_gain(LAW, N, D, B, f, 0.0) == D
    assert planner.tokens_for_gain(LAW, N, D, B, f, -0.1) == D
    small, big = (planner.tokens_for_gain(LAW, N, D, B, f, g) for g in (0.005, 0.02))
    assert D < small < big
    before = planner.predicted_loss(LAW, N, (1 - f) * D, f * D, B)
    after = planner.predicted_loss(LAW, N, (1 - f) * big, f * big, B)
    assert after == pytest.approx(before - 0.02, abs=1e-9)
    assert planner.tokens_for_gain(LAW, N, D, B, f, 10.0) is None  # beyond 1000 x D


def test_fp_equivalent():
    N, D, B = 1e9, 2e10, 2.0
    out = planner.fp_equivalent(LAW, N, D, B)
    assert 0 < out["N_ratio"] < 1  # a 2-bit model matches a smaller FP model
    assert planner.predicted_loss(LAW, out["N_fp"], D, 0.0, 16.0) == pytest.approx(
        out["loss"], rel=1e-9)
    assert planner.predicted_loss(LAW, N, out["D_fp_tokens"], 0.0, 16.0) == pytest.approx(
        out["loss"], rel=1e-9)


def test_best_bits_under_memory():
    rows = planner.best_bits_under_memory(LAW, 1e9, 1e11)
    assert [r["loss"] for r in rows] == sorted(r["loss"] for r in rows)
    assert {r["B"] for r in rows} == {1.0, 1.58, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0}
    for r in rows:
        assert r["N"] == pytest.approx(8e9 / r["B"])
        assert r["loss"] == pytest.approx(planner.optimal_fraction(LAW, r["N"], 1e11, r["B"])[1])


def test_model_bytes_are_the_denominator_of_S():
    """The law reads M (the model's bytes) where given: a model twice N B / 8 in bytes sees
    half the S, so its QAT terms are those of a run with half the tokens per byte; and the
    memory planner sizes each bit width's model by the shape's ratio."""
    N, D, B = 1e9, 2e10, 4.0
    f = 0.3
    rule = law.param_bytes(N, B)
    assert LAW(N, (1 - f) * D, f * D, B) == LAW(N, (1 - f) * D, f * D, B, rule)
    doubled = LAW(N, (1 - f) * D, f * D, B, 2 * rule)
    assert doubled > LAW(N, (1 - f) * D, f * D, B)  # fewer tokens per byte: a larger delta
    # Only S moves: the Chinchilla part (D = all tokens) is the same, so an FP run is too.
    assert LAW(N, D, 0.0, 16.0, 5 * N) == LAW(N, D, 0.0, 16.0)
    f_big, loss_big = planner.optimal_fraction(LAW, N, D, B, 2 * rule)
    fs = np.linspace(1e-4, 1.0, 100_000)
    dense = LAW(np.full_like(fs, N), (1 - fs) * D, fs * D, np.full_like(fs, B),
                np.full_like(fs, 2 * rule))
    assert f_big == pytest.approx(fs[np.argmin(dense)], abs=2e-5)
    assert loss_big <= dense.min() + 1e-12 and loss_big > planner.optimal_fraction(
        LAW, N, D, B)[1]
    rows = planner.best_bits_under_memory(LAW, 1e9, 1e11, ratio=lambda b: 1.25)
    for r in rows:
        assert r["N"] == pytest.approx(8e9 / (r["B"] * 1.25)) and r["bytes_ratio"] == 1.25
        assert r["loss"] == pytest.approx(planner.optimal_fraction(
            LAW, r["N"], 1e11, r["B"], law.param_bytes(r["N"], r["B"]) * 1.25)[1])


def test_shape_bytes_follow_the_served_model():
    config = shaped_config()
    shape = planner.ShapeBytes(*sizes.specs(config))
    n = sizes.param_count(*sizes.specs(config))["total"]
    for B in (2.0, 4.0, 16.0):
        want = sizes.served_bytes(*sizes.specs(config), None if B >= 16 else B)["total"]
        assert shape(n, B) == pytest.approx(want)
    # The tiny model's embedding (a quarter of it) stays bf16: 4-bit bytes > N B / 8.
    # In full precision all is bf16 but the (unused) scales that N counts.
    assert shape.ratio(4.0) > 1.5 and 0.99 < shape.ratio(16.0) < 1.0


@pytest.mark.slow
def test_doubts_and_extrapolation():
    """A plan means nothing with its optimum at an end of [0, 1], or a loss below the law's
    E or above every loss it was fitted to (`doubts`); `extrapolation` says how far N and D
    lie outside the law's runs (nothing for a law without a recorded domain)."""
    f, loss = planner.optimal_fraction(LAW, 1e9, 2e10, 4.0)
    assert 0.05 < f < 0.95 and planner.doubts(LAW, 1e9, 2e10, 4.0, f, loss) == []
    assert planner.doubts(LAW, 1e9, 2e10, 4.0, 1.0, loss) == [
        "its optimum is at an end of [0, 1] (f* = 1.000)"]
    assert planner.doubts(LAW, 1e9, 2e10, 4.0, 0.0, 1.5) == [
        "its optimum is at an end of [0, 1] (f* = 0.000)",
        "its predicted loss 1.5 is below its own irreducible loss E = 1.8"]
    assert planner.doubts(LAW, 1e9, 2e10, 16.0, 0.0, loss) == []  # FP: no QAT to place
    assert planner.doubts(LAW, 1e9, 2e10, 4.0, f, math.nan) == ["its predicted loss is nan"]
    assert planner.extrapolation(LAW, 1e12, 1e13) is None  # no domain recorded
    fitted = law.Law(law.qat, PARAMS, {"domain": {"N": [1e8, 1e9], "D": [5e9, 5e10],
                                                  "loss": [2.0, 2.5]}})
    assert planner.doubts(fitted, 1e9, 2e10, 4.0, f, loss) == [
        "its predicted loss 2.6 is above every loss it was fitted to (at most 2.5)"]
    assert planner.extrapolation(fitted, 1e9, 5e9) is None
    assert planner.extrapolation(fitted, 4e9, 1e9) == (
        "N = 4e+09 is 4x the largest model it was fitted to (1e+09); D = 1e+09 is 1/5 of the "
        "smallest budget it was fitted to (5e+09)")


def test_fit_and_plan_commands(tmp_path):
    """`qat-jax fit` on a runs table drawn from LAW writes the law and three non-empty PNGs;
    `qat-jax plan` with that law prints its optimum and a train command."""
    import json

    from conftest import run_cli

    rng = np.random.default_rng(0)
    rows = []
    for N in (1e8, 3e8, 1e9):
        for D in (5e9, 5e10):
            rows.append({"N": N, "D_fp": D, "D_qat": 0.0, "B": 16, "loss": 0.0})
            for B in (2.0, 4.0):
                for f in (0.1, 0.3, 0.5, 0.7, 0.9):
                    rows.append({"N": N, "D_fp": (1 - f) * D, "D_qat": f * D, "B": B,
                                 "loss": 0.0})
    for r in rows:
        r["loss"] = float(LAW(r["N"], r["D_fp"], r["D_qat"], r["B"])) * float(
            np.exp(rng.normal(0, 0.002)))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "law.json"
    proc = run_cli(["fit", f"--runs={tmp_path / 'runs.jsonl'}", "--law=qat", f"--out={out}",
                    f"--plots={tmp_path / 'plots'}", "--law_options=s_fp_floor=0.01"],
                   timeout=600)
    assert "qat law fitted to 66 runs" in proc.stdout
    assert "fitted to N = 1e+08 to 1e+09 parameters and D = 5e+09 to 5e+10 tokens" in proc.stdout
    fitted = law.load_law(out)
    assert fitted.form.options == {"chinchilla_tokens": "total", "s_fp_floor": 0.01,
                                    "pin_fp": True}
    assert fitted.fit["r2"] > 0.99
    losses = [r["loss"] for r in rows]
    assert fitted.fit["domain"] == {"N": [1e8, 1e9], "D": [pytest.approx(5e9),
                                                          pytest.approx(5e10)],
                                    "loss": [min(losses), max(losses)]}
    for name in ("observed_vs_predicted", "loss_vs_fraction", "optimal_fraction_vs_S"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    again = run_cli(["fit", f"--runs={tmp_path / 'runs.jsonl'}", f"--out={out}"], check=False)
    assert again.returncode == 2 and "nothing is overwritten" in again.stderr

    plan = run_cli(["plan", "--params=1e9", "--tokens=2e10", "--bits=4", f"--law={out}",
                    "--batch_tokens=1000000"])
    f_opt, _ = planner.optimal_fraction(fitted, 1e9, 2e10, 4.0)
    assert f"optimal QAT fraction {f_opt:.3f}" in plan.stdout
    assert "closed form f*(S) = exp(-6.7297 / ln S) = 0.161" in plan.stdout
    assert f"--config.qat.fraction={f_opt:.4f}" in plan.stdout
    assert f"QAT starts at step {20_000 - round(f_opt * 20_000):,} of 20,000" in plan.stdout
    assert "extrapolation" not in plan.stdout and "warning" not in plan.stdout  # inside
    far = run_cli(["plan", "--params=1e10", "--tokens=2e12", "--bits=4", f"--law={out}"])
    assert "an extrapolation: N = 1e+10 is 10x the largest model it was fitted to (1e+09); " \
        "D = 2e+12 is 40x the largest budget it was fitted to (5e+10)" in far.stdout
    mem = run_cli(["plan", "--memory=1GB", "--tokens=1e11", f"--law={out}"])
    best = planner.best_bits_under_memory(fitted, 1e9, 1e11)[0]
    assert mem.stdout.splitlines()[1].split()[1] == f"{best['B']:g}"
    # With a config the model's parameters and served bytes are its own.
    shaped = run_cli(["plan", "--config=configs/tiny.py", "--tokens=3e8", "--bits=4",
                      f"--law={out}"])
    shape = planner.ShapeBytes(*sizes.specs(shaped_config()))
    f_shape, _ = planner.optimal_fraction(fitted, shape.params, 3e8, 4.0,
                                          shape(shape.params, 4.0))
    assert f"optimal QAT fraction {f_shape:.3f}" in shaped.stdout
    assert f"model {shape(shape.params, 4.0):.4g} bytes (served bytes of --config)" in \
        shaped.stdout and "--config=" in shaped.stdout.splitlines()[-1]
    both = run_cli(["plan", "--config=tiny.py", "--params=1e9", "--tokens=3e8", "--bits=4"],
                   check=False)
    assert both.returncode == 2 and "give --params or --config, not both" in both.stderr
    bad = run_cli(["plan", "--memory=lots", "--tokens=1e11", f"--law={out}"], check=False)
    assert bad.returncode == 2 and "--memory=lots: give a size such as 8GB" in bad.stderr
    bad = run_cli(["fit", f"--runs={tmp_path / 'nope.csv'}", f"--out={tmp_path / 'x.json'}"],
                  check=False)
    assert bad.returncode == 1 and "nope.csv: no such file" in bad.stderr
    bad = run_cli(["fit", f"--runs={tmp_path / 'runs.jsonl'}", f"--out={tmp_path / 'x.json'}",
                   "--law_options=chinchilla_tokens=all"], check=False)
    assert bad.returncode == 1 and "chinchilla_tokens must be one of ('total', 'fp')" in \
        bad.stderr and not (tmp_path / "x.json").exists()


def test_parse_bytes():
    assert planner.parse_bytes("8GB") == 8e9 and planner.parse_bytes("512MiB") == 512 * 2**20
    assert planner.parse_bytes(" 1e9 ") == 1e9 and planner.parse_bytes("2kb") == 2000
    for bad in ("lots", "8 parsecs", "", "-1GB", "0"):
        with pytest.raises(ValueError, match="size such as 8GB|must be positive"):
            planner.parse_bytes(bad)
