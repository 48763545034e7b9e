"""The committed study (docs/repro/) regenerated from its table: a module of its own, so
that this test (minutes: every law variant's fit, its bootstrap and robustness refits) runs
beside tests/test_repro.py's long tests rather than after them."""

import json
import shutil
from pathlib import Path

import pytest

from qat_jax.study import repro

REPRO_DOCS = Path(__file__).resolve().parents[1] / "docs" / "repro"


@pytest.mark.slow
def test_committed_study_regenerates_bit_for_bit(tmp_path):
    """docs/repro's runs table and context (runs.jsonl, study.json) give back its law.json and
    REPORT.md byte for byte, with no training: `qat-jax repro --regenerate
    --workdir=docs/repro` (README). Every number of the committed report comes from the
    committed table."""
    for name in ("runs.jsonl", "study.json"):
        shutil.copy(REPRO_DOCS / name, tmp_path / name)
    report = repro.regenerate(tmp_path)
    assert report["n_runs"] == len((REPRO_DOCS / "runs.jsonl").read_text().splitlines())
    for name in ("law.json", "REPORT.md"):
        assert (tmp_path / name).read_bytes() == (REPRO_DOCS / name).read_bytes(), name
    assert json.loads((tmp_path / "report.json").read_text())["claims"] == json.loads(
        (REPRO_DOCS / "report.json").read_text())["claims"]
