"""`qat-jax prepare`: tokenize a text corpus once into ArrayRecord shards.

Layout of the output directory (read by `data.source=array_record`):
    metadata.json            {"record_tokens", "vocab_size", "eos_id", "tokenizer",
                              "splits": {"train"|"validation": {"tokens", "shards"}}, ...}
    tokenizer.model          the sentencepiece model the tokens were made with
    train-00000.array_record ...   records of `record_tokens` uint32 (little-endian) tokens of
    validation-00000.array_record  the split's stream (documents joined by EOS); only the
                                   split's last record may be shorter.
Documents are split with the same held-out rule as in-memory corpora (documents.is_validation).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from qat_jax import data, documents, files, tokenizers
from qat_jax.errors import os_error_in

TOKENIZER_TRAIN_BYTES = 200 << 20  # text used to train a tokenizer (the first train documents)
ENCODE_BATCH_DOCS = 1024


class _SplitWriter:
    """Appends tokens to a split's stream, writing full records and rolling shard files."""

    def __init__(self, out: Path, split: str, record_tokens: int, shard_records: int):
        self.out, self.split = out, split
        self.record_tokens, self.shard_records = record_tokens, shard_records
        self.pending: list[np.ndarray] = []
        self.n_pending = self.tokens = self.records_in_shard = 0
        self.shards: list[str] = []
        self.writer = None

    def add(self, ids: np.ndarray):
        self.pending.append(ids.astype("<u4"))
        self.n_pending += len(ids)
        if self.n_pending >= self.record_tokens:
            stream = np.concatenate(self.pending)
            n_full = len(stream) // self.record_tokens * self.record_tokens
            for start in range(0, n_full, self.record_tokens):
                self._write(stream[start:start + self.record_tokens])
            self.pending, self.n_pending = [stream[n_full:]], len(stream) - n_full

    def _write(self, record: np.ndarray):
        if self.writer is None or self.records_in_shard == self.shard_records:
            if self.writer is not None:
                self._close_shard()
            name = f"{self.split}-{len(self.shards):05d}.array_record"
            self.shards.append(name)
            with self._os_errors():
                self.writer = ArrayRecordWriter(str(self.out / name), "group_size:1")
            self.records_in_shard = 0
        with self._os_errors():
            self.writer.write(record.tobytes())
        self.records_in_shard += 1
        self.tokens += len(record)

    def _close_shard(self):
        writer, self.writer = self.writer, None
        with self._os_errors():
            writer.close()

    @contextlib.contextmanager
    def _os_errors(self):
        """array_record reports a failed write (a full disk) as a RuntimeError in words."""
        try:
            yield
        except RuntimeError as e:
            raise (os_error_in(e, str(self.out / self.shards[-1])) or e) from None

    def close(self) -> dict:
        if self.n_pending:
            self._write(np.concatenate(self.pending))
        if self.writer is not None:
            self._close_shard()
        return {"tokens": self.tokens, "shards": self.shards}


def prepare(input_glob: str, out: str, *, tokenizer: str = "", vocab_size: int = 32000,
            text_key: str = "text", val_every_nth_doc: int = 50, record_tokens: int = 1 << 16,
            shard_records: int = 256) -> dict:
    """Tokenize the documents of `input_glob` into `out`; returns the metadata written.

    The shards are written into a temporary directory beside `out`, renamed to `out` when all
    is done: a failed or killed prepare leaves nothing under `out` to block the rerun."""
    out_dir = Path(os.path.expanduser(out))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise data.DataError(f"--out={out} exists and is not an empty directory; nothing is "
                             f"overwritten: choose a new directory")
    if val_every_nth_doc < 2 or record_tokens < 1 or shard_records < 1:
        raise data.DataError("--val_every_nth_doc must be >= 2, --record_tokens and "
                             "--shard_records >= 1")
    if not tokenizer and vocab_size < tokenizers.MIN_VOCAB:  # before reading the corpus
        tokenizers.train_tokenizer([], vocab_size, documents.PREPARE_NAMES)
    paths = documents.resolve_glob(input_glob, documents.PREPARE_NAMES)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        with files.naming(tmp_dir):
            meta = _prepare(input_glob, tmp_dir, total_bytes, tokenizer, vocab_size, text_key,
                            val_every_nth_doc, record_tokens, shard_records)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp_dir.rename(out_dir)
    except OSError as e:
        where = Path(e.filename).name if e.filename else "the shards"
        raise data.DataError(f"--out={out}: writing {where} failed ({e.strerror}); "
                             + ("free space on that device, or " if e.errno in
                                (errno.ENOSPC, errno.EDQUOT) else "")
                             + "choose another --out. Nothing was left there") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def _prepare(input_glob, out_dir: Path, total_bytes, tokenizer, vocab_size, text_key,
             val_every_nth_doc, record_tokens, shard_records) -> dict:

    if tokenizer:
        sp = tokenizers.load_tokenizer(tokenizer, documents.PREPARE_NAMES)
        with files.naming(out_dir / "tokenizer.model"):
            shutil.copyfile(os.path.expanduser(tokenizer), out_dir / "tokenizer.model")
    else:
        sample, size = [], 0
        docs = documents.file_documents(input_glob, text_key, documents.PREPARE_NAMES)
        for i, doc in enumerate(docs):
            if not documents.is_validation(i, val_every_nth_doc):
                sample.append(doc)
                size += len(doc)
            if size >= TOKENIZER_TRAIN_BYTES:
                break
        if not sample:
            raise data.DataError(f"--input={input_glob}: no training documents")
        print(f"training a {vocab_size}-piece BPE tokenizer on {size / 1e6:.1f} MB of text",
              flush=True)
        model = tokenizers.train_tokenizer(sample, vocab_size, documents.PREPARE_NAMES)
        with files.naming(out_dir / "tokenizer.model"):
            (out_dir / "tokenizer.model").write_bytes(model)
        sp = tokenizers.load_tokenizer(str(out_dir / "tokenizer.model"))

    writers = {s: _SplitWriter(out_dir, s, record_tokens, shard_records) for s in data.SPLITS}
    batch: dict[str, list[str]] = {s: [] for s in data.SPLITS}
    n_docs = 0

    def flush(split):
        if batch[split]:
            writers[split].add(data.encode_documents(sp, batch[split]))
            batch[split] = []

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
        docs = documents.file_documents(input_glob, text_key, documents.PREPARE_NAMES)
        for i, doc in enumerate(docs):
            split = "validation" if documents.is_validation(i, val_every_nth_doc) else "train"
            batch[split].append(doc)
            if len(batch[split]) == ENCODE_BATCH_DOCS:
                flush(split)
            bar.update(len(doc.encode("utf-8")))
            n_docs += 1
    for split in data.SPLITS:
        flush(split)
    meta = {
        "format": "qat_jax.prepare/1", "record_tokens": record_tokens,
        "vocab_size": sp.vocab_size(), "eos_id": sp.eos_id(), "tokenizer": "tokenizer.model",
        "documents": n_docs, "val_every_nth_doc": val_every_nth_doc, "input": input_glob,
        "splits": {s: w.close() for s, w in writers.items()},
    }
    if meta["splits"]["train"]["tokens"] == 0 or meta["splits"]["validation"]["tokens"] == 0:
        raise data.DataError(f"--input={input_glob}: {n_docs} documents leave a split empty "
                             f"(--val_every_nth_doc={val_every_nth_doc})")
    with files.naming(out_dir / data.META_FILE):
        (out_dir / data.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
