"""Quickstart: SmolLM2-135M-Instruct through torch.compile(backend="llmaccel"), end to end on CPU.

    python examples/quickstart.py                  # 3k-token prompt: eager vs llmaccel SWA (~3-5 min, 2 cores)
    python examples/quickstart.py --context 1024 --options '{"kv_store": true}'
    python examples/quickstart.py --chat "Summarise Genesis 1:1 in one sentence."   # a short chat prompt
    python examples/quickstart.py --inner inductor --debug-dir llmaccel_debug

What it shows: the uncompiled model (Hugging Face ``DynamicCache``) against the same model compiled
with ``backend="llmaccel"``, on a long prompt (the evaluation split of the bundled text) where
sparse window attention (``{"swa": {"sparsity": 0.8}}``, with the in-place KV store) pays: each
decode step attends to a fifth of the cache and appends in place instead of copying it. It prints
compile time apart from speed (prefill tokens/s and decode tokens/s, each timed on its own after
the compile), and how many generated tokens agree with the uncompiled model (SWA is approximate:
greedy tokens may part ways after a while).

``--inner eager`` (the default here) runs the rewritten graph without Inductor: compiles in
seconds. ``--inner inductor`` compiles with Inductor too (minutes on 2 cores, faster non-attention
code). The model loads offline (the first run converts the GGUF file into a cache, ~30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: generated Triton kernels run interpreted

import torch  # noqa: E402

from llm_compile.eval.model import load_smollm2  # noqa: E402


def default_threads() -> int:
    """Cores this process may use (affinity-aware), at most 8: more threads than cores, or than
    a 135M model can use, only add contention."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def prompt_ids(tok, args) -> torch.Tensor:
    if args.chat:
        msgs = [{"role": "user", "content": args.chat}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True)["input_ids"]
    from llm_compile.eval.data import load_tokens

    return load_tokens(tok, "evaluation", args.context)


def timed_generate(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:], time.perf_counter() - t0


def measure(model, ids: torch.Tensor, n: int) -> dict:
    """Prefill (1 new token) and the full generation, timed separately after any compile."""
    _, prefill = timed_generate(model, ids, 1)
    new, full = timed_generate(model, ids, n + 1)
    return {"new": new, "prefill_tok_s": ids.shape[1] / prefill,
            "decode_tok_s": n / max(full - prefill, 1e-9), "prefill_s": prefill, "full_s": full}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--options", default='{"swa": {"sparsity": 0.8}}',
                    help="JSON dict passed as torch.compile(..., options=...)")
    ap.add_argument("--inner", choices=["inductor", "eager"], default="eager")
    ap.add_argument("--context", type=int, default=3072, help="prompt tokens (evaluation split)")
    ap.add_argument("--chat", default=None, help="a chat prompt instead of the long evaluation text")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens to generate (decode speed)")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--debug-dir", default="", help="write a debug dump here (see README)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = {"inner": args.inner, **json.loads(args.options)}
    if args.debug_dir:
        options.setdefault("debug_dir", args.debug_dir)

    model, tok = load_smollm2()
    ids = prompt_ids(tok, args)
    timed_generate(model, ids[:, :16], 2)  # warm-up, so eager is not charged for first-call work
    eager = measure(model, ids, args.tokens)

    model.forward = torch.compile(model.forward, backend="llmaccel", options=options)
    t0 = time.perf_counter()
    timed_generate(model, ids, 3)  # compiles the prefill and decode graphs (static, then dynamic)
    compile_s = time.perf_counter() - t0 - eager["prefill_s"]  # minus what running them costs
    acc = measure(model, ids, args.tokens)

    agree = int((eager["new"] == acc["new"]).long().cumprod(0).sum())
    print(f"\nSmolLM2-135M-Instruct, prompt {ids.shape[1]} tokens, {args.tokens} greedy new tokens, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"options: {json.dumps(options)}")
    print(f"{'':10s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    print(f"{'eager':10s} {eager['prefill_tok_s']:14.1f} {eager['decode_tok_s']:13.2f}")
    print(f"{'llmaccel':10s} {acc['prefill_tok_s']:14.1f} {acc['decode_tok_s']:13.2f}"
          f"   decode {acc['decode_tok_s'] / eager['decode_tok_s']:.2f}x eager")
    print(f"compile (one-time, not in the speeds above): {compile_s:.1f} s")
    print(f"greedy tokens equal to eager's: first {agree} of {len(eager['new'])}")
    print(f"eager:    {tok.decode(eager['new'][:24], skip_special_tokens=True)!r}")
    print(f"llmaccel: {tok.decode(acc['new'][:24], skip_special_tokens=True)!r}")
    if args.debug_dir:
        print(f"debug dump: {os.path.join(os.path.abspath(args.debug_dir), 'latest')} (this run's folder; see README, 'Reading a debug dump')")


if __name__ == "__main__":
    main()
