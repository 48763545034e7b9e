import json
import pydoc_data.topics

import numpy as np
import pytest
from conftest import small_config

from qat_jax import data, documents, files, resolve, tokenizers
from qat_jax.tools import prepare

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("data")


@pytest.fixture(scope="module")
def bible_corpus(cache_dir):
    return data.load_corpus(resolve.data_spec(small_config(cache_dir)))


def test_data_spec_holds_every_data_key(cache_dir):
    """The Run's DataSpec is what the pipeline reads: every data.* key of the config (a key
    added to qat_jax/configs/base.py and not to the spec would silently be ignored) and the model's
    seq_len and vocab_size, by value."""
    import dataclasses

    config = small_config(cache_dir)
    with config.unlocked():
        config.data.seed, config.data.eval_batches = 7, 3
    spec = resolve.resolve(config).data
    assert spec == resolve.data_spec(config)
    names = {f.name for f in dataclasses.fields(spec)}
    assert names == set(config.data.keys()) | {"seq_len", "vocab_size"}
    for key in config.data.keys():
        assert getattr(spec, key) == config.data[key], key
    assert (spec.seq_len, spec.vocab_size) == (config.model.seq_len, config.model.vocab_size)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


def _text_files(tmp_path, n_docs=400):
    """A zero-install corpus: the stdlib's pydoc topics, one paragraph per document."""
    topics = list(pydoc_data.topics.topics.values())
    paras = [p.strip() for t in topics for p in t.split("\n\n") if len(p.strip()) > 40][:n_docs]
    (tmp_path / "a.txt").write_text("\n\n".join(paras[: n_docs // 2]), encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for p in paras[n_docs // 2:]:
            f.write(json.dumps({"text": p, "id": 1}) + "\n")
    return paras


def test_atomic_write_replaces_whole_files(tmp_path, monkeypatch):
    """Text or bytes land whole under the name, in a new folder too, and no temporary file
    is left; a write that fails leaves the old file as it was."""
    path = tmp_path / "new" / "timing.json"
    files.atomic_write(path, "{\"seconds\": 1}\n")
    files.atomic_write(path, b"{}\n")
    assert path.read_bytes() == b"{}\n" and [p.name for p in path.parent.iterdir()] == [
        "timing.json"]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, "half")
    assert path.read_bytes() == b"{}\n"


def test_bible_documents_are_chapters():
    docs = list(documents._bible_documents())
    assert len(docs) == 1189
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")


def test_validation_disjoint_from_training(cache_dir):
    config = small_config(cache_dir)
    docs = list(documents.documents(resolve.data_spec(config)))
    splits = documents.split_documents(docs, config.data.val_every_nth_doc)
    n = config.data.val_every_nth_doc
    assert len(splits["validation"]) == len(docs) // n
    val_ids = {i for i in range(len(docs)) if documents.is_validation(i, n)}
    train_ids = set(range(len(docs))) - val_ids
    assert val_ids and not val_ids & train_ids
    assert splits["validation"] == [docs[i] for i in sorted(val_ids)]
    # A validation chapter's text occurs in no training chapter.
    train_text = "\n".join(splits["train"])
    held_out = [d for d in splits["validation"] if d not in train_text]
    assert len(held_out) == len(splits["validation"])


def test_streams_are_the_split_documents(bible_corpus, cache_dir):
    config = small_config(cache_dir)
    sp = tokenizers.load_tokenizer(bible_corpus.tokenizer_path)
    splits = documents.split_documents(documents.documents(resolve.data_spec(config)),
                                       config.data.val_every_nth_doc)
    np.testing.assert_array_equal(bible_corpus.validation,
                                  data.encode_documents(sp, splits["validation"]))
    assert len(bible_corpus.train) > 40 * len(bible_corpus.validation)
    assert int(np.sum(np.asarray(bible_corpus.validation) == sp.eos_id())) == len(
        splits["validation"])


def test_tokenizer_is_cached_not_retrained(bible_corpus, cache_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(data, "train_tokenizer", boom)
    monkeypatch.setattr(data, "encode_documents", boom)
    again = data.load_corpus(resolve.data_spec(small_config(cache_dir)))
    assert again.tokenizer_path == bible_corpus.tokenizer_path
    np.testing.assert_array_equal(again.train[:1000], bible_corpus.train[:1000])


def test_packing(bible_corpus):
    seqs = data.Sequences(bible_corpus.train, 32)
    assert len(seqs) == len(bible_corpus.train) // 33
    np.testing.assert_array_equal(seqs[1], np.asarray(bible_corpus.train[33:66]))
    assert seqs[0].dtype == np.int32 and seqs[0].shape == (33,)
    with pytest.raises(IndexError):
        seqs[len(seqs)]


def test_pipeline_deterministic_and_resumable(bible_corpus, cache_dir):
    config = small_config(cache_dir)
    a = data.train_iterator(bible_corpus, resolve.data_spec(config))
    first = [next(a) for _ in range(5)]
    assert first[0].shape == (8, 33)
    b = data.train_iterator(bible_corpus, resolve.data_spec(config))
    for x in first:
        np.testing.assert_array_equal(x, next(b))
    # The iterator state is a position: restoring it continues exactly.
    state = a.get_state()
    expected = [next(a) for _ in range(3)]
    c = data.train_iterator(bible_corpus, resolve.data_spec(config))
    c.set_state(state)
    for x in expected:
        np.testing.assert_array_equal(x, next(c))
    # Another seed gives another order.
    config.data.seed = 1
    other = next(data.train_iterator(bible_corpus, resolve.data_spec(config)))
    assert not np.array_equal(other, first[0])


def test_epochs_reshuffle(bible_corpus, cache_dir):
    config = small_config(cache_dir, **{"model.seq_len": 512})
    ds = data.train_dataset(bible_corpus, resolve.data_spec(config))
    n = len(data.Sequences(bible_corpus.train, 512))
    per_epoch = n // 8
    first = np.concatenate([ds[i] for i in range(2)])
    second = np.concatenate([ds[per_epoch + i] for i in range(2)])
    assert not np.array_equal(first, second)


def test_validation_batches_fixed(bible_corpus, cache_dir):
    config = small_config(cache_dir)
    a = data.validation_batches(bible_corpus, resolve.data_spec(config))
    b = data.validation_batches(bible_corpus, resolve.data_spec(config))
    assert len(a) == 2 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    np.testing.assert_array_equal(a[0][0], np.asarray(bible_corpus.validation[:33]))


def test_unigram_entropy(bible_corpus):
    h = bible_corpus.unigram_entropy()
    assert 4.0 < h < np.log(512)


def test_files_source_txt_and_jsonl(tmp_path, cache_dir):
    paras = _text_files(tmp_path)
    docs = list(documents.file_documents(str(tmp_path / "*"), "text"))
    assert docs == paras
    config = small_config(cache_dir, **{"data.source": "files",
                                        "data.path": str(tmp_path / "*"),
                                        "data.val_every_nth_doc": 10})
    corpus = data.load_corpus(resolve.data_spec(config))
    assert corpus.description.startswith("files:") and len(corpus.validation) > 33 * 8


@pytest.mark.parametrize("content,match", [
    (b"caf\xe9 au lait\n", r"not UTF-8 text \(byte 3"),
    (b"", "no documents"),
])
def test_bad_text_files(tmp_path, cache_dir, content, match):
    (tmp_path / "bad.txt").write_bytes(content)
    config = small_config(cache_dir, **{"data.source": "files", "data.path": str(tmp_path / "*")})
    with pytest.raises(data.DataError, match=match):
        data.load_corpus(resolve.data_spec(config))


def test_bad_jsonl(tmp_path, cache_dir):
    (tmp_path / "x.jsonl").write_text('{"body": "hello"}\n')
    config = small_config(cache_dir, **{"data.source": "files", "data.path": str(tmp_path / "*")})
    with pytest.raises(data.DataError, match=r"x.jsonl:1: no field 'text'"):
        data.load_corpus(resolve.data_spec(config))


def test_missing_files(tmp_path, cache_dir):
    config = small_config(cache_dir, **{"data.source": "files",
                                        "data.path": str(tmp_path / "none*.txt")})
    with pytest.raises(data.DataError, match="matches no file"):
        data.load_corpus(resolve.data_spec(config))


def test_corpus_too_small_for_a_batch(tmp_path, cache_dir):
    _text_files(tmp_path, n_docs=400)
    config = small_config(cache_dir, **{"data.source": "files", "data.path": str(tmp_path / "*"),
                                        "model.seq_len": 4096, "data.batch_size": 8,
                                        "schedule.total_tokens": 10**6})
    with pytest.raises(data.DataError, match=r"fewer than one batch of data.batch_size=8"):
        data.load_corpus(resolve.data_spec(config))


def test_vocab_mismatch(bible_corpus, cache_dir):
    config = small_config(cache_dir, **{"data.tokenizer": bible_corpus.tokenizer_path,
                                        "model.vocab_size": 1024})
    with pytest.raises(data.DataError, match=r"--config.model.vocab_size=512"):
        data.load_corpus(resolve.data_spec(config))


def test_given_tokenizer_file(bible_corpus, cache_dir):
    config = small_config(cache_dir, **{"data.tokenizer": bible_corpus.tokenizer_path})
    corpus = data.load_corpus(resolve.data_spec(config))
    np.testing.assert_array_equal(corpus.validation, bible_corpus.validation)


def test_bad_tokenizer_file(tmp_path, cache_dir):
    (tmp_path / "x.model").write_bytes(b"not a model")
    config = small_config(cache_dir, **{"data.tokenizer": str(tmp_path / "x.model")})
    with pytest.raises(data.DataError, match="is not a sentencepiece model"):
        data.load_corpus(resolve.data_spec(config))


def test_prepare_array_record_round_trip(tmp_path, bible_corpus, cache_dir):
    """Shards written by `prepare` read back as the same token streams as in memory."""
    (tmp_path / "in").mkdir()
    paras = _text_files(tmp_path / "in")
    meta = prepare.prepare(str(tmp_path / "in" / "*"), str(tmp_path / "out"),
                           tokenizer=bible_corpus.tokenizer_path, val_every_nth_doc=10,
                           record_tokens=1000, shard_records=3)
    assert len(meta["splits"]["train"]["shards"]) > 1
    config = small_config(cache_dir, **{"data.source": "array_record",
                                        "data.path": str(tmp_path / "out")})
    corpus = data.load_corpus(resolve.data_spec(config))
    sp = tokenizers.load_tokenizer(bible_corpus.tokenizer_path)
    splits = documents.split_documents(paras, 10)
    for split in data.SPLITS:
        want = data.encode_documents(sp, splits[split])
        got = getattr(corpus, split)
        assert len(got) == len(want) == meta["splits"][split]["tokens"]
        np.testing.assert_array_equal(got[0:len(want)], want)
        np.testing.assert_array_equal(got[995:2010], want[995:2010])  # across records
    want_train = data.encode_documents(sp, splits["train"])
    np.testing.assert_array_equal(data.Sequences(corpus.train, 32)[40], want_train[40 * 33:41 * 33])
    with pytest.raises(data.DataError, match="not an empty directory"):
        prepare.prepare(str(tmp_path / "in" / "*"), str(tmp_path / "out"),
                        tokenizer=bible_corpus.tokenizer_path)


def test_array_record_dir_without_metadata(tmp_path, cache_dir):
    config = small_config(cache_dir, **{"data.source": "array_record", "data.path": str(tmp_path)})
    with pytest.raises(data.DataError, match="has no metadata.json"):
        data.load_corpus(resolve.data_spec(config))


def test_tfds_source_offline(tmp_path, cache_dir):
    """A tfds dataset prepared locally as array_record is read through tfds.data_source."""
    import tensorflow_datasets as tfds

    (tmp_path / "src").mkdir()
    paras = _text_files(tmp_path / "src")

    class LocalParagraphs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, p in enumerate(paras):
                yield i, {"text": p}

    builder = LocalParagraphs(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    config = small_config(cache_dir, **{"data.source": "tfds", "data.path": "local_paragraphs",
                                        "data.tfds_data_dir": str(tmp_path / "tfds"),
                                        "data.val_every_nth_doc": 10})
    assert sorted(documents.documents(resolve.data_spec(config))) == sorted(paras)
    corpus = data.load_corpus(resolve.data_spec(config))
    assert len(corpus.train) > 1000
    config.data.path = "not_prepared_here"
    with pytest.raises(data.DataError, match="not available offline"):
        list(documents.documents(resolve.data_spec(config)))


@pytest.mark.parametrize("names", [documents.CONFIG_NAMES, documents.PREPARE_NAMES])
def test_vocabulary_hints_point_the_right_way(names):
    """Too few pieces must rise, too many must fall, and the number each hint gives trains."""
    import re

    docs = list(pydoc_data.topics.topics.values())
    key = names["vocab_size"]
    least = tokenizers.MIN_VOCAB
    with pytest.raises(data.DataError, match=rf"{key}=0: .* at least {least} pieces"):
        tokenizers.train_tokenizer(docs, 0, names)
    for corpus, size, way in ((docs, 300, "raise"), (docs[:3], 5000, "lower")):
        with pytest.raises(data.DataError) as e:
            tokenizers.train_tokenizer(corpus, size, names)
        m = re.search(rf"; {way} {re.escape(key)} to at (least|most) (\d+), ", str(e.value))
        assert m, str(e.value)
        assert (int(m[2]) > size) == (way == "raise")
        assert tokenizers.train_tokenizer(corpus, int(m[2]), names)  # the hint's number works
