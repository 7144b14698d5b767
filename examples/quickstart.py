"""Quickstart: SmolLM2-135M-Instruct through torch.compile(backend="llmaccel"), end to end on CPU.

    python examples/quickstart.py                       # dense, all passes off but canonicalisation
    python examples/quickstart.py --options '{"swa": {"sparsity": 0.8}}'
    python examples/quickstart.py --inner eager --tokens 32 --debug-dir llmaccel_debug

It loads the model offline (the first run converts the GGUF file into a cache, ~30 s), generates
greedily with the uncompiled model and with the compiled one, prints both texts and tokens/s, and
writes a debug dump (one folder per compiled graph) that the README explains how to read.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: generated Triton kernels run interpreted

import torch  # noqa: E402

from llm_compile.eval.model import load_smollm2  # noqa: E402

PROMPT = "In the beginning God created the heavens and the earth. Summarise this verse in one sentence:"


def generate(model, tok, prompt: str, n: int) -> tuple[str, float, int]:
    msgs = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), len(new) / dt, int(ids.shape[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--options", default="{}", help="JSON dict passed as torch.compile(..., options=...)")
    ap.add_argument("--inner", choices=["inductor", "eager"], default="inductor")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens to generate")
    ap.add_argument("--debug-dir", default="llmaccel_debug", help="where the debug dump goes ('' = none)")
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args(argv)
    options = {"inner": args.inner, **json.loads(args.options)}
    if args.debug_dir:
        options.setdefault("debug_dir", args.debug_dir)

    model, tok = load_smollm2()
    generate(model, tok, args.prompt, 2)  # warm-up, so eager is not charged for first-call work
    text_eager, tps_eager, n_prompt = generate(model, tok, args.prompt, args.tokens)

    model.forward = torch.compile(model.forward, backend="llmaccel", options=options)
    t0 = time.perf_counter()
    generate(model, tok, args.prompt, 3)  # compiles the prefill and decode graphs
    compile_s = time.perf_counter() - t0
    text_llm, tps_llm, _ = generate(model, tok, args.prompt, args.tokens)

    print(f"prompt ({n_prompt} tokens): {args.prompt}")
    print(f"\n[eager]    {text_eager!r}")
    print(f"[llmaccel] {text_llm!r}")
    print(f"\noptions: {json.dumps(options)}")
    print(f"{'':10s} {'tokens/s':>9s}")
    print(f"{'eager':10s} {tps_eager:9.2f}")
    print(f"{'llmaccel':10s} {tps_llm:9.2f}   (compile + first 3 tokens: {compile_s:.1f} s)")
    print(f"same text: {text_eager == text_llm}")
    if args.debug_dir:
        print(f"debug dump: {os.path.join(os.path.abspath(args.debug_dir), 'latest')} (this run's folder; see README, 'Reading a debug dump')")


if __name__ == "__main__":
    main()
