"""Short prompts (``bench_swa.py --short-contexts``): decode speed of llmaccel ``{}``, SWA and SWA
with ``min_context`` against stock Inductor with HF's caches, per context, interleaved rounds."""
from __future__ import annotations

import torch

from decode_harness import Decoder, _median, smollm2_config


STOCK = {"inductor_dynamic": "dynamic", "inductor_static": "static"}
"""Stock ``backend="inductor"`` rows: HF ``DynamicCache`` and HF ``StaticCache``."""


def short_bench(args) -> dict:
    """Short prompts (``--short-contexts``, batch ``--short-batch``): per context, decode ms/step of
    llmaccel dense (``{}``: stock Inductor), SWA (``--sparsity``, kv_store on), SWA with
    ``swa.min_context`` = ``--min-context`` (dense below it), and stock ``backend="inductor"`` with
    HF's DynamicCache and StaticCache (``--static-len``). Each config is compiled once for all
    contexts; per context every config prefills its own cache, then ``--short-repeats`` rounds of
    ``--steps`` steps run interleaved (median of the rounds' medians, with the range)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_config(args.layers)
    model = LlamaForCausalLM(cfg).eval()
    swa_opts = {"sparsity": args.sparsity, "bucket": args.bucket, "policy": args.policy}
    configs = {"llmaccel_dense": ("llmaccel", {"inner": args.inner}, "dynamic"),
               "swa": ("llmaccel", {"inner": args.inner, "swa": dict(swa_opts)}, "llmaccel"),
               f"swa_min{args.min_context}": ("llmaccel", {"inner": args.inner,
                                                           "swa": dict(swa_opts, min_context=args.min_context)},
                                              "llmaccel")}
    if not args.no_stock:
        configs.update({name: ("inductor", None, cache) for name, cache in STOCK.items()})
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(configs))
    fwds = {name: torch.compile(model.forward, backend=b, **({"options": o} if b == "llmaccel" else {}))
            for name, (b, o, _) in configs.items()}
    rows = []
    for ctx in args.short_contexts:
        ids = torch.randint(0, cfg.vocab_size, (args.short_batch, ctx), generator=torch.Generator().manual_seed(ctx))
        max_len = max(args.static_len, ctx + args.warmup + args.steps * args.short_repeats + 8)
        dec = {}
        for name, (backend, opts, cache) in configs.items():
            dec[name] = Decoder(model, ids, backend, opts, cache, max_len, fwd=fwds[name])
            for _ in range(args.warmup):
                dec[name].step()
        ms = {name: [] for name in configs}
        for r in range(args.short_repeats):
            names = list(configs)
            for name in names[r % len(names):] + names[: r % len(names)]:
                ms[name].append(dec[name].block(args.steps) * 1e3)
        row = {"context": ctx, "batch": args.short_batch,
               "ms_per_step": {n: _median(v) for n, v in ms.items()},
               "spread": {n: [min(v), max(v)] for n, v in ms.items()}}
        rows.append(row)
        print(f"context {ctx:5d}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in row["ms_per_step"].items()), flush=True)
    return {"layers": args.layers, "threads": torch.get_num_threads(), "inner": args.inner,
            "steps": args.steps, "repeats": args.short_repeats, "static_len": args.static_len, "rows": rows}


def print_short(s: dict) -> None:
    names = list(s["rows"][0]["ms_per_step"])
    mc = [n for n in names if n.startswith("swa_min")][0]
    stock = "inductor_dynamic" if "inductor_dynamic" in names else None
    print(f"\nShort prompts: decode ms/step (median of {s['repeats']} interleaved rounds of "
          f"{s['steps']} steps [range]), SmolLM2 shapes x{s['layers']} layers, {s['threads']} threads, "
          f"llmaccel inner={s['inner']}")
    extra = ["swa vs dense", f"{mc} vs dense"] + ([f"{n} vs stock DynamicCache" for n in ("llmaccel_dense", mc)]
                                                  if stock else [])
    print("| context | " + " | ".join(names) + " | " + " | ".join(extra) + " |")
    print("|---:|" + "---:|" * (len(names) + len(extra)))
    for r in s["rows"]:
        t = r["ms_per_step"]
        cells = [f"{t['llmaccel_dense'] / t['swa']:.2f}x", f"{t['llmaccel_dense'] / t[mc]:.2f}x"]
        if stock:
            cells += [f"{t[stock] / t[n]:.2f}x" for n in ("llmaccel_dense", mc)]
        print(f"| {r['context']} | " + " | ".join(f"{t[n]:.1f} [{r['spread'][n][0]:.1f}-{r['spread'][n][1]:.1f}]"
                                                 for n in names) + " | " + " | ".join(cells) + " |")
