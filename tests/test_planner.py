import math

import numpy as np
import pytest

from qat_jax import law, planner

# A QAT law with an interior optimal fraction (values chosen for the test, not fitted).
PARAMS = {"a": math.log(400), "b": math.log(2000), "e": math.log(1.8), "alpha": 0.34,
          "beta": 0.37, "log_theta": math.log(0.3), "kappa": 0.6, "log_phi": math.log(3.0),
          "chi": 0.4, "psi": 0.05, "omega": 0.5, "log_lambda": math.log(0.5), "mu": 0.3,
          "nu": 0.05, "xi": 0.4, "rho": 0.1}
LAW = law.Law(law.qat, PARAMS)


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
