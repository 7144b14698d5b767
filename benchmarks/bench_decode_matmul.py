"""CPU decode speed with ``options={"decode_matmul": True}`` against stock Inductor and llmaccel ``{}``.

SmolLM2 shapes (random weights, float32), ``--layers`` layers, ``--batch`` prompts of ``--context``
tokens, HF ``DynamicCache``; each config compiled and prefilled once, then ``--repeats`` rounds of
``--steps`` greedy decode steps, interleaved (the order rotates every round). Also the pass's own
per-shape measurement (both matmul forms, one call each) for the model's linears. Prints a table,
writes JSON::

    python benchmarks/bench_decode_matmul.py --threads 1                 # 30 layers, batch 4, 64 tokens
    python benchmarks/bench_decode_matmul.py --threads 1 --layers 6 --batch 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_compile  # noqa: E402,F401  (registers the backend)
from decode_harness import Decoder, _median, smollm2_config  # noqa: E402
from llm_compile.passes.decode_matmul import measure  # noqa: E402

CONFIGS = {"stock_inductor": ("inductor", None), "llmaccel_{}": ("llmaccel", {}),
           "decode_matmul": ("llmaccel", {"decode_matmul": True})}


def shapes(cfg, batch: int) -> dict:
    """The pass's measurement for each distinct linear of the model (rows = batch)."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    named = {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, i), "down": (i, h), "lm_head": (h, cfg.vocab_size)}
    return {name: dict(measure(batch, k, n, True, torch.float32, torch.get_num_threads()), k=k, n=n)
            for name, (k, n) in named.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="bench_decode_matmul.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_config(args.layers)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    dec, tokens = {}, {}
    for name, (backend, opts) in CONFIGS.items():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        dec[name] = Decoder(model, ids, backend, opts, "dynamic", args.context + 512)
        for _ in range(args.warmup):
            dec[name].step()
        print(f"[{name}] compiled + prefill + {args.warmup} steps: {time.perf_counter() - t0:.1f} s", flush=True)
    ms = {n: [] for n in CONFIGS}
    for r in range(args.repeats):
        names = list(CONFIGS)
        for name in names[r % len(names):] + names[: r % len(names)]:
            ms[name].append(dec[name].block(args.steps) * 1e3)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {ms[n][-1]:.1f}" for n in CONFIGS), flush=True)
    for name, d in dec.items():
        tokens[name] = d.tok.flatten().tolist()
    ratio = [a / b for a, b in zip(ms["stock_inductor"], ms["decode_matmul"])]
    res = {"layers": args.layers, "batch": args.batch, "context": args.context, "threads": torch.get_num_threads(),
           "steps": args.steps, "repeats": args.repeats,
           "ms_per_step": {n: _median(v) for n, v in ms.items()}, "spread": {n: [min(v), max(v)] for n, v in ms.items()},
           "speedup_vs_stock": _median(ratio), "speedup_spread": [min(ratio), max(ratio)],
           "last_tokens_equal": tokens["decode_matmul"] == tokens["stock_inductor"],
           "shapes": shapes(cfg, args.batch)}
    print(f"\nCPU decode, SmolLM2 shapes x{args.layers} layers, batch {args.batch}, context {args.context}, "
          f"{res['threads']} threads, DynamicCache; median of {args.repeats} interleaved rounds of {args.steps} steps [range]")
    print("| config | ms / step | tokens/s |\n|---|---:|---:|")
    for n in CONFIGS:
        t = res["ms_per_step"][n]
        print(f"| {n} | {t:.1f} [{res['spread'][n][0]:.1f}-{res['spread'][n][1]:.1f}] | {args.batch * 1e3 / t:.2f} |")
    print(f"decode_matmul vs stock Inductor: {res['speedup_vs_stock']:.2f}x "
          f"[{res['speedup_spread'][0]:.2f}-{res['speedup_spread'][1]:.2f}]; "
          f"last greedy tokens equal: {res['last_tokens_equal']}")
    print(f"\nper-shape measurement (rows = {args.batch}): | linear | K x N | x @ W^T ms | W @ x^T ms |")
    for n, s in res["shapes"].items():
        print(f"| {n} | {s['k']} x {s['n']} | {s['row_major_ms']:.3f} | {s['weight_major_ms']:.3f} |")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    main()
