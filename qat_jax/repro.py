"""`qat-jax repro`: the paper's study (Dremov et al., ICLR 2026) at laptop scale, on real text.

One command builds the corpus (the embedded King James Bible plus a second offline corpus),
then for every (model size, token budget) of a grid runs a sweep (`qat_jax.sweep`: one FP trunk,
QAT branches at 2 and 4 bits over a range of fractions, the FP-only run; fused cooldown
everywhere, unfused too at one point), fits the QAT loss law to all runs, and writes plots and
a claim-by-claim report (`qat_jax.claims`).

Layout of the workdir:

    repro.json           the grid, corpus and config it was started with (a rerun must match)
    corpus/              the text: bible.jsonl and the second corpus, one document per line
    data/                the corpus tokenized by `qat-jax prepare` (tokenizer.model, shards)
    sweeps/SIZE-TOKENS/  one sweep per grid point (trunk/, runs/NAME/, runs.jsonl, sweep.json)
    runs.jsonl           every finished run, with its size and budget
    law.json             the QAT law fitted to the fused and FP runs
    report.json          the numbers behind each claim; REPORT.md, the generated report
    plots/               PNGs: loss vs fraction, optimal fraction vs S, fused vs unfused, ...
    timing.json          wall seconds spent, summed over invocations

Rerunning the same command skips what is done and resumes what is not (each sweep resumes its
trunk and runs from their checkpoints); law.json, the report and the plots are rewritten from
all finished runs at the end of every invocation.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from qat_jax import data, metrics, prepare, sweep, train, validate


class ReproError(ValueError):
    """A repro that cannot start or go on, with what is wrong and what would do."""


# Model sizes (the rest of the config from configs/repro.py); parameters at vocab 1024.
SIZES = {
    "xxs": {"d_model": 32, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "d_ff": 96},  # 48k
    "xs": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 176},  # 169k
    "s": {"d_model": 128, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 352},  # 537k
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The study: model sizes x token budgets, each a sweep over `fractions` (plus FP-only) at
    `bits`, fused; unfused as well at the (size, budget) `unfused_at`."""

    name: str
    sizes: tuple[str, ...]
    budgets: tuple[int, ...]
    fractions: tuple[float, ...]
    bits: tuple[float, ...] = (2.0, 4.0)
    unfused_at: tuple[str, int] | None = None
    holdout: tuple[str, int] | None = None  # a point left out of a second fit, then predicted
    max_epochs: float = 4.0

    def points(self) -> list[tuple[str, int]]:
        return [(s, b) for s in self.sizes for b in self.budgets]

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


GRIDS = {
    # 90 runs; 2 h 9 min on 2 CPU cores (measured, one invocation from an empty workdir).
    "full": Grid("full", ("xs", "s"), (1_000_000, 3_160_000, 10_000_000),
                 (0.05, 0.1, 0.2, 0.35, 0.5, 0.8), unfused_at=("xs", 3_160_000),
                 holdout=("s", 10_000_000)),
    # A subset: two sizes (the law's N-terms need two), two budgets, three fractions; 34 runs,
    # 9.5 min on 2 CPU cores (measured with a low-priority job beside it).
    "quick": Grid("quick", ("xxs", "xs"), (200_000, 1_000_000), (0.1, 0.3, 0.6),
                  unfused_at=("xs", 200_000), holdout=("xs", 1_000_000)),
}

SECOND_CORPORA = ("python-doc", "pydoc-topics", "none")  # or a glob of text files
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"  # .rst.txt pages, ~12 MB


def point_name(size: str, budget: int) -> str:
    return f"{size}-{budget / 1e6:g}M"


# ----------------------------------------------------------------------------- the corpus


def _write_jsonl(path: Path, docs) -> int:
    n = 0
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        for doc in docs:
            if doc.strip():
                f.write(json.dumps({"text": doc}) + "\n")
                n += 1
    path.with_suffix(".tmp").replace(path)
    return n


def _python_doc_pages(corpus_dir: Path) -> list[str]:
    """The reStructuredText pages of Debian's python3.11-doc: the installed package's, else
    the package downloaded (apt-get download, no root needed) and unpacked under corpus/."""
    for root in (Path("/") / PYTHON_DOC_SOURCES, corpus_dir / "deb" / PYTHON_DOC_SOURCES):
        pages = sorted(globlib.glob(str(root / "**" / "*.rst.txt"), recursive=True))
        if pages:
            return pages
    deb_dir = corpus_dir / "deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", PYTHON_DOC_PACKAGE], cwd=deb_dir, check=True,
                       capture_output=True, text=True, timeout=600)
        debs = sorted(deb_dir.glob(f"{PYTHON_DOC_PACKAGE}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"no {PYTHON_DOC_PACKAGE}_*.deb in {deb_dir}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(deb_dir)], check=True,
                       capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise ReproError(f"could not get Debian's {PYTHON_DOC_PACKAGE} ({detail.strip()}); "
                         f"install it (apt-get install {PYTHON_DOC_PACKAGE}), or choose "
                         f"--second_corpus=pydoc-topics, none, or a glob of text files") from None
    pages = sorted(globlib.glob(str(deb_dir / PYTHON_DOC_SOURCES / "**" / "*.rst.txt"),
                                recursive=True))
    if not pages:
        raise ReproError(f"{PYTHON_DOC_PACKAGE} unpacked under {deb_dir} has no .rst.txt pages")
    return pages


def _second_documents(second: str, corpus_dir: Path):
    if second == "python-doc":
        return (data._read_utf8(p) for p in _python_doc_pages(corpus_dir))
    if second == "pydoc-topics":
        import pydoc_data.topics

        return (text for _, text in sorted(pydoc_data.topics.topics.items()))
    if second == "none":
        return iter(())
    paths = data.resolve_glob(second)  # a glob: each file one document
    return (data._read_utf8(p) for p in paths)


def build_corpus(workdir: Path, second: str, vocab_size: int) -> dict:
    """corpus/*.jsonl and data/ (tokenized once); returns data/metadata.json."""
    data_dir = workdir / "data"
    if (data_dir / data.META_FILE).exists():
        return json.loads((data_dir / data.META_FILE).read_text())
    if data_dir.exists():  # an interrupted tokenization of ours: nothing else lives there
        metrics.say(f"removing {data_dir}, left incomplete by an interrupted run")
        shutil.rmtree(data_dir)
    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    n_bible = _write_jsonl(corpus_dir / "bible.jsonl", data._bible_documents())
    n_second = _write_jsonl(corpus_dir / "second.jsonl", _second_documents(second, corpus_dir))
    metrics.say(f"corpus: {n_bible} Bible chapters + {n_second} documents of {second}")
    return prepare.prepare(str(corpus_dir / "*.jsonl"), str(data_dir), vocab_size=vocab_size)


# ----------------------------------------------------------------------------- the runs


def point_config(config, size: str, budget: int, data_dir: Path):
    return train.config_with(config, **{f"model.{k}": v for k, v in SIZES[size].items()},
                             **{"schedule.total_tokens": int(budget),
                                "data.source": "array_record", "data.path": str(data_dir)})


def _check_start(workdir: Path, grid: Grid, second: str, config):
    for s in grid.sizes:
        if s not in SIZES:
            raise ReproError(f"grid {grid.name}: unknown size {s!r}; sizes: {sorted(SIZES)}")
    if second not in SECOND_CORPORA and not globlib.glob(os.path.expanduser(second)):
        raise ReproError(f"--second_corpus={second!r}: one of {SECOND_CORPORA} or a glob that "
                         f"matches text files")
    spec = {"grid": grid.to_json(), "second_corpus": second}
    path = workdir / "repro.json"
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [f"{k}: {old.get(k)} -> {v}" for k, v in spec.items() if old.get(k) != v]
        diffs += [f"--config.{d}" for d in train.config_diffs(old.get("config", {}), config)]
        if diffs:
            raise ReproError(f"{workdir} holds a repro started otherwise; resuming it would mix "
                             f"two studies. Differences: {'; '.join(diffs)}. Rerun it as it was "
                             f"started, or choose another --workdir")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        spec["config"] = json.loads(config.to_json_best_effort())
        path.write_text(json.dumps(spec, indent=2) + "\n")


def run(config, workdir, grid: Grid, second: str = "python-doc") -> dict:
    """Run (or resume) the study in `workdir`; returns the report (see qat_jax.claims)."""
    from qat_jax import claims

    workdir = Path(workdir)
    t0 = time.time()
    for size, budget in grid.points():  # every config checked before any work
        validate.check(point_config(config, size, budget, workdir / "data"))
    _check_start(workdir, grid, second, config)
    _add_time(workdir, 0.0, new_session=True)
    meta = build_corpus(workdir, second, config.model.vocab_size)
    train_tokens = meta["splits"]["train"]["tokens"]
    epochs = {point_name(s, b): b / train_tokens for s, b in grid.points()}
    if max(epochs.values()) > grid.max_epochs:
        raise ReproError(f"the largest budget is {max(epochs.values()):.2f} epochs of the "
                         f"{train_tokens:,}-token corpus (at most {grid.max_epochs:g}); give a "
                         f"larger second corpus or smaller budgets")
    summaries, preempted = {}, False
    for i, (size, budget) in enumerate(grid.points()):
        name = point_name(size, budget)
        metrics.say(f"\n##### repro point {i + 1}/{len(grid.points())}: {name} "
                    f"({epochs[name]:.2f} epochs) #####")
        modes = (True, False) if (size, budget) == grid.unfused_at else (True,)
        summaries[name] = sweep.run_sweep(
            point_config(config, size, budget, workdir / "data"), workdir / "sweeps" / name,
            (0.0, *grid.fractions), list(grid.bits), modes)
        _add_time(workdir, time.time() - t0)  # after every point: a kill loses one at most
        t0 = time.time()
        if summaries[name]["preempted"]:
            preempted = True
            break
    timing = _add_time(workdir, time.time() - t0)
    records = []
    for (size, budget) in grid.points():
        path = workdir / "sweeps" / point_name(size, budget) / "runs.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                records.append(json.loads(line) | {"size": size, "budget": budget,
                                                   "point": point_name(size, budget)})
    tmp = workdir / "runs.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(workdir / "runs.jsonl")
    context = {"grid": grid.to_json(), "second_corpus": second, "corpus": meta,
               "epochs": epochs, "timing": timing, "preempted": preempted,
               "failed": {k: v["failed"] for k, v in summaries.items() if v["failed"]},
               "compute": _compute(workdir, grid), "hardware": _hardware()}
    return claims.write_report(workdir, records, grid, context)


def _add_time(workdir: Path, seconds: float, new_session: bool = False) -> dict:
    """timing.json: wall seconds over all invocations (`sessions`) of the repro."""
    path = workdir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "sessions": 0}
    timing = {"seconds": timing["seconds"] + seconds,
              "sessions": timing["sessions"] + int(new_session)}
    path.write_text(json.dumps(timing) + "\n")
    return timing


def _compute(workdir: Path, grid: Grid) -> dict:
    """Tokens and FLOPs of all sweeps (each trunk once) against every run from scratch."""
    keys = ("tokens", "tokens_trunk", "tokens_branches", "tokens_from_scratch", "flops",
            "flops_from_scratch")
    out = dict.fromkeys(keys, 0.0)
    for size, budget in grid.points():
        path = workdir / "sweeps" / point_name(size, budget) / "sweep.json"
        if path.exists():
            s = json.loads(path.read_text())
            for k in keys:
                out[k] += s[k]
    out["saved_frac"] = (1 - out["tokens"] / out["tokens_from_scratch"]
                         if out["tokens_from_scratch"] else 0.0)
    return out


def _hardware() -> dict:
    import jax

    cpu = platform.processor()
    try:  # Linux's name for the CPU model, when platform has none
        cpu = cpu or next(line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "processor": cpu,
            "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}
