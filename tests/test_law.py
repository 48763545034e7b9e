import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from qat_jax import law

CHINCHILLA = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "chinchilla_fig4_extracted.csv"


def _chinchilla_runs() -> law.Runs:
    rows = list(csv.DictReader(CHINCHILLA.open()))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(L)[:-5]  # drop the 5 points with the highest loss, as Epoch AI does
    n = len(keep)
    return law.Runs(N[keep], C[keep] / (6 * N[keep]), np.zeros(n), np.full(n, 16.0), L[keep])


@pytest.mark.skipif(not CHINCHILLA.exists(), reason=f"{CHINCHILLA} is not here (it lives in "
                    "the shared folder beside the checkout)")
def test_chinchilla_real_data():
    """Hoffmann et al.'s Figure 4 points (Epoch AI's extraction): the reference fit of
    shared/data/README.md, from its 4,500-point grid."""
    runs = _chinchilla_runs()
    assert len(runs) == 240
    t = time.time()
    fitted = law.fit(runs, "chinchilla")
    seconds = time.time() - t
    n = fitted.natural()
    assert fitted.fit["objective"] <= 0.0010185 and fitted.fit["n_starts"] == 4500
    assert n["E"] == pytest.approx(1.817, rel=0.01)
    assert n["alpha"] == pytest.approx(0.3473, abs=0.003)
    assert n["beta"] == pytest.approx(0.3672, abs=0.003)
    assert n["A"] == pytest.approx(478, rel=0.05) and n["B"] == pytest.approx(2143, rel=0.05)
    assert fitted.fit["r2"] > 0.99 and len(fitted.fit["residuals"]) == 240
    # Measured 8 to 10 s on 2 cores (scipy: ~170 s); the bound leaves room for a loaded CI.
    assert seconds < 30, seconds


def test_synthetic_chinchilla_recovery():
    truth = {"a": np.log(400.0), "b": np.log(1500.0), "e": np.log(1.7), "alpha": 0.33,
             "beta": 0.3}
    rng = np.random.default_rng(1)
    N = 10 ** rng.uniform(7, 10, 120)
    D = 10 ** rng.uniform(9, 12, 120)
    zeros, bits = np.zeros(120), np.full(120, 16.0)
    clean = law.Law(law.chinchilla, truth)(N, D, zeros, bits)
    runs = law.Runs(N, D, zeros, bits, clean * np.exp(rng.normal(0, 0.002, 120)))
    fitted = law.fit(runs, "chinchilla", starts=law.CHINCHILLA_GRID[::9], bootstrap=20)
    n = fitted.natural()
    lo, hi = fitted.fit["intervals_95"]["alpha"]
    assert lo < fitted.params["alpha"] < hi and 0 < hi - lo < 0.1  # resampling moves alpha
    assert n["E"] == pytest.approx(1.7, rel=0.02)
    assert n["alpha"] == pytest.approx(0.33, abs=0.02) and n["beta"] == pytest.approx(0.3,
                                                                                     abs=0.02)
    assert fitted.fit["rmse"] < 0.01 and fitted.fit["r2"] > 0.99


def test_qat_law_fp_runs_are_chinchilla_and_s_fp_zero_is_finite():
    p = {k: 0.5 for k in law.QAT_PARAMS} | {"a": 6.0, "b": 7.0, "e": 0.5}
    qat_law, chin = law.Law(law.qat, p), law.Law(law.chinchilla, {k: p[k] for k in
                                                                  law.chinchilla.params})
    N, D = np.array([1e8, 1e9]), np.array([2e9, 2e10])
    # Full precision (D_qat = 0): delta is exactly 0.
    np.testing.assert_allclose(qat_law(N, D, 0 * D, 16.0 + 0 * D), chin(N, D, 0 * D, 16 + 0 * D),
                               rtol=1e-12)
    # QAT costs something, more at fewer bits; QAT from scratch (S_fp = 0) stays finite.
    l4, l2 = qat_law(N, 0.8 * D, 0.2 * D, 4.0 + 0 * D), qat_law(N, 0.8 * D, 0.2 * D, 2.0 + 0 * D)
    assert np.all(l2 > l4) and np.all(l4 > chin(N, D, 0 * D, 16 + 0 * D))
    assert np.all(np.isfinite(qat_law(N, 0 * D, D, 2.0 + 0 * D)))


def _rows(n=20, **override):
    rows = [{"N": 1e8 * (i + 1), "D_fp": 1e9, "D_qat": 1e8, "B": 4, "loss": 3.0 - 0.01 * i}
            for i in range(n)]
    for i, row in override.items():
        rows[int(i[1:])].update(row)
    return rows


@pytest.mark.parametrize("rows,match", [
    ([], "no runs"),
    ([{"N": 1, "D_fp": 1, "B": 4, "loss": 3}], r"missing columns \['D_qat'\]"),
    (_rows(r3={"loss": float("nan")}), "column loss is NaN or infinite in row 3"),
    (_rows(r5={"N": -1.0}), "N must be positive; row 5 has N = -1"),
    (_rows(r2={"D_fp": 0, "D_qat": 0}), r"D_fp \+ D_qat must be positive"),
    (_rows(r1={"B": "four"}), "non-numeric value"),
])
def test_bad_tables_rejected(rows, match):
    with pytest.raises(law.LawError, match=match):
        law.Runs.from_records(rows)


def test_too_few_runs_and_unknown_form():
    runs = law.Runs.from_records(_rows(5))
    with pytest.raises(law.LawError, match="5 runs cannot determine the 16 parameters"):
        law.fit(runs, "qat")
    with pytest.raises(law.LawError, match=r"unknown law form 'kaplan'; registered: \["):
        law.fit(runs, "kaplan")


def test_read_runs_jsonl_and_csv_and_law_file(tmp_path):
    rows = _rows(12)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (tmp_path / "runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    a, b = law.read_runs(tmp_path / "runs.jsonl"), law.read_runs(tmp_path / "runs.csv")
    np.testing.assert_array_equal(a.loss, b.loss)
    assert len(a) == 12
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(law.LawError, match="not JSON lines"):
        law.read_runs(tmp_path / "bad.jsonl")
    fitted = law.Law(law.chinchilla, {"a": 6.0, "b": 7.0, "e": 0.5, "alpha": 0.3,
                                      "beta": 0.3}, {"r2": 0.9})
    fitted.save(tmp_path / "law.json")
    again = law.load_law(tmp_path / "law.json")
    assert again.params == fitted.params and again.form is law.chinchilla
    assert again(1e9, 1e10, 0.0, 16.0) == pytest.approx(fitted(1e9, 1e10, 0.0, 16.0))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(law.LawError, match="not a law file"):
        law.load_law(tmp_path / "x.json")
