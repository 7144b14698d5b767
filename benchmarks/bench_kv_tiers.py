"""Tiered KV (kv_tiers, ALISA's system level) at a fixed device budget for the KV: the largest batch
that fits and its decode tokens/s, one run, table + JSON + PNG.

Configs (same model, same context, same run):

  (a) dense_device   dense attention, all KV on the device (``kv_store``): the batch is limited by
                     the budget (largest batch whose KV at the final length fits it)
  (b) host_all       dense attention with every row outside the last ``recent`` tokens on the host,
                     all of it fetched every step (FlexGen-like; ``kv_tiers`` p1 = recent + 1, alpha 1)
  (c) swa_tiers      SWA (``--sparsity``, default 0.8) with the three-phase plan (``kv_tiers``,
                     device budget ``--budget-mib``): the largest batch whose plan is valid and whose
                     host rows fit ``--host-mib``
  (d) hf_offloaded   HF ``DynamicCache(offloading=True)`` (OffloadedCache) under stock
                     ``backend="inductor"``, where it runs (it needs CUDA streams)

(b) and (d) run at (c)'s batch. Targets: batch(c) >= 4 x batch(a); tokens/s(c) >= 1.5 x tokens/s(b).
``--sweep`` also runs every config at each smaller batch of ``--batches`` (the plot's curves).

    python benchmarks/bench_kv_tiers.py                                   # SmolLM2 shapes, 8k, CPU
    python benchmarks/bench_kv_tiers.py --context 512 --layers 2 --budget-mib 1 --batches 1,2,4,8
    python benchmarks/bench_kv_tiers.py --model llama7b --budget-mib 8192  # CUDA, fp16, random weights

Random weights (structure and speed only). The KV budget is enforced by the plan (device rows per
layer never exceed it) and, for (a), analytically; on CPU "device" and "host" are both RAM, so (b)
and (c) measure the cost of fetching by index, not of a PCIe link.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

MODELS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, layers=30),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    head_dim=128, vocab_size=32000, layers=32),
}


def build_model(name: str, layers: int | None, device, dtype):
    import transformers

    spec = dict(MODELS[name])
    n = layers or spec.pop("layers")
    spec.pop("layers", None)
    cfg = transformers.LlamaConfig(num_hidden_layers=n, max_position_embeddings=65536, **spec)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def kv_bytes_per_seq(model, tokens: int, dtype) -> int:
    c = model.config
    return (c.num_hidden_layers * c.num_key_value_heads * 2 * c.head_dim
            * torch.empty(0, dtype=dtype).element_size() * tokens)


def decode(model, batch: int, args, options: dict | None, backend: str = "llmaccel", hf_cache=None) -> dict:
    """Prefill ``--context`` tokens, then ``--warmup`` + ``--steps`` greedy steps; steps timed."""
    from transformers import DynamicCache

    torch._dynamo.reset()
    kw = {"options": options} if backend == "llmaccel" else {}
    fwd = torch.compile(model.forward, backend=backend, **kw)
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, args.context), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))
    cache = hf_cache() if hf_cache else DynamicCache()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        # logits of the last position only: all of them would be [B, context, vocab] (6 GiB for
        # 4 x 8k x 49152 fp32) and an lm_head over every position, neither of them part of decode
        out = fwd(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - t0
        print(f"[bench_kv_tiers]   prefill {prefill:.1f} s (incl. compile)", file=sys.stderr, flush=True)
        tok, times = out.logits[:, -1:].argmax(-1), []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            tok = fwd(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    res = {"batch": batch, "prefill_s": prefill, "step_ms_median": med * 1e3, "tokens_per_s": batch / med}
    kv = getattr(cache.layers[0].keys, "llmaccel_kv", None) if cache.layers else None
    if kv is not None and hasattr(kv, "plan"):
        res.update(device_tokens_per_layer=kv.device_tokens(), host_tokens_per_layer=kv.host_tokens(),
                   host_rows_fetched_layer0=kv.host_fetched, spilled_layer0=kv.spilled,
                   plan={k: kv.plan.as_dict()[k] for k in ("p1", "p2", "alpha", "beta", "cap", "host",
                                                             "predicted_step_s", "reasons")})
    return res


def tiers_opts(args, **kw) -> dict:
    return {"device_budget": args.budget_mib << 20, "max_context": args.context + args.warmup + args.steps + 1,
            "recent": args.recent, **({"mmap_dir": args.mmap_dir} if args.mmap_dir else {}), **kw}


def swa_batch_fits(model, batch: int, args, dtype) -> tuple[bool, str]:
    """Whether (c) fits at ``batch``: its plan is valid (device rows hold more than the recent
    window) and the rows it leaves on the host fit ``--host-mib``."""
    c = model.config
    n = args.context + args.warmup + args.steps + 1
    row = batch * c.num_key_value_heads * 2 * c.head_dim * torch.empty(0, dtype=dtype).element_size()
    cap = (args.budget_mib << 20) // (c.num_hidden_layers * row)
    if cap <= args.recent:
        return False, f"device budget holds {cap} tokens per layer <= recent {args.recent}"
    host = max(0, n - cap) * row * c.num_hidden_layers
    if host > args.host_mib << 20 and not args.mmap_dir:
        return False, f"host rows {host >> 20} MiB > --host-mib {args.host_mib}"
    return True, f"{cap} device tokens per layer, {host >> 20} MiB on the host"


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results["configs"].items():
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in runs if "tokens_per_s" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{results['model']} ({results['layers']} layers), context {results['context']}, "
                 f"KV device budget {results['budget_mib']} MiB", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--layers", type=int, default=None, help="default: the model's")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-mib", type=int, default=512, help="KV bytes kept on the device (all layers)")
    ap.add_argument("--host-mib", type=int, default=8192, help="(c) without --mmap-dir: host RAM for KV")
    ap.add_argument("--mmap-dir", default=None, help="host tier as memory-mapped files here (CPU)")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="every config at every batch up to its largest")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--json", default="benchmarks/kv_tiers.json")
    ap.add_argument("--png", default="benchmarks/kv_tiers.png")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = build_model(args.model, args.layers, dev, dtype)
    batches = sorted(int(b) for b in args.batches.split(","))
    n_final = args.context + args.warmup + args.steps + 1
    per_seq = kv_bytes_per_seq(model, n_final, dtype)
    fit_a = [b for b in batches if b * per_seq <= args.budget_mib << 20]
    fit_c = [b for b in batches if swa_batch_fits(model, b, args, dtype)[0]]
    cost_dir = tempfile.mkdtemp(prefix="kv-tiers-cost-")
    base = {"inner": args.inner}
    configs = {
        "dense_device": (dict(base, kv_store=True), fit_a),
        "host_all": (dict(base, kv_tiers=tiers_opts(args, p1=args.recent + 1, alpha=1.0, cost_cache_dir=cost_dir)),
                     fit_c),
        "swa_tiers": (dict(base, swa={"sparsity": args.sparsity},
                           kv_tiers=tiers_opts(args, cost_cache_dir=cost_dir)), fit_c),
    }
    results = {"model": args.model, "layers": model.config.num_hidden_layers, "context": args.context,
               "steps": args.steps, "device": str(dev), "dtype": str(dtype), "budget_mib": args.budget_mib,
               "machine": platform.node(), "threads": torch.get_num_threads(), "kv_mib_per_seq": per_seq / 2**20,
               "fits": {"dense_device": fit_a, "swa_tiers": fit_c,
                        "why": {b: swa_batch_fits(model, b, args, dtype)[1] for b in batches}},
               "configs": {}, "partial": True}
    largest_c = fit_c[-1] if fit_c else None
    for name, (opts, fits) in configs.items():
        runs = results["configs"].setdefault(name, [])
        if not fits:
            runs.append({"error": "no batch of --batches fits the budget"})
            continue
        top = fits[-1] if name != "host_all" else largest_c
        todo = [b for b in fits if b <= top] if args.sweep else [top]
        for b in todo:
            print(f"[bench_kv_tiers] {name} batch {b} ...", file=sys.stderr, flush=True)
            try:
                runs.append({"largest": b == top, **decode(model, b, args, opts)})
            except Exception as e:  # noqa: BLE001  (a config that fails is a row, not a crash)
                runs.append({"batch": b, "error": f"{type(e).__name__}: {e}"[:400]})
            print(f"[bench_kv_tiers]   -> {runs[-1].get('tokens_per_s', runs[-1].get('error'))}",
                  file=sys.stderr, flush=True)
    if largest_c:
        from transformers import DynamicCache

        print(f"[bench_kv_tiers] hf_offloaded batch {largest_c} ...", file=sys.stderr, flush=True)
        try:
            r = decode(model, largest_c, args, None, backend="inductor",
                       hf_cache=lambda: DynamicCache(config=model.config, offloading=True))
        except Exception as e:  # noqa: BLE001
            r = {"batch": largest_c, "error": f"{type(e).__name__}: {e}"[:400]}
        results["configs"]["hf_offloaded"] = [{"largest": True, **r}]
    results["partial"] = False
    summarize(results)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, default=str)
    plot(results, args.png)
    print(f"wrote {args.json} and {args.png}")
    return results


def _largest(results, name):
    runs = [r for r in results["configs"].get(name, []) if r.get("largest") and "tokens_per_s" in r]
    return runs[0] if runs else None


def summarize(results: dict) -> None:
    print(f"\n{results['model']} x{results['layers']} layers, context {results['context']}, KV device budget "
          f"{results['budget_mib']} MiB, {results['device']} {results['dtype']} ({results['kv_mib_per_seq']:.0f} "
          "MiB KV per sequence)")
    print(f"{'config':14s} {'batch':>5s} {'tok/s':>9s} {'step ms':>9s} {'dev tok/layer':>13s} {'host tok/layer':>14s}")
    for name, runs in results["configs"].items():
        for r in runs:
            if "tokens_per_s" in r:
                print(f"{name:14s} {r['batch']:5d} {r['tokens_per_s']:9.2f} {r['step_ms_median']:9.1f} "
                      f"{r.get('device_tokens_per_layer', '-')!s:>13s} {r.get('host_tokens_per_layer', '-')!s:>14s}")
            else:
                print(f"{name:14s} {r.get('batch', '-')!s:>5s}  {r.get('error')}")
    a, b, c = (_largest(results, n) for n in ("dense_device", "host_all", "swa_tiers"))
    t = {}
    if a and c:
        t["batch_c_over_a"] = c["batch"] / a["batch"]
    if b and c:
        t["tok_s_c_over_b"] = c["tokens_per_s"] / b["tokens_per_s"]
    results["targets"] = {**t, "goal": "batch_c_over_a >= 4, tok_s_c_over_b >= 1.5"}
    print("targets:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results["targets"].items()})
    if c and "plan" in c:
        p = c["plan"]
        print(f"plan (c): p1={p['p1']} p2={p['p2']} alpha={p['alpha']:.3f} beta={p['beta']} "
              f"predicted step {p['predicted_step_s'] * 1e3:.1f} ms; beta: {p['reasons']['beta']}")


if __name__ == "__main__":
    main()
