"""The commands that read a trained model: `eval`, `export` and `generate` (flags and code)."""

from __future__ import annotations

import json

from absl import flags

from qat_jax.errors import UsageError


def eval_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "the run directory to evaluate", flag_values=fv)
    flags.DEFINE_integer("eval_batches", None, "validation batches (default: the run's "
                         "data.eval_batches)", flag_values=fv)


def export_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "the run to export (quantized, for --format=packed)",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "output .safetensors file, directory for --format=hf, "
                        ".gguf file for --format=gguf (must not exist)", flag_values=fv)
    flags.DEFINE_enum("format", "packed", ["packed", "hf", "gguf"], "packed: integer codes + "
                      "scales (qat_jax's own); hf: a Hugging Face Llama directory, weights as "
                      "served; gguf: llama.cpp's file, each matrix in the block type its bit "
                      "width maps onto code for code (Q8_0, Q6_K, Q5_0, Q4_0, Q3_K, Q2_K, "
                      "TQ2_0)",
                      flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "dtype of the stored floats "
                      "(packed: the unquantized tensors, default bfloat16; hf: every weight, "
                      "default float32, which keeps the integer codes exact)", flag_values=fv)


def generate_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "the run whose newest checkpoint generates (quantized "
                        "once past its switch to QAT)", flag_values=fv)
    flags.DEFINE_string("export", None, "or: a `qat-jax export` file", flag_values=fv)
    flags.DEFINE_multi_string("prompt", [""], "a prompt (repeat the flag for a batch); empty: "
                              "the start of a document", flag_values=fv)
    flags.DEFINE_integer("max_tokens", 64, "new tokens per prompt (fewer at an EOS)",
                         flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample from softmax(logits / T)",
                       flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "sample from the smallest set of tokens with this much "
                       "probability", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "the sampling seed (same seed, same text)", flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "a sentencepiece .model (default: the run's own)",
                        flag_values=fv)


def cmd_eval(fv) -> int:
    from qat_jax.tools import evaluate

    if not fv.workdir:
        raise UsageError("--workdir is required")
    out = evaluate.evaluate_workdir(fv.workdir, fv.eval_batches)
    print(json.dumps(out, indent=2))
    return 0


def cmd_export(fv) -> int:
    from qat_jax.tools import export

    if not fv.workdir or not fv.out:
        raise UsageError("--workdir and --out are required")
    from qat_jax import train

    if fv.format == "gguf" and fv.dtype:
        raise UsageError("--dtype is not read with --format=gguf: each matrix's type follows "
                         "its bit width (norms F32, the rest F16)")
    try:
        if fv.format == "hf":
            r = export.export_hf(fv.workdir, fv.out, fv.dtype or "float32")
            print(f"wrote {r['path']}: step {r['step']}, a Hugging Face Llama directory "
                  f"(LlamaForCausalLM), {r['tensors']} tensors, {r['bytes']:,} bytes; "
                  + (f"{r['quantized_matrices']} matrices as served at {r['bits']:g} bits, "
                     f"the bit width and scales recorded" if r["bits"] else "full precision"))
            return 0
        if fv.format == "gguf":
            r = export.export_gguf(fv.workdir, fv.out)
            types = ", ".join(f"{n} {k}" for k, n in sorted(r["types"].items()))
            print(f"wrote {r['path']}: step {r['step']}, llama.cpp GGUF of a {r['bits']:g}-bit "
                  f"run, {r['tensors']} tensors ({types}), {r['bytes']:,} bytes; "
                  + ("scales already fp16 numbers: every weight exactly as served"
                     if r["max_weight_change"] == 0 else
                     f"scales rounded to fp16 (the codes exact): weights changed by at most "
                     f"{r['max_weight_change']:.3g}"))
            return 0
        r = export.export_packed(fv.workdir, fv.out, fv.dtype or "bfloat16")
    except (ValueError, FileExistsError) as e:  # a full-precision run; an existing file
        raise train.RunError(str(e)) from None
    print(f"wrote {r['path']}: step {r['step']}, {r['quantized_matrices']} matrices at "
          f"{r['bits']:g} bits, {r['quantized_bytes']:,} bytes packed = "
          f"{r['quantized_bytes'] / r['quantized_bf16_bytes']:.4f} of their bf16 size; file "
          f"{r['file_bytes']:,} bytes ({r['tensor_bytes']:,} of tensors, the rest {r['dtype']}) "
          f"= {r['file_bytes'] / r['bf16_model_bytes']:.4f} of the model in bf16 "
          f"({r['bf16_model_bytes']:,} bytes)")
    return 0


def cmd_generate(fv) -> int:
    from qat_jax.tools import generate

    if bool(fv.workdir) == bool(fv.export):
        raise UsageError("give --workdir (a run) or --export (a `qat-jax export` file), one")
    sampling = generate.Sampling(fv.max_tokens, fv.temperature, fv.top_p, fv.seed)
    sampling.check()  # before loading anything
    served = (generate.from_workdir(fv.workdir) if fv.workdir
              else generate.from_export(fv.export))
    sp = generate.tokenizer_of(served.data, fv.tokenizer)
    texts = generate.complete(served, fv.prompt, sampling, sp)
    print(f"model: {served.description}; "
          + ("greedy" if fv.temperature == 0 else
             f"temperature {fv.temperature:g}, top_p {fv.top_p:g}, seed {fv.seed}"))
    for prompt, text in zip(fv.prompt, texts, strict=True):
        print(f"\n>>> {prompt}{text}")
    return 0
