"""`qat-jax repro`: the paper's study (Dremov et al., ICLR 2026) at laptop scale, on real text.

One command builds the corpus (the embedded King James Bible plus a second offline corpus),
then for every point (model size, token budget, seed) of a grid runs a sweep (`qat_jax.sweep`:
one FP trunk, QAT branches at 2, 4 and 6 bits over a range of fractions, the FP-only run; fused
cooldown everywhere, unfused too at some points), fits the QAT loss law to the runs, and writes
plots and a claim-by-claim report (`qat_jax.claims`, `qat_jax.report`).

Layout of the workdir:

    repro.json           the grid, corpus and config it was started with (a rerun must match)
    corpus/              the text: bible.jsonl and the second corpus, one document per line
    data/                the corpus tokenized by `qat-jax prepare` (tokenizer.model, shards)
    sweeps/SIZE-TOKENS[-seedK]/  one sweep per point (trunk/, runs/NAME/, runs.jsonl, sweep.json)
    runs.jsonl           every finished run, with its size and budget
    law.json             the QAT law fitted to the fused and FP runs
    report.json          the numbers behind each claim; REPORT.md, the generated report
    plots/               PNGs: loss vs fraction, optimal fraction vs S, fused vs unfused, ...
    timing.json          wall seconds spent, summed over invocations, in all and by point
    xla_cache/           XLA's compilation cache (the runs of a size and bit width share it)

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

from qat_jax import data, files, metrics, prepare, report, runconfig, sweep, validate
from qat_jax.errors import UserError


class ReproError(UserError, ValueError):
    """A repro that cannot start or go on, with what is wrong and what would do."""


# Model sizes (the rest of the config from configs/repro.py); parameters and served bytes at
# vocab 1024 with the embedding at max(B, 4) bits (model.served_bytes).
SIZES = {
    "xxs": {"d_model": 32, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "d_ff": 96},  # 48k
    "xs": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 176},  # 169k
    "s": {"d_model": 128, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 352},  # 537k
    # Shapes of equal served bytes for the memory check: xs2 at 2 bits (92,320 bytes) and xs6
    # at 6 bits (92,448) weigh what xs does at 4 bits (93,056) and xxs in bf16 (92,352).
    "xs2": {"d_model": 80, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 224},  # 244k
    "xs6": {"d_model": 48, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 152},  # 114k
}

FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8)
UNFUSED = (0.1, 0.2, 0.35, 0.5)


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep of the study: a model size and token budget, QAT at `bits` x `fractions`
    (fused cooldown) plus the FP-only run, the unfused cooldown too at the fractions
    `unfused`, with `seed` for the initialisation and the data order."""

    size: str
    budget: int
    bits: tuple[float, ...] = (2.0, 4.0, 6.0)
    fractions: tuple[float, ...] = FRACTIONS
    unfused: tuple[float, ...] = ()
    seed: int = 0

    @property
    def name(self) -> str:
        return report.point_name(self.size, self.budget, self.seed)

    def n_runs(self) -> int:
        return 1 + len(self.bits) * (len(self.fractions) + len(self.unfused))


@dataclasses.dataclass(frozen=True)
class Grid:
    """The study: its points; `holdout` is a model size left out of a second law fit and
    predicted by it; a `smoke` grid checks the pipeline and is not evidence for any claim."""

    name: str
    points: tuple[Point, ...]
    holdout: str | None = None
    smoke: bool = False
    max_epochs: float = 4.0

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.size for p in self.points))

    @property
    def bits(self) -> tuple[float, ...]:
        return tuple(sorted({b for p in self.points for b in p.bits}))

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


GRIDS = {
    # Three sizes over 11x in N (xxs, xs, s), 2/4/6 bits, 7 fractions, S from 2 to 400 tokens
    # per served byte; the unfused cooldown at two (N, D) points; the memory check (xs2, xs6:
    # the bytes of xs at 4 bits); a second seed at one point. 194 runs; timing.json has the
    # wall time (docs/REPRODUCTION.md).
    "full": Grid("full", (
        Point("xxs", 1_000_000),
        Point("xxs", 3_160_000, unfused=UNFUSED),
        Point("xxs", 10_000_000),
        Point("xs", 1_000_000, unfused=UNFUSED),
        Point("xs", 3_160_000),
        Point("s", 1_000_000),
        Point("xs2", 1_000_000, bits=(2.0,)),
        Point("xs6", 1_000_000, bits=(6.0,)),
        Point("xxs", 3_160_000, seed=1),
    ), holdout="s"),
    # The pipeline end to end in about 10 minutes: one size, two budgets, 2 and 4 bits. One size
    # cannot pin the law's N terms: a smoke test, and its report says so.
    "quick": Grid("quick", (
        Point("xxs", 1_000_000, bits=(2.0, 4.0), fractions=FRACTIONS[:6]),
        Point("xxs", 3_160_000, bits=(2.0, 4.0), fractions=FRACTIONS[:6]),
    ), smoke=True),
}

SECOND_CORPORA = ("python-doc", "pydoc-topics", "none")  # or a glob of text files
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"  # .rst.txt pages, ~12 MB


# ----------------------------------------------------------------------------- the corpus


def _write_jsonl(path: Path, docs) -> int:
    lines = [json.dumps({"text": doc}) + "\n" for doc in docs if doc.strip()]
    files.atomic_write(path, "".join(lines))
    return len(lines)


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
    paths = data.resolve_glob(second, {"path": "--second_corpus"})  # each file one document
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


def point_config(config, point: Point, data_dir: Path):
    return runconfig.config_with(config, **{f"model.{k}": v for k, v in SIZES[point.size].items()},
                             **{"schedule.total_tokens": int(point.budget),
                                "data.source": "array_record", "data.path": str(data_dir),
                                "seed": config.seed + point.seed,
                                "data.seed": config.data.seed + point.seed})


def _check_start(workdir: Path, grid: Grid, second: str, config) -> dict | None:
    """Refuse a grid, corpus or workdir that cannot be run; the repro.json to write once the
    corpus is built (None when the workdir has one: a resume)."""
    for s in grid.sizes:
        if s not in SIZES:
            raise ReproError(f"grid {grid.name}: unknown size {s!r}; sizes: {sorted(SIZES)}")
    names = [p.name for p in grid.points]
    if len(set(names)) != len(names):
        raise ReproError(f"grid {grid.name}: a point is given twice ({names})")
    if second not in SECOND_CORPORA and not globlib.glob(os.path.expanduser(second)):
        raise ReproError(f"--second_corpus={second!r}: one of {SECOND_CORPORA} or a glob that "
                         f"matches text files")
    spec = {"grid": grid.to_json(), "second_corpus": second}
    path = workdir / "repro.json"
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [f"{k}: {old.get(k)} -> {v}" for k, v in spec.items() if old.get(k) != v]
        diffs += [f"--config.{d}" for d in runconfig.config_diffs(old.get("config", {}), config)]
        if diffs:
            raise ReproError(f"{workdir} holds a repro started otherwise; resuming it would mix "
                             f"two studies. Differences: {'; '.join(diffs)}. Rerun it as it was "
                             f"started, or choose another --workdir")
        return None
    spec["config"] = json.loads(config.to_json_best_effort())
    return spec


def run(config, workdir, grid: Grid, second: str = "python-doc") -> dict:
    """Run (or resume) the study in `workdir`; returns the report (qat_jax.report). One
    process at a time runs a workdir."""
    workdir = Path(workdir)
    for point in grid.points:  # every config checked before any work
        validate.check(point_config(config, point, workdir / "data"))
    with files.WorkdirLock(workdir):
        return _run(config, workdir, grid, second)


def _run(config, workdir: Path, grid: Grid, second: str) -> dict:
    t0 = time.time()
    spec = _check_start(workdir, grid, second, config)
    # the runs of a size and bit width share their train step, which then compiles once
    files.use_compilation_cache(str(workdir / "xla_cache"), 0.5)
    meta = build_corpus(workdir, second, config.model.vocab_size)
    if spec is not None:  # written once the corpus is built: a failed start blocks no rerun
        files.atomic_write(workdir / "repro.json", json.dumps(spec, indent=2) + "\n")
    _add_time(workdir, 0.0, new_session=True)
    train_tokens = meta["splits"]["train"]["tokens"]
    epochs = {p.name: p.budget / train_tokens for p in grid.points}
    if max(epochs.values()) > grid.max_epochs:
        raise ReproError(f"the largest budget is {max(epochs.values()):.2f} epochs of the "
                         f"{train_tokens:,}-token corpus (at most {grid.max_epochs:g}); give a "
                         f"larger second corpus or smaller budgets")
    summaries, preempted = {}, False
    for i, point in enumerate(grid.points):
        metrics.say(f"\n##### repro point {i + 1}/{len(grid.points)}: {point.name} "
                    f"({point.n_runs()} runs, {epochs[point.name]:.2f} epochs) #####")
        modes = (True, False) if point.unfused else (True,)
        summaries[point.name] = sweep.run_sweep(
            point_config(config, point, workdir / "data"), workdir / "sweeps" / point.name,
            (0.0, *point.fractions), list(point.bits), modes, set(point.unfused))
        _add_time(workdir, time.time() - t0, point.name)  # after every point: a kill loses one
        t0 = time.time()
        if summaries[point.name]["preempted"]:
            preempted = summaries[point.name]["preempted"]  # the signal's name
            break
    timing = _add_time(workdir, time.time() - t0)
    records = collect_records(workdir, grid)
    files.atomic_write(workdir / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    context = {"grid": grid.to_json(), "second_corpus": second, "corpus": meta,
               "epochs": epochs, "timing": timing, "preempted": preempted,
               "failed": {k: v["failed"] for k, v in summaries.items() if v["failed"]},
               "compute": _compute(workdir, grid), "hardware": _hardware()}
    return report.write_report(workdir, records, grid, context)


def collect_records(workdir: Path, grid: Grid) -> list[dict]:
    """Every finished run of the grid's sweeps, with its point, size, budget and seed."""
    records = []
    for p in grid.points:
        path = Path(workdir) / "sweeps" / p.name / "runs.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                records.append(json.loads(line) | {"size": p.size, "budget": p.budget,
                                                   "point": p.name, "seed": p.seed})
    return records


def _add_time(workdir: Path, seconds: float, point: str | None = None,
              new_session: bool = False) -> dict:
    """timing.json: wall seconds over all invocations (`sessions`) of the repro, and by point
    (`points`; the time a point took, summed over the invocations that worked on it)."""
    path = workdir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    points = dict(timing.get("points", {}))
    if point is not None:
        points[point] = points.get(point, 0.0) + seconds
    timing = {"seconds": timing.get("seconds", 0.0) + seconds,
              "sessions": timing.get("sessions", 0) + int(new_session), "points": points}
    files.atomic_write(path, json.dumps(timing, indent=1) + "\n")
    return timing


def _compute(workdir: Path, grid: Grid) -> dict:
    """Tokens and FLOPs of all sweeps (each trunk once) against every run from scratch."""
    keys = ("tokens", "tokens_trunk", "tokens_branches", "tokens_from_scratch", "flops",
            "flops_from_scratch")
    out = dict.fromkeys(keys, 0.0)
    for p in grid.points:
        path = workdir / "sweeps" / p.name / "sweep.json"
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
