"""The documents a corpus is made of (the embedded Bible, text or jsonl files, a prepared tfds
dataset), and their split: every `val_every_nth_doc`-th document is held out for validation,
before tokenization, so no validation text is ever trained on."""

from __future__ import annotations

import dataclasses
import glob
import importlib.resources
import json
import os
from collections.abc import Iterator
from pathlib import Path

from qat_jax.errors import ConfigError, UserError

SOURCES = ("bible", "files", "tfds", "array_record")


class DataError(UserError, ValueError):
    """A corpus, file or tokenizer that cannot be used, with what is wrong and what would do."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data pipeline reads (resolve.data_spec builds it from data.* and the model's
    seq_len and vocab_size; qat_jax/configs/base.py documents each key)."""

    source: str
    path: str
    text_key: str
    tfds_data_dir: str
    tokenizer: str
    val_every_nth_doc: int
    batch_size: int  # global: over all devices and hosts
    seed: int
    cache_dir: str
    eval_batches: int
    seq_len: int
    vocab_size: int


def bible_path() -> Path:
    return Path(str(importlib.resources.files("bible") / "data" / "kjv.jsonl"))


def _bible_documents() -> Iterator[str]:
    """The King James Bible, one document per chapter (1,189 of them)."""
    chapter, verses = None, []
    with open(bible_path(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            if (v["book"], v["chapter"]) != chapter and verses:
                yield " ".join(verses)
                verses = []
            chapter = (v["book"], v["chapter"])
            verses.append(v["text"])
    if verses:
        yield " ".join(verses)


def _read_utf8(path: str) -> str:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                        f"re-encode it as UTF-8 (e.g. iconv -t UTF-8)") from None


# What errors call the inputs: config keys (a run), or a command's own flags (prepare).
CONFIG_NAMES = {"path": "data.path", "tokenizer": "data.tokenizer", "text_key": "data.text_key",
                "vocab_size": "model.vocab_size"}
PREPARE_NAMES = {"path": "--input", "tokenizer": "--tokenizer", "text_key": "--text_key",
                 "vocab_size": "--vocab_size"}


def file_documents(pattern: str, text_key: str, names=CONFIG_NAMES) -> Iterator[str]:
    """Documents of the files matching `pattern`: each line's `text_key` field in .jsonl files,
    blank-line-separated paragraphs in any other text file."""
    for path in resolve_glob(pattern, names):
        text = _read_utf8(path)
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
                if not isinstance(record, dict) or text_key not in record:
                    raise DataError(f"{path}:{n}: no field {text_key!r} (set {names['text_key']} "
                                    f"to the field holding the text)")
                yield str(record[text_key])
        else:
            for para in text.split("\n\n"):
                if para.strip():
                    yield para.strip()


def resolve_glob(pattern: str, names=CONFIG_NAMES) -> list[str]:
    if not pattern:
        raise DataError(f"{names['path']} is empty: give a glob of .txt/.jsonl files")
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise DataError(f"{names['path']}={pattern!r} matches no file")
    return paths


def _tfds_documents(name: str, data_dir: str, text_key: str) -> Iterator[str]:
    import tensorflow_datasets as tfds  # imported here: it is slow and only this source needs it

    try:
        # download=False: a built-in dataset that is not prepared would otherwise start a download.
        source = tfds.data_source(name, split="train", data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a missing / unprepared dataset
        raise DataError(f"data.path={name!r}: tfds dataset not available offline "
                        f"(data.tfds_data_dir={data_dir!r}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0]}; prepare it locally with "
                        f"file_format='array_record'") from None
    for i in range(len(source)):
        record = source[i]
        if text_key not in record:
            raise DataError(f"tfds {name!r} has no feature {text_key!r}: set data.text_key to one "
                            f"of {sorted(record)}")
        text = record[text_key]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def check_source(source: str):
    """ConfigError naming the valid sources, for one that is none of them."""
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r}; valid: {SOURCES}")


def documents(d: DataSpec) -> Iterator[str]:
    if d.source == "bible":
        return _bible_documents()
    if d.source == "files":
        return file_documents(d.path, d.text_key)
    if d.source == "tfds":
        return _tfds_documents(d.path, d.tfds_data_dir, d.text_key)
    raise DataError(f"data.source={d.source!r} has no documents; valid: {SOURCES}")


def is_validation(doc_index: int, every_nth: int) -> bool:
    """The held-out rule: every n-th document (1-based) is validation."""
    return doc_index % every_nth == every_nth - 1


def split_documents(docs, every_nth: int) -> dict[str, list[str]]:
    out = {"train": [], "validation": []}
    for i, doc in enumerate(docs):
        out["validation" if is_validation(i, every_nth) else "train"].append(doc)
    return out
