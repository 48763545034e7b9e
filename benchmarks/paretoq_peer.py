"""The peer's training step for issue 18's comparison: ParetoQ's Llama (Hugging Face's with its
QuantizeLinear layers; facebookresearch/ParetoQ, models/) on PyTorch's CPU back-end, at the
dimensions `qat-jax bench` uses, timed as forward + backward + AdamW step.

Not part of the package and not run by the tests: it needs torch and transformers 4.48 in a
scratch environment and a checkout of ParetoQ's models/ folder.

    python benchmarks/paretoq_peer.py --paretoq=/path/to/ParetoQ --bits=16,2,4 \
        --seq_len=256 --batch_size=8 [--autocast]

`--autocast` is the peer's own fast mode on a CPU with bfloat16 dot instructions: the forward
and the loss under `torch.autocast("cpu", dtype=torch.bfloat16)` (the backward then runs in the
dtypes autocast chose for each op, as PyTorch prescribes; weights and AdamW stay float32), the
mode to compare qat_jax's `model.matmul_precision=bfloat16` against (issue 32).

prints one line per bit width: `bits B: step S ms, T tokens/s` (best of --rounds rounds of
--steps steps each).
"""

import argparse
import contextlib
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--paretoq", required=True, help="a ParetoQ checkout (its models/ folder)")
    p.add_argument("--bits", default="16,2,4")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=704)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--autocast", action="store_true",
                   help="forward and loss under torch.autocast('cpu', dtype=torch.bfloat16)")
    a = p.parse_args()
    sys.path.insert(0, a.paretoq)
    import torch
    from models.configuration_llama import LlamaConfig
    from models.modeling_llama_quant import LlamaForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    for bits in [int(b) if float(b) == int(float(b)) else float(b) for b in a.bits.split(",")]:
        cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.d_model,
                          intermediate_size=a.d_ff, num_hidden_layers=a.n_layers,
                          num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads,
                          max_position_embeddings=a.seq_len, tie_word_embeddings=True,
                          w_bits=bits if bits < 16 else 32)
        model = LlamaForCausalLM(cfg).float()
        for m in model.modules():  # the learned scales ParetoQ initialises from the weights
            if hasattr(m, "weight_clip_val"):
                with torch.no_grad():
                    m.weight_clip_val.copy_(m.weight.abs().max(dim=1, keepdim=True)[0] /
                                            max(2 ** (max(bits, 1) - 1), 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model, opt):
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast
                        else contextlib.nullcontext())
            with autocast:
                out = model(input_ids=x, labels=None)
                loss = torch.nn.functional.cross_entropy(
                    out.logits.reshape(-1, a.vocab_size).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step(model, opt)  # warm-up
        best = float("inf")
        for _ in range(a.rounds):
            t = time.perf_counter()
            for _ in range(a.steps):
                step(model, opt)
            best = min(best, (time.perf_counter() - t) / a.steps)
        mode = " (bf16 autocast)" if a.autocast else ""
        print(f"bits {bits}{mode}: step {best * 1e3:.1f} ms, "
              f"{a.batch_size * a.seq_len / best:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
