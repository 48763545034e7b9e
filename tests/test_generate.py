"""Generation: the cached decode against the uncached forward, batching, sampling, the CLI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_FLAGS, fixed_fraction, overrides_to_flags, run_cli, small_config

from qat_jax import model, qparams, quant, resolve, sizes
from qat_jax.errors import UsageError
from qat_jax.tools import generate


def _qat_params(config):
    """A random 4-bit model's parameters, its scales set from its weights (the switch)."""
    params = nn.unbox(model.Decoder(model.ModelConfig.from_config(config)).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return qparams.init_scales(params, quant.QuantConfig.from_config(config))


def _served(tmp_path):
    """The random 4-bit model served as `generate` serves it."""
    config = small_config(str(tmp_path), **{"quant.bits": 4.0})
    served = qparams.served_params(_qat_params(config), quant.QuantConfig.from_config(config))
    return generate.Served(generate.serving_net(*sizes.specs(config),
                                                model.Execution.from_config(config)),
                           served, resolve.data_spec(config), "test"), config


def _decode_logits(served, rows, prefill_lens):
    """Logits after each token of each row, by a prefill of prefill_lens[b] tokens (padded
    to the longest) and then one token at a time through the cache."""
    net, params = served.net, served.params
    B, L = rows.shape
    P = max(prefill_lens)
    positions = np.broadcast_to(np.arange(P), (B, P))
    logits, v = net.apply({"params": params}, rows[:, :P], positions_BL=positions,
                          mutable=["cache"])
    out = np.full((B, L, net.cfg.vocab_size), np.nan, np.float32)
    for b, n in enumerate(prefill_lens):
        out[b, :n] = logits[b, :n]
    cache, pos = v["cache"], np.array(prefill_lens)
    while pos.min() < L:
        token = rows[np.arange(B), np.minimum(pos, L - 1)]
        logits, v = net.apply({"params": params, "cache": cache}, token[:, None],
                              positions_BL=np.minimum(pos, L - 1)[:, None], mutable=["cache"])
        cache = v["cache"]
        for b in range(B):
            if pos[b] < L:
                out[b, pos[b]] = logits[b, 0]
        pos = pos + 1
    return out


def test_cached_decode_is_the_uncached_forward(tmp_path):
    """Rows of different prompt lengths, prefilled together (the shorter padded), then
    decoded a token at a time: every position's logits are the full forward's."""
    served, _ = _served(tmp_path)
    rows = np.random.default_rng(0).integers(0, 512, (2, 24)).astype(np.int32)
    full = np.asarray(served.net.apply({"params": served.params}, rows))
    cached = _decode_logits(served, rows, [5, 11])
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
    assert np.abs(full).max() > 0.1  # not a trivially zero model


def test_quantized_weights_are_served(tmp_path):
    """The served parameters through the full-precision model give the QAT model's logits."""
    served, config = _served(tmp_path)
    rows = np.random.default_rng(1).integers(0, 512, (1, 16)).astype(np.int32)
    qat_net = model.Decoder(model.ModelConfig.from_config(config))
    params = _qat_params(config)
    np.testing.assert_allclose(np.asarray(served.net.apply({"params": served.params}, rows)),
                               np.asarray(qat_net.apply({"params": params}, rows)), atol=1e-6)


def test_batched_prompts_continue_as_alone(tmp_path):
    served, _ = _served(tmp_path)
    prompts = [[2, 17, 300, 5], [2, 9], [2, 400, 401, 402, 403, 404, 405]]
    greedy = generate.Sampling(max_tokens=6)
    together = generate.generate(served, prompts, greedy, eos_id=-1)
    alone = [generate.generate(served, [p], greedy, eos_id=-1)[0] for p in prompts]
    assert together == alone and all(len(t) == 6 for t in together)
    # greedy is the argmax of the uncached forward, token by token
    seq = list(prompts[0])
    for _ in range(6):
        logits = served.net.apply({"params": served.params}, np.array([seq]))
        seq.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert together[0] == seq[len(prompts[0]):]


def test_stops_at_eos(tmp_path):
    served, _ = _served(tmp_path)
    greedy = generate.Sampling(max_tokens=8)
    first = generate.generate(served, [[2, 17, 300]], greedy, eos_id=-1)[0]
    # Make the first token that differs from those before it the EOS: the output stops there.
    k = next((i for i in range(1, len(first)) if first[i] not in first[:i]), 0)
    assert generate.generate(served, [[2, 17, 300]], greedy, eos_id=first[k])[0] == first[:k]


def test_sampling_is_reproducible_and_seeded(tmp_path):
    served, _ = _served(tmp_path)
    prompts = [[2, 17, 300], [2, 5]]
    hot = generate.Sampling(max_tokens=12, temperature=1.0, seed=0)
    a = generate.generate(served, prompts, hot, eos_id=-1)
    assert a == generate.generate(served, prompts, hot, eos_id=-1)
    other = generate.generate(served, prompts, generate.Sampling(12, 1.0, 1.0, seed=1), -1)
    assert a != other
    # top_p small enough keeps only the most likely token: the greedy text
    narrow = generate.Sampling(max_tokens=12, temperature=1.0, top_p=1e-6, seed=5)
    assert generate.generate(served, prompts, narrow, -1) == generate.generate(
        served, prompts, generate.Sampling(max_tokens=12), -1)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs))[None].repeat(4000, axis=0)
    for top_p, kept in [(0.4, {0}), (0.5, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}),
                        (1.0, {0, 1, 2, 3})]:
        tokens = generate.next_token(logits, jax.random.key(0),
                                     generate.Sampling(temperature=1.0, top_p=top_p))
        got = np.bincount(np.asarray(tokens), minlength=4) / 4000
        assert set(np.flatnonzero(got)) == kept, (top_p, got)
        want = np.where(np.isin(np.arange(4), list(kept)), probs, 0) / probs[list(kept)].sum()
        np.testing.assert_allclose(got, want, atol=0.03)


@pytest.mark.parametrize("sampling,match", [
    (generate.Sampling(max_tokens=0), r"--max_tokens=0 must be at least 1"),
    (generate.Sampling(temperature=-1.0), r"--temperature=-1.0 must be >= 0"),
    (generate.Sampling(top_p=0.0), r"--top_p=0.0 must be in \(0, 1\]"),
    (generate.Sampling(max_tokens=40), r"the longest prompt \(3 tokens\) plus --max_tokens=40 "
                                       r"exceeds the model's context, model.seq_len=32"),
])
def test_bad_sampling_is_a_clear_error(tmp_path, sampling, match):
    with pytest.raises(UsageError, match=match):
        generate.generate(_served(tmp_path)[0], [[2, 3, 4]], sampling, eos_id=-1)


@pytest.mark.slow
def test_cli_generates_from_run_and_export(tmp_path, cache_dir):
    """A 2-bit run past its switch: `generate` from its workdir and from its float32 export
    writes the same greedy text, and a sampled run repeats with its seed."""
    workdir, out = tmp_path / "run", tmp_path / "model.safetensors"
    run_cli(["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
             "--config.quant.bits=2", *overrides_to_flags(fixed_fraction(0.5)),
             *overrides_to_flags(SMALL_FLAGS)])
    run_cli(["export", f"--workdir={workdir}", f"--out={out}", "--dtype=float32"])
    args = ["--prompt=In the beginning", "--prompt=And", "--max_tokens=8"]
    from_run = run_cli(["generate", f"--workdir={workdir}", *args]).stdout
    from_export = run_cli(["generate", f"--export={out}", *args]).stdout
    assert "2-bit weights as served" in from_run and "2-bit export" in from_export
    texts = lambda s: [line for line in s.splitlines() if line.startswith(">>> ")]
    assert texts(from_run) == texts(from_export) and len(texts(from_run)) == 2
    assert texts(from_run)[0].startswith(">>> In the beginning")
    sampled = [*args, "--temperature=1.0", "--seed=7"]
    one = run_cli(["generate", f"--workdir={workdir}", *sampled]).stdout
    assert texts(one) == texts(run_cli(["generate", f"--workdir={workdir}", *sampled]).stdout)
    bad = run_cli(["generate", f"--workdir={workdir}", f"--export={out}"], check=False)
    assert bad.returncode == 2 and "give --workdir (a run) or --export" in bad.stderr


def test_tokenizer_override_and_its_vocabulary_checked(tmp_path):
    """--tokenizer is used when given; one whose vocabulary is not the model's is refused."""
    from qat_jax import documents, tokenizers
    docs = list(documents._bible_documents())[:200]
    config = small_config(str(tmp_path))  # model.vocab_size 512
    for vocab, ok in ((512, True), (640, False)):
        path = tmp_path / f"bpe{vocab}.model"
        path.write_bytes(tokenizers.train_tokenizer(docs, vocab))
        if ok:
            assert generate.tokenizer_of(resolve.data_spec(config),
                                         str(path)).vocab_size() == 512
        else:
            with pytest.raises(UsageError, match=r"the tokenizer has 640 pieces but the model's "
                                                 r"model.vocab_size is 512"):
                generate.tokenizer_of(resolve.data_spec(config), str(path))
    with pytest.raises(Exception, match=r"--tokenizer='.*missing.model': no such sentencepiece"):
        generate.tokenizer_of(resolve.data_spec(config), str(tmp_path / "missing.model"))


def test_continuation_keeps_the_space_that_starts_it(tmp_path):
    """The new text is what the tokens add after the prompt: a word-initial first token keeps
    its space ("In the beginning" + " of" and not "beginningof"), a word-medial one adds none,
    and prompt plus continuation is always the decoding of all the tokens."""
    import sentencepiece as spm

    from qat_jax import documents, tokenizers
    docs = list(documents._bible_documents())[:200]
    sp = spm.SentencePieceProcessor(model_proto=tokenizers.train_tokenizer(docs, 512))
    prompt = sp.encode("In the beginning")
    for text in (" of the LORD", " God created", "s and ends"):
        new = sp.encode("In the beginning" + text)[len(prompt):]
        if sp.encode("In the beginning" + text)[:len(prompt)] != prompt:
            continue  # the pieces merged across the boundary: not this case
        out = generate.continuation(sp, prompt, new)
        assert "In the beginning" + out == sp.decode(prompt + new)
        assert out.startswith(" ") == text.startswith(" "), (text, out)
    assert generate.continuation(sp, prompt, []) == ""
    spaced = sp.encode(" of the LORD")
    assert generate.continuation(sp, prompt, spaced) == " of the LORD"
