"""Quickstart: SmolLM2-135M-Instruct through torch.compile(backend="llmaccel"), end to end on CPU.

    python examples/quickstart.py                  # 2 x 4096-token prompts: eager vs kv_store vs SWA (a few min)
    python examples/quickstart.py --configs swa --batch 1 --context 1024
    python examples/quickstart.py --options '{"swa": {"sparsity": 0.9}}'     # your own options
    python examples/quickstart.py --chat "Summarise Genesis 1:1 in one sentence." --configs kv_store
    python examples/quickstart.py --inner inductor --debug-dir llmaccel_debug

What it shows: the uncompiled model (Hugging Face ``DynamicCache``) against the same model
compiled with ``backend="llmaccel"``, on long prompts (windows of the evaluation split of the
bundled text), where the backend pays:

* ``kv_store`` (``{"kv_store": true}``): exact (same tokens as eager); each decode step appends the
  new K/V in place instead of copying the whole cache (HF's ``DynamicCache`` does
  ``torch.cat([past, new])`` in every layer at every step).
* ``swa`` (``{"swa": {"sparsity": 0.8}}``, with the in-place store): each decode step attends to
  a fifth of the cache; approximate (greedy tokens may part ways after a while).

It prints compile time apart from speed (prefill tokens/s and decode tokens/s, each timed on its own
after the compile), and how many generated tokens agree with the uncompiled model.

``--inner inductor`` (the default, as in the backend) compiles the rewritten graph with Inductor:
a few minutes per config the first time on 2 cores, much less on later runs (Inductor's cache).
``--inner eager`` runs the rewritten graph op by op in Python: compiles faster, but its per-op
Python cost (~25 ms per decode step on this model) eats what the passes save, so it is slower
than the uncompiled model. The model loads offline (the first run converts the GGUF file, ~30 s).
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
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        return ids.expand(args.batch, -1)
    from llm_compile.eval.data import load_tokens

    # one window of the evaluation split per sequence (distinct texts, equal lengths: no padding)
    return torch.cat([load_tokens(tok, "evaluation", args.context, offset=i * args.context)
                      for i in range(args.batch)])


PRESETS = {"kv_store": {"kv_store": True}, "swa": {"swa": {"sparsity": 0.8}}}


class StepClock:
    """A logits processor that only notes the time: ``generate`` calls it once after each forward
    (the first after the prefill), so one run gives prefill and decode time apart."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float, StepClock]:
    clock = StepClock()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, logits_processor=[clock])
        return out[:, ids.shape[1]:], clock.times[0] - t0, clock


def measure(model, ids: torch.Tensor, n: int) -> dict:
    """One greedy run of ``n + 1`` new tokens: prefill (up to the first token) and the ``n``
    decode steps after it, timed apart (after any compile)."""
    new, prefill, clock = timed_generate(model, ids, n + 1)
    decode = clock.times[-1] - clock.times[0]
    return {"new": new, "prefill_tok_s": ids.numel() / prefill, "prefill_s": prefill,
            "decode_tok_s": n * ids.shape[0] / decode}


def agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """Greedy tokens equal before the first difference, summed over the sequences."""
    return int((a == b).long().cumprod(1).sum())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="kv_store,swa",
                    help=f"comma-separated presets compiled one after the other: {', '.join(PRESETS)}")
    ap.add_argument("--options", default=None,
                    help="JSON dict passed as torch.compile(..., options=...) (instead of --configs)")
    ap.add_argument("--inner", choices=["inductor", "eager"], default="inductor")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens per sequence (evaluation split)")
    ap.add_argument("--batch", type=int, default=2, help="sequences decoded together")
    ap.add_argument("--chat", default=None, help="a chat prompt instead of the long evaluation text")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens to generate (decode speed)")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--debug-dir", default="", help="write a debug dump here (see README)")
    args = ap.parse_args(argv)
    if args.options is not None:
        configs = {"options": json.loads(args.options)}
    else:
        unknown = [c for c in args.configs.split(",") if c not in PRESETS]
        if unknown:
            ap.error(f"unknown --configs {unknown}; choose from {list(PRESETS)} or pass --options")
        configs = {c: PRESETS[c] for c in args.configs.split(",")}
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    ids = prompt_ids(tok, args)
    timed_generate(model, ids[:, :16], 2)  # warm-up, so eager is not charged for first-call work
    rows = {"eager": measure(model, ids, args.tokens)}
    eager_forward, compile_s = model.forward, {}
    for name, opts in configs.items():
        options = {"inner": args.inner, **opts}
        if args.debug_dir:
            options.setdefault("debug_dir", os.path.join(args.debug_dir, name))
        torch._dynamo.reset()
        model.forward = torch.compile(eager_forward, backend="llmaccel", options=options)
        t0 = time.perf_counter()
        timed_generate(model, ids, 3)  # compiles prefill and decode graphs (static, dynamic)
        compile_s[name] = time.perf_counter() - t0 - rows["eager"]["prefill_s"]  # minus running them
        rows[name] = measure(model, ids, args.tokens)
        configs[name] = options
    model.forward = eager_forward

    eager = rows["eager"]
    print(f"\nSmolLM2-135M-Instruct, {ids.shape[0]} x {ids.shape[1]}-token prompt(s), {args.tokens} "
          f"greedy new tokens each, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'':10s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode vs eager':>16s} "
          f"{'compile s':>10s} {'tokens = eager':>15s}  options")
    for name, r in rows.items():
        agree = agreement(eager["new"], r["new"])
        comp = f"{compile_s[name]:10.1f}" if name in compile_s else f"{'-':>10s}"
        print(f"{name:10s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.2f} "
              f"{r['decode_tok_s'] / eager['decode_tok_s']:15.2f}x {comp} "
              f"{agree:>7d} of {eager['new'].numel():<4d}  {json.dumps(configs.get(name, {}))}")
    print("(compile: one-time, not in the speeds; tokens = eager: greedy tokens equal to the uncompiled "
          "model's before the first difference, summed over the sequences)")
    for name, r in rows.items():
        print(f"{name + ':':10s} {tok.decode(r['new'][0, :20], skip_special_tokens=True)!r}")
    if args.debug_dir:
        print(f"debug dumps: {os.path.abspath(args.debug_dir)}/<config>/latest (see README, 'Reading a debug dump')")


if __name__ == "__main__":
    main()
