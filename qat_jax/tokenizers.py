"""The sentencepiece tokenizer: a byte-fallback BPE trained on a corpus's training documents, or
a given .model file; a vocabulary size that does not fit the corpus is an error that says which
way to move it."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence

import sentencepiece as spm

from qat_jax.documents import CONFIG_NAMES, DataError


def train_tokenizer(train_docs: Sequence[str], vocab_size: int, names=CONFIG_NAMES) -> bytes:
    """A byte-fallback BPE sentencepiece model trained on the training documents only."""
    key, tok = names["vocab_size"], names["tokenizer"]
    if vocab_size < MIN_VOCAB:
        raise DataError(f"{key}={vocab_size}: a byte-fallback BPE tokenizer needs at least "
                        f"{MIN_VOCAB} pieces (3 special pieces and the 256 bytes); raise it, or "
                        f"give {tok}=FILE.model")
    lines = (line for doc in train_docs for line in doc.splitlines() if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, num_threads=os.cpu_count() or 1,
            minloglevel=2, max_sentence_length=1 << 16, pad_id=-1, unk_id=0, bos_id=1, eos_id=2)
    except RuntimeError as e:
        raise DataError(_vocab_advice(str(e), vocab_size, key, tok)) from None
    return model.getvalue()


MIN_VOCAB = 259  # unk, bos, eos and the 256 byte pieces of byte fallback


def _vocab_advice(error: str, vocab_size: int, key: str, tok: str) -> str:
    """sentencepiece's training error as what to change: which way the vocabulary must move."""
    head = f"cannot train a {vocab_size}-piece BPE tokenizer on this corpus"
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", error):
        return (f"{head}: its distinct characters and the special pieces need {m[1]} pieces; "
                f"raise {key} to at least {m[1]}, or give {tok}=FILE.model")
    if m := re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", error):
        return (f"{head}: the corpus is too small to make more than {m[1]} pieces; lower "
                f"{key} to at most {m[1]}, use a larger corpus, or give {tok}=FILE.model")
    detail = (error.splitlines() or [""])[0][:300]
    return f"{head} ({detail}); change {key} or give {tok}=FILE.model"


def load_tokenizer(path: str, names=CONFIG_NAMES) -> spm.SentencePieceProcessor:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"{names['tokenizer']}={path!r}: no such sentencepiece .model file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"{names['tokenizer']}={path!r} is not a sentencepiece model: {e}"
                        ) from None
    return sp
