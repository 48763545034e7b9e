"""`qat-jax repro`: the paper's study (Dremov et al., ICLR 2026) at laptop scale, on real text.

One command builds the corpus (the embedded King James Bible plus a second offline corpus),
then for every point (model size, token budget, seed) of a grid runs a sweep (`qat_jax.tools.sweep`:
one FP trunk, QAT branches at 2, 4 and 6 bits over a range of fractions, the FP-only run; fused
cooldown everywhere, unfused too at some points), fits the QAT loss law to the runs, and writes
plots and a claim-by-claim report (`qat_jax.study.claims`, `qat_jax.study.report`).

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

import glob as globlib
import json
import os
import platform
import time
from pathlib import Path

from qat_jax import console, files, resolve, runconfig, rundir, xla_cache
from qat_jax.study import corpus as corpus_lib
from qat_jax.study import report
from qat_jax.study.corpus import ReproError
from qat_jax.study.grids import SIZES, Grid, grid_from_json, point_config
from qat_jax.tools import sweep

RUNS_FILE, STUDY_FILE = "runs.jsonl", "study.json"  # the study's table and its context


def _check_start(workdir: Path, grid: Grid, second: str, config,
                 path: Path | None = None) -> dict | None:
    """Refuse a grid, corpus or workdir that cannot be run; the repro.json to write once the
    corpus is built (None when the workdir has one: a resume). `path`: the repro.json of a
    committed study to start from (--resume_from), whose grid may differ: its config and
    second corpus may not."""
    for s in grid.sizes:
        if s not in SIZES:
            raise ReproError(f"grid {grid.name}: unknown size {s!r}; sizes: {sorted(SIZES)}")
    names = [p.name for p in grid.points]
    if len(set(names)) != len(names):
        raise ReproError(f"grid {grid.name}: a point is given twice ({names})")
    if second not in corpus_lib.SECOND_CORPORA and not globlib.glob(os.path.expanduser(second)):
        raise ReproError(f"--second_corpus={second!r}: one of {corpus_lib.SECOND_CORPORA} or "
                         f"a glob that matches text files")
    spec = {"grid": grid.to_json(), "second_corpus": second}
    seeding = path is not None
    path = workdir / "repro.json" if path is None else path
    if path.exists():
        old = files.read_json(path, "it records how this study was started: restore it, or "
                                    "choose another --workdir")
        # a new workdir seeded from another grid's study: its points that this grid has
        # with the same settings are imported (_import_points), the rest trained
        extends = _extends(old.get("grid"), spec["grid"]) or (
            seeding and old.get("grid") != spec["grid"])
        diffs = [f"{k}: {old.get(k)} -> {v}" for k, v in spec.items()
                 if old.get(k) != v and not (k == "grid" and extends)]
        diffs += [f"--config.{d}" for d in runconfig.config_diffs(old.get("config", {}), config)]
        if diffs:
            raise ReproError(f"{workdir} holds a repro started otherwise; resuming it would mix "
                             f"two studies. Differences: {'; '.join(diffs)}. Rerun it as it was "
                             f"started (a grid may only add points after its own), or choose "
                             f"another --workdir")
        # an extended grid: the record rewritten once the corpus is checked against its own
        return {**old, "grid": spec["grid"]} if extends else None
    spec["config"] = json.loads(config.to_json_best_effort())
    return spec


def _extends(old: dict | None, new: dict) -> bool:
    """Whether grid `new` is `old` with points added after its own (the same name and
    settings, every point of `old` first and unchanged): a study grown by new points, whose
    finished runs all stay valid."""
    if not isinstance(old, dict) or old == new:
        return False
    points = old.get("points")
    return (isinstance(points, list) and len(new["points"]) > len(points)
            and new["points"][:len(points)] == points
            and {k: v for k, v in old.items() if k != "points"}
            == {k: v for k, v in new.items() if k != "points"})


def run(config, workdir, grid: Grid, second: str = "python-doc", resume_from=None) -> dict:
    """Run (or resume) the study in `workdir`; returns the report (qat_jax.study.report). One
    process at a time runs a workdir. `resume_from`, a study's committed directory (runs.jsonl,
    study.json, repro.json, timing.json: docs/repro), starts a new workdir from it: the points
    complete there, and in its grid with the same settings as in `grid`, are taken from its
    table, not trained again, once the config and the rebuilt corpus are checked to be the
    same (the grids may differ: a study of another grid reuses the points the two share)."""
    workdir = Path(workdir)
    for point in grid.points:  # every config checked before any work
        resolve.resolve(point_config(config, point, workdir / "data"))
    files.check_workdir_kind(workdir, "study")
    with files.WorkdirLock(workdir):
        return _run(config, workdir, grid, second, resume_from)


def _seed_from(workdir: Path, src: Path) -> Path:
    """The committed study's record (its repro.json) that a new workdir starts from; refused
    where the workdir has a study of its own or `src` is not a study. Nothing is written: the
    record is checked like any resume's (_check_start, then the corpus) and written once both
    pass."""
    if (workdir / "repro.json").exists():
        raise ReproError(f"--resume_from={src}: {workdir} holds a study already; resume it "
                         f"without --resume_from, or choose another --workdir")
    for name in ("repro.json", RUNS_FILE, STUDY_FILE):
        if not (src / name).is_file():
            raise ReproError(f"--resume_from={src}: no {name} there; give the directory of a "
                             f"committed study (repro.json, {RUNS_FILE}, {STUDY_FILE}: "
                             f"docs/repro)")
    return src / "repro.json"


def _import_points(workdir: Path, grid: Grid, src: Path) -> list[str]:
    """The points complete in a committed study's table, written into this workdir's sweeps
    (runs.jsonl, and sweep.json with their compute, marked imported.json) with their wall
    time; the points imported."""
    fix = f"give --resume_from a study's directory as `qat-jax repro` writes it ({src})"
    rows = files.read_jsonl(src / RUNS_FILE, fix)
    study = files.read_json(src / STUDY_FILE, fix)
    timing_src = study.get("timing", {}).get("points", {})
    theirs = {q.name: q for q in grid_from_json(study["grid"]).points}
    done = []
    for p in grid.points:
        if theirs.get(p.name) != p:  # not in that study's grid, or there with other settings
            continue
        mine = [r for r in rows if r.get("point") == p.name]
        compute = study.get("compute_by_point", {}).get(p.name)
        d = workdir / "sweeps" / p.name
        if len(mine) != p.n_runs() or compute is None or (d / "sweep.json").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        files.atomic_write(d / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in mine))
        files.atomic_write(d / "sweep.json", json.dumps(
            {**compute, "preempted": False, "failed": {}}, indent=2) + "\n")
        files.atomic_write(d / "imported.json", json.dumps({"from": str(src)}) + "\n")
        _add_time(workdir, timing_src.get(p.name, 0.0), p.name)
        done.append(p.name)
    if done:  # the invocations that trained them count as this study's
        _add_time(workdir, 0.0, sessions=int(study.get("timing", {}).get("sessions", 0)))
    return done


def _run(config, workdir: Path, grid: Grid, second: str, resume_from=None) -> dict:
    t0 = time.time()
    record = None if resume_from is None else _seed_from(workdir, Path(resume_from))
    # model.matmul_precision='auto': the study's recorded precision, else this host's
    start = workdir / "repro.json" if record is None else record
    config = rundir.pin_saved(config, files.read_json(start, "it records how this study was "
                                                      "started: restore it, or choose "
                                                      "another --workdir").get("config")
                              if start.exists() else None)
    spec = _check_start(workdir, grid, second, config, record)
    extended = spec is not None and "corpus" in spec  # a grid grown past its record's
    # the runs of a size and bit width share their train step, which then compiles once
    xla_cache.use_compilation_cache(str(workdir / "xla_cache"), 0.5)
    meta = corpus_lib.build_corpus(workdir, second, config.model.vocab_size)
    fingerprint = corpus_lib.corpus_fingerprint(workdir, second)
    if spec is None and record is not None:  # the committed study's record, as it is
        spec = files.read_json(record, f"give --resume_from a study's directory as `qat-jax "
                                       f"repro` writes it ({record.parent})")
    if spec is not None:  # written once the corpus is built: a failed start blocks no rerun
        if "corpus" in spec:  # its runs so far were trained on that corpus
            corpus_lib.check_corpus(workdir, fingerprint, spec["corpus"])
        if extended:
            console.say(f"the grid extended: {len(grid.points)} points" if record is None else
                        f"grid {grid.name}, from {resume_from}'s study of another grid")
        spec["corpus"] = fingerprint
        files.atomic_write(workdir / "repro.json", json.dumps(spec, indent=2) + "\n")
    else:
        corpus_lib.check_corpus(workdir, fingerprint,
                      files.read_json(workdir / "repro.json", "it records how this study "
                                      "was started: restore it, or choose another "
                                      "--workdir").get("corpus"))
    _add_time(workdir, 0.0, new_session=True)
    if resume_from is not None:
        imported = _import_points(workdir, grid, Path(resume_from))
        console.say(f"from {resume_from}: points {imported or 'none'} complete there, not "
                    f"trained again")
    train_tokens = meta["splits"]["train"]["tokens"]
    epochs = {p.name: p.budget / train_tokens for p in grid.points}
    if max(epochs.values()) > grid.max_epochs:
        raise ReproError(f"the largest budget is {max(epochs.values()):.2f} epochs of the "
                         f"{train_tokens:,}-token corpus (at most {grid.max_epochs:g}); give a "
                         f"larger second corpus or smaller budgets")
    summaries, preempted = {}, False
    for i, point in enumerate(grid.points):
        console.say(f"\n##### repro point {i + 1}/{len(grid.points)}: {point.name} "
                    f"({point.n_runs()} runs, {epochs[point.name]:.2f} epochs) #####")
        modes = (True, False) if point.unfused else (True,)
        sweep_dir = workdir / "sweeps" / point.name
        if (sweep_dir / "imported.json").exists():  # from a committed study's table
            summaries[point.name] = files.read_json(
                sweep_dir / "sweep.json", f"remove {sweep_dir} to import or train that point "
                                          f"again")
            continue
        summaries[point.name] = sweep.run_sweep(
            point_config(config, point, workdir / "data"), workdir / "sweeps" / point.name,
            (0.0, *point.fractions), list(point.bits), modes, set(point.unfused),
            controls=point.controls, fixed_cooldown=point.fixed_cooldown,
            fixed_fractions=point.fixed)
        timing = _add_time(workdir, time.time() - t0, point.name)  # a kill loses one point
        t0 = time.time()
        if summaries[point.name]["preempted"]:
            preempted = summaries[point.name]["preempted"]  # the signal's name
        # the table so far and its context, to commit as points finish (docs/study.md)
        context = study_context(workdir, grid, second, meta, fingerprint, epochs, timing,
                                preempted, summaries)
        if preempted:
            break
    timing = _add_time(workdir, time.time() - t0)
    context = study_context(workdir, grid, second, meta, fingerprint, epochs, timing,
                            preempted, summaries)
    return report.write_report(workdir, collect_records(workdir, grid), grid, context)


def study_context(workdir: Path, grid: Grid, second: str, meta: dict, fingerprint: dict,
                  epochs: dict, timing: dict, preempted, summaries: dict) -> dict:
    """Write runs.jsonl (every finished run) and study.json (what the report needs beside
    the runs: the grid, the corpus and its fingerprint, timing, compute, hardware); these two
    files are the study: `regenerate` makes the report from them with no training."""
    _write_runs(workdir, collect_records(workdir, grid))
    context = {"grid": grid.to_json(), "second_corpus": second, "corpus": meta,
               "corpus_fingerprint": fingerprint,
               "epochs": epochs, "timing": timing, "preempted": preempted,
               "failed": {k: v["failed"] for k, v in summaries.items() if v["failed"]},
               "compute": _compute(workdir, grid), "compute_by_point": _compute_by_point(
                   workdir, grid), "hardware": _hardware()}
    files.atomic_write(workdir / STUDY_FILE, json.dumps(context, indent=1) + "\n")
    return context


def regenerate(src, out=None) -> dict:
    """The report (law.json, report.json, REPORT.md, plots/) made again in `out` (default
    `src`) from a study's runs.jsonl and study.json in `src`, with no training: the
    committed study (docs/repro) regenerated, or a workdir's after changes to the report."""
    src = Path(src)
    out = src if out is None else Path(out)
    for name in (RUNS_FILE, STUDY_FILE):
        if not (src / name).is_file():
            raise ReproError(f"{src}: no {name}; a study's directory has {RUNS_FILE} and "
                             f"{STUDY_FILE} (written by `qat-jax repro` after every point)")
    fix = (f"{src}'s {RUNS_FILE} and {STUDY_FILE} are what `qat-jax repro` writes: restore "
           f"them (git checkout, for docs/repro)")
    records = files.read_jsonl(src / RUNS_FILE, fix)
    context = files.read_json(src / STUDY_FILE, fix)
    try:
        grid = grid_from_json(context["grid"])
    except (KeyError, TypeError, ValueError) as e:
        raise ReproError(f"{src}: {RUNS_FILE} or {STUDY_FILE} is not what `qat-jax repro` "
                         f"writes ({type(e).__name__}: {e})") from None
    out.mkdir(parents=True, exist_ok=True)
    return report.write_report(out, records, grid, context)


def collect_records(workdir: Path, grid: Grid) -> list[dict]:
    """Every finished run of the grid's sweeps, with its point, size, budget and seed (not its
    workdir: the table is the same on every machine)."""
    records = []
    for p in grid.points:
        path = Path(workdir) / "sweeps" / p.name / "runs.jsonl"
        if path.exists():
            for r in files.read_jsonl(path, f"remove {path.parent} to train that point "
                                            f"again"):
                r.pop("workdir", None)
                records.append(r | {"size": p.size, "budget": p.budget, "point": p.name,
                                    "seed": p.seed})
    return records


def _write_runs(workdir: Path, records: list[dict]):
    files.atomic_write(workdir / RUNS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def _add_time(workdir: Path, seconds: float, point: str | None = None,
              new_session: bool = False, sessions: int = 0) -> dict:
    """timing.json: wall seconds over all invocations (`sessions`; plus `sessions` more, a
    committed study's that this one resumed from) of the repro, and by point (`points`; the
    time a point took, summed over the invocations that worked on it)."""
    path = workdir / "timing.json"
    timing = (files.read_json(path, "delete it: the study's wall time then counts from now")
              if path.exists() else {})
    points = dict(timing.get("points", {}))
    if point is not None:
        points[point] = points.get(point, 0.0) + seconds
    timing = {"seconds": timing.get("seconds", 0.0) + seconds,
              "sessions": timing.get("sessions", 0) + int(new_session) + sessions,
              "points": points}
    files.atomic_write(path, json.dumps(timing, indent=1) + "\n")
    return timing


COMPUTE_KEYS = ("tokens", "tokens_trunk", "tokens_branches", "tokens_from_scratch", "flops",
                "flops_from_scratch")


def _compute_by_point(workdir: Path, grid: Grid) -> dict:
    out = {}
    for p in grid.points:
        path = workdir / "sweeps" / p.name / "sweep.json"
        if path.exists():
            s = files.read_json(path, f"remove {path.parent} to train that point again")
            out[p.name] = {k: s[k] for k in COMPUTE_KEYS}
    return out


def _compute(workdir: Path, grid: Grid) -> dict:
    """Tokens and FLOPs of all sweeps (each trunk once) against every run from scratch."""
    out = dict.fromkeys(COMPUTE_KEYS, 0.0)
    for s in _compute_by_point(workdir, grid).values():
        for k in COMPUTE_KEYS:
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
