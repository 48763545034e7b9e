"""Corpora as token streams, packed token sequences and the grain pipeline (the documents they
come from: documents.py; their tokenizer: tokenizers.py).

A corpus is a sequence of documents. Every `val_every_nth_doc`-th document is held out for
validation, before tokenization, so no validation text is ever trained on. Each split is one
token stream (documents joined by EOS) cut into non-overlapping sequences of seq_len + 1 tokens
(inputs and shifted targets). Streams come from memory (text corpora, tokenized once and cached)
or from ArrayRecord shards written by `qat-jax prepare`.

The training pipeline is a grain MapDataset: shuffled per epoch for a seed, each host taking its
own slice, batched; its iterator state is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import numpy as np
import sentencepiece as spm

from qat_jax.documents import (  # noqa: F401 (DataError: the data modules' error, here too)
    CONFIG_NAMES,
    SOURCES,
    DataError,
    DataSpec,
    bible_path,
    check_source,
    documents,
    resolve_glob,
    split_documents,
)
from qat_jax.files import atomic_write
from qat_jax.tokenizers import load_tokenizer, train_tokenizer

META_FILE = "metadata.json"  # written by `qat-jax prepare` beside its shards
SPLITS = ("train", "validation")


# ----------------------------------------------------------------------------- caches


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def corpus_fingerprint(d: DataSpec) -> dict:
    """Identifies a text corpus cheaply (paths, sizes, mtimes), to key the caches."""
    if d.source == "bible":
        files = [str(bible_path())]
    elif d.source == "files":
        files = resolve_glob(d.path)
    else:
        files = []
    stats = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
    return {"source": d.source, "path": d.path, "text_key": d.text_key, "files": stats,
            "tfds_data_dir": d.tfds_data_dir, "val_every_nth_doc": d.val_every_nth_doc}


def cache_dir(d: DataSpec) -> Path:
    return Path(os.path.expanduser(d.cache_dir))


# ----------------------------------------------------------------------------- token streams


class RecordTokens:
    """A token stream stored as ArrayRecord records of `record_tokens` little-endian uint32
    (only the stream's last record may be shorter), read by random access."""

    def __init__(self, paths: Sequence[str], record_tokens: int, n_tokens: int):
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        self.record_tokens, self.n_tokens = record_tokens, n_tokens
        want = -(-n_tokens // record_tokens)
        if len(self._source) != want:  # a shard cut short (a copy or a write interrupted)
            raise DataError(f"the shards hold {len(self._source)} records where their metadata "
                            f"says {want}: {paths[0]}...")
        if want:  # the last record, whose end a truncated file loses first
            self[slice(n_tokens - 1, n_tokens)]

    def __len__(self):
        return self.n_tokens

    def __getitem__(self, s: slice) -> np.ndarray:
        R = self.record_tokens
        parts = []
        for r in range(s.start // R, (s.stop - 1) // R + 1):
            rec = np.frombuffer(self._source[r], dtype="<u4")
            parts.append(rec[max(s.start - r * R, 0):s.stop - r * R])
        return np.concatenate(parts)


class Sequences:
    """Random access to the i-th packed sequence of seq_len + 1 tokens of a stream."""

    def __init__(self, tokens, seq_len: int):
        self.tokens, self.width = tokens, seq_len + 1
        self._len = len(tokens) // self.width

    def __len__(self):
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._len:
            raise IndexError(i)
        return np.asarray(self.tokens[i * self.width:(i + 1) * self.width], dtype=np.int32)


@dataclasses.dataclass
class Corpus:
    """Both splits' token streams and the tokenizer that made them."""

    train: object  # np.ndarray or RecordTokens
    validation: object
    tokenizer_path: str
    vocab_size: int
    description: str

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training split's token frequencies: the loss of the best
        model that ignores context, the bar a language model must clear."""
        toks = self.train if isinstance(self.train, np.ndarray) else self.train[
            slice(0, min(len(self.train), 1 << 24))]
        p = np.bincount(toks, minlength=self.vocab_size).astype(np.float64)
        p = p[p > 0] / p.sum()
        return float(-(p * np.log(p)).sum())


def encode_documents(sp: spm.SentencePieceProcessor, docs: Sequence[str]) -> np.ndarray:
    """One stream: each document's pieces followed by EOS."""
    ids = sp.encode(list(docs), num_threads=os.cpu_count() or 1)
    eos = sp.eos_id()
    dtype = np.uint16 if sp.vocab_size() <= 1 << 16 else np.uint32
    return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=dtype)


def _text_corpus(d: DataSpec) -> Corpus:
    """Tokenize a text corpus (and train its tokenizer) once; later runs read the cache."""
    root = cache_dir(d)
    fingerprint = corpus_fingerprint(d)
    splits = None
    if d.tokenizer:
        tok_path = Path(os.path.expanduser(d.tokenizer))
        sp = load_tokenizer(str(tok_path))
    else:
        name = f"bpe{d.vocab_size}-{_digest(fingerprint)}.model"
        tok_path = root / "tokenizers" / name
        if not tok_path.exists():
            splits = split_documents(documents(d), d.val_every_nth_doc)
            _check_splits(splits, d)
            _write_cache(tok_path, train_tokenizer(splits["train"], d.vocab_size), root)
        try:
            sp = load_tokenizer(str(tok_path))
        except DataError:
            raise DataError(f"the cached tokenizer {tok_path} (data.cache_dir) is damaged: "
                            f"delete it, and it is trained again from the corpus") from None
    key = _digest([fingerprint, hashlib.sha256(tok_path.read_bytes()).hexdigest()])
    streams = {}
    for split in SPLITS:
        path = root / "tokens" / f"{key}-{split}.npy"
        if not path.exists():
            if splits is None:
                splits = split_documents(documents(d), d.val_every_nth_doc)
                _check_splits(splits, d)
            buf = io.BytesIO()
            np.save(buf, encode_documents(sp, splits[split]))
            _write_cache(path, buf.getvalue(), root)
        try:
            streams[split] = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"the cached token file {path} (data.cache_dir) is damaged "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}): "
                            f"delete it, and the corpus is tokenized again") from None
    desc = d.source if d.source == "bible" else f"{d.source}:{d.path}"
    return Corpus(streams["train"], streams["validation"], str(tok_path), sp.vocab_size(), desc)


def _write_cache(path: Path, blob: bytes, root: Path):
    try:
        atomic_write(path, blob)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise DataError(f"data.cache_dir={str(root)!r}: cannot write {path} "
                        f"({e.strerror or type(e).__name__}); {'free space there, or ' * full}"
                        f"set --config.data.cache_dir to a writable directory") from None


def _check_splits(splits, d: DataSpec):
    n_train, n_val = len(splits["train"]), len(splits["validation"])
    where = f"data.source={d.source!r} data.path={d.path!r}"
    if n_train == 0:
        raise DataError(f"{where}: the corpus has no documents")
    if n_val == 0:
        raise DataError(f"{where}: {n_train} documents leave none for validation with "
                        f"data.val_every_nth_doc={d.val_every_nth_doc}; lower it")


def _record_corpus(d: DataSpec) -> Corpus:
    root = Path(os.path.expanduser(d.path))
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"data.path={str(root)!r} has no {META_FILE}: point it at a directory "
                        f"written by `qat-jax prepare`")
    try:
        meta = json.loads(meta_path.read_text())
        streams = {}
        for split in SPLITS:
            shards = [str(root / name) for name in meta["splits"][split]["shards"]]
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise DataError(f"{root}: shard files missing: {missing[:3]}")
            streams[split] = RecordTokens(shards, meta["record_tokens"],
                                          meta["splits"][split]["tokens"])
    except DataError:
        raise
    except Exception as e:  # a damaged metadata.json or shard: array_record raises many types
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{root} is damaged ({type(e).__name__}: {first}); write it again "
                        f"with `qat-jax prepare`") from None
    tokenizer = str(root / meta["tokenizer"])
    return Corpus(streams["train"], streams["validation"], tokenizer, meta["vocab_size"],
                  f"array_record:{root}")


def load_corpus(d: DataSpec) -> Corpus:
    """The corpus of `d`, with its tokenizer's vocabulary checked against the model's."""
    check_source(d.source)
    corpus = (_record_corpus if d.source == "array_record" else _text_corpus)(d)
    if corpus.vocab_size != d.vocab_size:
        raise DataError(f"model.vocab_size={d.vocab_size} but the tokenizer "
                        f"{corpus.tokenizer_path} has {corpus.vocab_size} pieces; set "
                        f"--config.model.vocab_size={corpus.vocab_size}")
    check_sizes(corpus, d)
    return corpus


def check_sizes(corpus: Corpus, d: DataSpec):
    """Both splits must hold at least one global batch of seq_len + 1 token sequences."""
    seq_len, batch = d.seq_len, d.batch_size
    for split in SPLITS:
        n = len(Sequences(getattr(corpus, split), seq_len))
        if n < batch:
            raise DataError(
                f"the {split} split of {corpus.description} has {len(getattr(corpus, split))} "
                f"tokens = {n} sequences of model.seq_len + 1 = {seq_len + 1}, fewer than one "
                f"batch of data.batch_size={batch}; lower model.seq_len or data.batch_size, or "
                f"use a larger corpus")


# ----------------------------------------------------------------------------- pipelines


def host_batch_size(d: DataSpec) -> int:
    return d.batch_size // jax.process_count()


def train_dataset(corpus: Corpus, d: DataSpec) -> grain.MapDataset:
    """Infinite, reshuffled every epoch, this host's slice, batched to [host_batch, seq_len+1]."""
    ds = grain.MapDataset.source(Sequences(corpus.train, d.seq_len))
    ds = ds.shuffle(seed=d.seed).repeat()
    ds = ds[jax.process_index()::jax.process_count()]
    return ds.batch(host_batch_size(d), drop_remainder=True)


def train_iterator(corpus: Corpus, d: DataSpec) -> grain.DatasetIterator:
    """The checkpointable iterator over `train_dataset` (its state is a position)."""
    return iter(train_dataset(corpus, d).to_iter_dataset())


def validation_batches(corpus: Corpus, d: DataSpec) -> list[np.ndarray]:
    """A fixed list of this host's validation batches (the first eval_batches global batches, or
    as many as the split holds), the same at every evaluation."""
    seqs = Sequences(corpus.validation, d.seq_len)
    n_batches = min(d.eval_batches, len(seqs) // d.batch_size)
    ds = grain.MapDataset.source(seqs)[jax.process_index()::jax.process_count()]
    ds = ds.batch(host_batch_size(d), drop_remainder=True)
    return [ds[i] for i in range(n_batches)]
