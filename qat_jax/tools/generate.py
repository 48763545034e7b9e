"""`qat-jax generate`: text from a trained model, sampled with a key/value cache.

The served model generates. For a run past its switch to QAT, its weights are fake-quantized
once (qparams.served_params) and run through the full-precision model, which is then the QAT
model; for an export, its dequantized weights. Each prompt is encoded with the run's tokenizer
after an EOS, as every training document follows one (data.encode_documents). Prompts of
different lengths are batched: each row writes the cache at its own positions
(model.Decoder's `positions_BL`), so a row's continuation is the one it would get alone.

Sampling: greedy at temperature 0; else softmax(logits / temperature), cut to the smallest set
of tokens whose probability reaches top_p (nucleus sampling), drawn with a key folded from
`seed` and the step, so the same seed gives the same text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import documents, layout, model, qparams, quant, sizes
from qat_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64  # new tokens per prompt (fewer where EOS comes first)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens with this much probability
    seed: int = 0

    def check(self):
        if self.max_tokens < 1:
            raise UsageError(f"--max_tokens={self.max_tokens} must be at least 1")
        if not self.temperature >= 0:
            raise UsageError(f"--temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top_p={self.top_p} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Served:
    """A model ready to generate: full precision in the loop layout, weights as served."""

    net: model.Decoder
    params: dict
    data: documents.DataSpec  # the run's corpus and tokenizer (tokenizer_of)
    description: str  # what was loaded, for people


def serving_net(m: sizes.ModelSpec, q: quant.QuantConfig, ex: model.Execution) -> model.Decoder:
    """The full-precision model `m` (scales `q`, executing as `ex` asks) on this host, in the
    layout cached decoding runs: the layers as a loop, XLA attention, no rematerialisation."""
    cfg = model.ModelConfig.build(m, q, ex, jax.default_backend(), scan_layers=False,
                                  attention="xla", remat_policy="none")
    return model.Decoder(dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant,
                                                                            bits=None)))


def from_workdir(workdir: str) -> Served:
    """The newest checkpoint of a run: quantized as served once it is past its switch."""
    from qat_jax.tools.restore import restore

    run, setup, step, params = restore(workdir)
    params = jax.device_get(params)
    if setup.plan.quantized_after(step):
        params = qparams.served_params(params, run.quant)
        what = f"step {step}, {setup.plan.bits:g}-bit weights as served"
    else:
        params = layout.unstack_layers(params)
        what = f"step {step}, full precision"
    return Served(serving_net(run.model, run.quant, run.execution), params, run.data,
                  f"{workdir} ({what})")


def from_export(path: str) -> Served:
    """An export's dequantized model (packed.load): the specs of the config it records."""
    from qat_jax import resolve, runconfig
    from qat_jax.tools import packed

    saved, params = packed.load(path)
    config = runconfig.config_from_saved(saved, path)
    m, q = sizes.specs(config)
    return Served(serving_net(m, q, model.Execution.from_config(config)), params,
                  resolve.data_spec(config),
                  f"{path} ({'full precision' if q.bits is None else f'{q.bits:g}-bit export'})")


def next_token(logits_BV, key, sampling: Sampling):
    """The next token of each row: greedy, or sampled at `temperature` within `top_p`."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        # A token is kept while the probability of the more likely ones is below top_p: the
        # smallest set that reaches it. The cut is the least kept logit.
        before = jnp.cumsum(probs, axis=-1) - probs
        cut = jnp.min(jnp.where(before < sampling.top_p, descending, jnp.inf), axis=-1,
                      keepdims=True)
        logits = jnp.where(logits >= cut, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(served: Served, prompts: list[list[int]], sampling: Sampling,
             eos_id: int) -> list[list[int]]:
    """The new tokens of each prompt (lists of token ids), up to sampling.max_tokens or to
    the first EOS (left out)."""
    sampling.check()
    net, params = served.net, served.params
    lengths = np.array([len(p) for p in prompts], np.int32)
    if not len(prompts) or lengths.min() < 1:
        raise UsageError("every prompt needs at least one token")
    if lengths.max() + sampling.max_tokens > net.cfg.seq_len:
        raise UsageError(
            f"the longest prompt ({lengths.max()} tokens) plus --max_tokens="
            f"{sampling.max_tokens} exceeds the model's context, model.seq_len="
            f"{net.cfg.seq_len}: shorten the prompt or lower --max_tokens")
    B, P = len(prompts), int(lengths.max())
    tokens = np.zeros((B, P), np.int32)  # rows shorter than P: filler after the prompt
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p

    @jax.jit
    def prefill(params, tokens_BP):
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        logits, v = net.apply({"params": params}, tokens_BP, positions_BL=positions,
                              mutable=["cache"])
        return logits[jnp.arange(B), lengths - 1], v["cache"]

    @jax.jit
    def decode(params, cache, token_B, pos_B):
        logits, v = net.apply({"params": params, "cache": cache}, token_B[:, None],
                              positions_BL=pos_B[:, None], mutable=["cache"])
        return logits[:, 0], v["cache"]

    sample = jax.jit(next_token, static_argnums=2)
    last, cache = prefill(params, tokens)
    key, pos = jax.random.key(sampling.seed), jnp.asarray(lengths)
    out, done = [], np.zeros(B, bool)
    for step in range(sampling.max_tokens):
        token = sample(last, jax.random.fold_in(key, step), sampling)
        out.append(np.asarray(token))
        done |= out[-1] == eos_id
        if done.all() or step + 1 == sampling.max_tokens:
            break
        last, cache = decode(params, cache, token, pos)
        pos = pos + 1
    return [_until(row, eos_id) for row in np.stack(out, axis=1)]


def _until(row: np.ndarray, eos_id: int) -> list[int]:
    hits = np.flatnonzero(row == eos_id)
    return (row[:hits[0]] if hits.size else row).tolist()


def tokenizer_of(spec: documents.DataSpec, path: str = ""):
    """The sentencepiece tokenizer a run used (its corpus's, `spec`, rebuilt from the cache or
    the corpus when needed), or the one at `path`."""
    from qat_jax import data, tokenizers
    if path:
        sp = tokenizers.load_tokenizer(path, names=documents.PREPARE_NAMES)
    else:
        sp = tokenizers.load_tokenizer(data.load_corpus(spec).tokenizer_path)
    if sp.vocab_size() != spec.vocab_size:
        raise UsageError(f"the tokenizer has {sp.vocab_size()} pieces but the model's "
                         f"model.vocab_size is {spec.vocab_size}: give the run's own "
                         f"tokenizer (--tokenizer)")
    return sp


def complete(served: Served, texts: list[str], sampling: Sampling, sp) -> list[str]:
    """Each text continued by the model (the new text only, with the space that starts it:
    decoded after its prompt, since SentencePiece drops a leading word boundary)."""
    eos = sp.eos_id()
    prompts = [sp.encode(t) for t in texts]
    news = generate(served, [[eos, *p] for p in prompts], sampling, eos)
    return [continuation(sp, p, ids) for p, ids in zip(prompts, news, strict=True)]


def continuation(sp, prompt: list[int], new: list[int]) -> str:
    """The text that `new` adds after `prompt` (token ids): the decoding of both, less the
    prompt's own decoding where it is a prefix of it (always, but for pieces that merge)."""
    head, whole = sp.decode(prompt), sp.decode([*prompt, *new])
    return whole[len(head):] if whole.startswith(head) else sp.decode(new)
