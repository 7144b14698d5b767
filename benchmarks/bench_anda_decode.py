"""SmolLM2 decode speed on the CPU path: FP32 vs W4A16 vs Anda (``kernel="reference"``), one run.

    python benchmarks/bench_anda_decode.py [--tokens 16] [--prompt 32] [--widths 8 9 7 7] [--out F]

Rows (greedy decode, batch 1, a DynamicCache; tokens/s over ``--tokens`` decode steps after
``--warmup`` steps that absorb compilation):

* ``FP32``: the GGUF model dequantized to float (``load_smollm2``), eager.
* ``W4A16 (eager)``: ``llm_compile.load_quantized(<the GGUF>)``: the file's Q4_1 integers in
  ``QuantLinear``, whose forward dequantizes every weight on every call.
* ``Anda (reference)``: the same model compiled with ``backend="llmaccel", options={"anda":
  {"mantissa_bits": widths, "kernel": "reference"}, "inner": ...}``: activations fake-quantized to
  Anda, weights dequantized once and cached on the weight tensor (``llm_compile.ops.anda``).

W4A16 runs last, on the same model's uncompiled forward, for ``--w4a16-tokens`` steps. Also prints
how many of the decoded tokens equal FP32's (W4A16 holds the GGUF integers, FP32 their float
dequantization: the same weights, so their tokens should agree). Writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _decode(forward, prompt: torch.Tensor, steps: int, warmup: int):
    """``(decode tokens/s over steps after warmup, greedy tokens)``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = forward(input_ids=prompt, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        toks, t0 = [int(tok)], None
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            out = forward(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(int(tok))
    return steps / (time.perf_counter() - t0), toks


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps (compilation)")
    ap.add_argument("--w4a16-tokens", type=int, default=4,
                    help="timed steps of the W4A16 row (it dequantizes every weight every step: slow)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--widths", type=int, nargs=4, default=[8, 9, 7, 7], metavar=("QKV", "O", "GATE_UP", "DOWN"))
    ap.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    ap.add_argument("--out", default="bench_anda_decode.json")
    args = ap.parse_args(argv)
    import llm_compile
    from llm_compile.config import ANDA_MODULE_KINDS
    from llm_compile.eval.data import load_tokens
    from llm_compile.eval.model import GGUF_FILE, compile_model, eager_forward, gguf_folder, load_smollm2

    fp32, tok = load_smollm2()
    prompt = load_tokens(tok, "evaluation", args.prompt).reshape(1, -1)
    rows = []

    def row(name, forward, steps=args.tokens, warmup=args.warmup):
        tps, toks = _decode(forward, prompt, steps, warmup)
        rows.append({"config": name, "tokens_per_s": tps, "tokens": toks})
        print(f"  {name}: {tps:.2f} tokens/s", flush=True)

    row("FP32 (eager)", fp32)
    del fp32
    model = llm_compile.load_quantized(os.path.join(gguf_folder(), GGUF_FILE))
    widths = dict(zip(ANDA_MODULE_KINDS, args.widths))
    compile_model(model, {"anda": {"mantissa_bits": widths, "kernel": "reference"}, "inner": args.inner})
    row(f"Anda {tuple(args.widths)} (reference, compiled, inner {args.inner})", model)
    row("W4A16 GGUF Q4_1 (eager)", eager_forward(model), steps=args.w4a16_tokens, warmup=0)
    ref = rows[0]
    lines = ["| config | decode tokens/s | vs FP32 | tokens equal to FP32's |", "|---|---|---|---|"]
    for r in rows:
        n = min(len(r["tokens"]), len(ref["tokens"]))
        same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
        r["same_tokens_as_fp32"] = same
        lines.append(f"| {r['config']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x "
                     f"| {same}/{n} |")
    table = "\n".join(lines)
    print(table)
    result = {"model": "SmolLM2-135M-Instruct", "prompt": args.prompt, "tokens": args.tokens,
              "warmup": args.warmup, "widths": widths, "rows": rows, "markdown": table,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load": os.getloadavg()}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
