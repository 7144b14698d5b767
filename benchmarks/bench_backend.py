"""Decode throughput of SmolLM2-135M: eager vs llmaccel (passes off), in one run.

    python benchmarks/bench_backend.py --context 512 --batch 1 --tokens 32 --out benchmarks/out/backend.json

For each configuration: prefill a ``--context``-token prompt from the evaluation split, then time
``--tokens`` greedy decode steps (KV cache, ``model.generate``); compile time is measured separately
(a warm-up generate) and excluded. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from llm_compile.eval.data import load_tokens  # noqa: E402
from llm_compile.eval.model import compile_model, load_smollm2  # noqa: E402

CONFIGS = {
    "eager": None,
    "llmaccel-inner-eager": {"inner": "eager"},
    "llmaccel-inductor": {"inner": "inductor"},
}


def decode_rate(model, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(seconds to prefill + decode ``tokens``, decode tokens/s per sequence)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return t2 - t1, tokens / max(t2 - t1 - prefill, 1e-9)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--out", default="benchmarks/out/backend.json")
    args = ap.parse_args(argv)

    model, tok = load_smollm2()
    ids = load_tokens(tok, "evaluation", args.context * args.batch).view(args.batch, args.context)
    rows = []
    for name in args.configs.split(","):
        compile_model(model, CONFIGS[name])
        t0 = time.perf_counter()
        decode_rate(model, ids, 2)  # compiles prefill + decode graphs
        warm = time.perf_counter() - t0
        _, rate = decode_rate(model, ids, args.tokens)
        rows.append({"config": name, "decode_tok_s_per_seq": rate, "decode_tok_s_total": rate * args.batch,
                     "warmup_s": warm})
        print(f"{name:22s} {rate * args.batch:8.2f} tok/s   (warm-up incl. compile {warm:6.1f} s)", flush=True)
    compile_model(model, None)
    base = next((r for r in rows if r["config"] == "eager"), rows[0])
    print(f"\nSmolLM2-135M decode, context {args.context}, batch {args.batch}, {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| config | decode tok/s | vs eager | warm-up (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['decode_tok_s_total']:.2f} | "
              f"{r['decode_tok_s_total'] / base['decode_tok_s_total']:.2f}x | {r['warmup_s']:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
