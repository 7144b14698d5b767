"""Sparse window attention (ALISA) vs dense: decode speed and KV bytes read, one run, table + JSON.

CPU (always): a random-weight Llama with SmolLM2-135M shapes (30 layers, hidden 576, 9 heads,
3 KV heads, head dim 64), batch 4, prompt of ``--context`` tokens, then ``--steps`` greedy decode
steps timed one by one (the first ``--warmup`` steps, which compile, are not timed). Compiled
models in the same run: llmaccel dense (canonical attention) and llmaccel SWA (``--sparsity``),
each with the KV cache in the in-place store (``kv_store``) and in HF's ``DynamicCache``
(``--cache both``, the default). KV bytes read per step: dense reads every cached K/V row of every
layer; SWA reads the kept rows (the budget of the step); KV bytes written per step: HF's append
rewrites the whole cache (``torch.cat``), the store writes the new row — all analytic from the
shapes, the SWA budget taken from the state.

GPU (when available): one decode attention call at ``--gpu-context`` tokens (default 32k), fp16,
batch 4: dense SDPA over the whole cache vs the SWA Triton kernel over the bucketed budget (and
the torch gather path), plus the cost of the token selection (top-k over the scores).

    python benchmarks/bench_swa.py                       # CPU, context 1024 (a few minutes)
    python benchmarks/bench_swa.py --context 8192 --steps 24   # the full 8k (slow on CPU)
    python benchmarks/bench_swa.py --layers 4 --context 512    # quick look

Also (CPU, always, seconds): one attention site's decode at ``--op-context`` (default 8192).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from llm_compile.config import POLICY_DEFAULTS, SWAConfig
from llm_compile.runtime import swa
from llm_compile.runtime.swa.state import SWAState, compute_budget


def smollm2_config(layers: int):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=65536,
        rope_theta=100000.0, tie_word_embeddings=True)


def _top_ops(prof, steps: int, n: int = 6) -> list[dict]:
    """The ``n`` ATen ops with the most self CPU time, in ms per decode step."""
    ev = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls": e.count}
            for e in ev]


def _decode_run(model, ids, steps: int, warmup: int, options: dict | None, profile: int = 0,
                backend: str = "llmaccel", hf_cache: str = "dynamic") -> dict:
    """Prefill + ``steps`` greedy decode steps through a compiled forward; per-step times; with
    ``profile`` > 0, that many more steps under ``torch.profiler`` (top ops per step).
    ``backend="inductor"`` (stock, ``options`` unused) with ``hf_cache`` ``"dynamic"``
    (``DynamicCache``) or ``"static"`` (``StaticCache`` sized for the run) is the baseline a user
    would pick instead of llmaccel."""
    from transformers import DynamicCache, StaticCache

    torch._dynamo.reset()
    kw = {"options": options} if backend == "llmaccel" else {}
    fwd = torch.compile(model.forward, backend=backend, **kw)
    times = []
    L = ids.shape[1]
    with torch.no_grad():
        if hf_cache == "static":
            cache = StaticCache(config=model.config, max_cache_len=L + steps + warmup + profile + 1)
        else:
            cache = DynamicCache()
        t0 = time.perf_counter()
        out = fwd(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(L))
        prefill_s = time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            out = fwd(input_ids=tok, past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([L + i]))
            tok = out.logits[:, -1:].argmax(-1)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        top = None
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for j in range(profile):
                    tok = fwd(input_ids=tok, past_key_values=cache, use_cache=True,
                              cache_position=torch.tensor([L + steps + warmup + j])).logits[:, -1:].argmax(-1)
            top = _top_ops(prof, profile)
    med = sorted(times)[len(times) // 2]
    states = [st for st in map(_layer_state, cache.layers) if st is not None]  # owned by the cache
    budgets = [st.last_budget for st in states if st is not None and st.last_budget is not None]
    res = {"prefill_s": prefill_s, "step_ms_median": med * 1e3, "tokens_per_s": ids.shape[0] / med,
           "budget": budgets[0] if budgets else None, "sites_with_state": len(states),
           "final_n": ids.shape[1] + steps + warmup, "top_ops": top}
    return res


def _layer_state(layer):
    """The SWA state a cache layer carries (on the in-place store's phantom, or on the K tensor)."""
    kv = getattr(layer.keys, "llmaccel_kv", None)
    if kv is not None:
        return kv.state
    holder = getattr(layer.keys, "llmaccel_state", None)
    return None if holder is None else holder.state


CACHES = {"store": {"kv_store": True}, "hf": {"kv_store": False}}
"""Where the KV cache lives: the in-place store (``kv_store``) or HF's ``DynamicCache`` (whose
append is a ``torch.cat`` of the whole cache every step)."""


def cpu_bench(args) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_config(args.layers)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context))
    caches = list(CACHES) if args.cache == "both" else [args.cache]
    runs = {}
    for cache in caches:
        base = dict(CACHES[cache], inner=args.inner)
        runs[f"dense_{cache}"] = _decode_run(model, ids, args.steps, args.warmup, dict(base), args.profile)
        runs[f"swa_{cache}"] = _decode_run(
            model, ids, args.steps, args.warmup,
            dict(base, swa={"sparsity": args.sparsity, "bucket": args.bucket, "policy": args.policy}), args.profile)
    if not args.no_stock:  # what a user would pick instead: stock Inductor, HF's caches
        for name, hf in STOCK.items():
            runs[name] = _decode_run(model, ids, args.steps, args.warmup, None, args.profile,
                                     backend="inductor", hf_cache=hf)
    n = runs[f"swa_{caches[0]}"]["final_n"]
    b = compute_budget(n, SWAConfig(sparsity=args.sparsity, bucket=args.bucket, policy=args.policy))
    row_bytes = 2 * cfg.num_key_value_heads * 64 * 4 * args.batch * args.layers  # K+V, fp32
    res = {"device": "cpu", "threads": torch.get_num_threads(), "layers": args.layers,
           "batch": args.batch, "context": args.context, "steps": args.steps, "inner": args.inner,
           "sparsity": args.sparsity, "policy": args.policy, "final_n": n, "budget": b.describe(),
           "runs": {k: {k2: v2 for k2, v2 in r.items() if k2 != "budget"} for k, r in runs.items()},
           "kv_bytes_read_per_step": {"dense": n * row_bytes, "swa_kept": b.total * row_bytes,
                                      "swa_reads_incl_summaries": b.reads * row_bytes,
                                      "swa_padded": b.padded * row_bytes},
           "kv_bytes_written_per_step": {"hf": n * row_bytes, "store": row_bytes},
           "speedup": {c: runs[f"dense_{c}"]["step_ms_median"] / runs[f"swa_{c}"]["step_ms_median"]
                       for c in caches}}
    if "store" in caches and "hf" in caches:
        res["speedup_swa_store_vs_dense_hf"] = (runs["dense_hf"]["step_ms_median"]
                                                / runs["swa_store"]["step_ms_median"])
    budget = next((r["budget"] for r in runs.values() if r["budget"] is not None), None)
    if budget is not None:
        res["swa_state_budget"] = budget.describe()
    return res


STOCK = {"inductor_dynamic": "dynamic", "inductor_static": "static"}
"""Stock ``backend="inductor"`` rows: HF ``DynamicCache`` and HF ``StaticCache``."""


def short_bench(args) -> dict:
    """Short prompts (``--short-contexts``, batch ``--short-batch``): per context, decode ms/step of
    llmaccel dense (``{}``), SWA (``--sparsity``, kv_store on), SWA with ``swa.min_context`` =
    ``--min-context`` (dense below it), and stock ``backend="inductor"`` with HF's DynamicCache and
    StaticCache — all in this run, interleaved over ``--short-repeats`` repeats (median)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_config(args.layers)
    model = LlamaForCausalLM(cfg).eval()
    swa_opts = {"sparsity": args.sparsity, "bucket": args.bucket, "policy": args.policy}
    configs = {"llmaccel_dense": ("llmaccel", {"inner": args.inner}, "dynamic"),
               "swa": ("llmaccel", {"inner": args.inner, "swa": dict(swa_opts)}, "dynamic"),
               f"swa_min{args.min_context}": ("llmaccel", {"inner": args.inner,
                                                           "swa": dict(swa_opts, min_context=args.min_context)},
                                              "dynamic")}
    if not args.no_stock:
        configs.update({name: ("inductor", None, cache) for name, cache in STOCK.items()})
    rows = []
    for ctx in args.short_contexts:
        ids = torch.randint(0, cfg.vocab_size, (args.short_batch, ctx), generator=torch.Generator().manual_seed(ctx))
        ms = {name: [] for name in configs}
        for _ in range(args.short_repeats):
            for name, (backend, opts, cache) in configs.items():
                r = _decode_run(model, ids, args.steps, args.warmup, opts, 0, backend=backend, hf_cache=cache)
                ms[name].append(r["step_ms_median"])
        row = {"context": ctx, "batch": args.short_batch,
               "ms_per_step": {n: sorted(v)[len(v) // 2] for n, v in ms.items()},
               "spread": {n: [min(v), max(v)] for n, v in ms.items()}}
        rows.append(row)
        print(f"context {ctx:5d}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in row["ms_per_step"].items()), flush=True)
    return {"layers": args.layers, "threads": torch.get_num_threads(), "inner": args.inner,
            "steps": args.steps, "repeats": args.short_repeats, "rows": rows}


def print_short(s: dict) -> None:
    names = list(s["rows"][0]["ms_per_step"])
    print(f"\nShort prompts: decode ms/step (median of {s['repeats']} interleaved repeats of the "
          f"median of {s['steps']} steps), SmolLM2 shapes x{s['layers']} layers, {s['threads']} threads, "
          f"llmaccel inner={s['inner']}")
    print("| context | " + " | ".join(names) + " | swa vs dense | swa+min_context vs dense |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for r in s["rows"]:
        t = r["ms_per_step"]
        mc = [n for n in names if n.startswith("swa_min")][0]
        print(f"| {r['context']} | " + " | ".join(f"{t[n]:.1f} [{r['spread'][n][0]:.1f}-{r['spread'][n][1]:.1f}]"
                                                 for n in names)
              + f" | {t['llmaccel_dense'] / t['swa']:.2f}x | {t['llmaccel_dense'] / t[mc]:.2f}x |")


def print_cpu(c: dict) -> None:
    print(f"\nCPU decode, SmolLM2 shapes x{c['layers']} layers, batch {c['batch']}, context "
          f"{c['context']} -> {c['final_n']} ({c['threads']} threads, inner={c['inner']})")
    print(f"SWA budget at the last step: {c['budget']}")
    rd, wr = c["kv_bytes_read_per_step"], c["kv_bytes_written_per_step"]
    print(f"{'attention':10}{'KV cache':10}{'ms/step':>10}{'tokens/s':>10}{'KV MB read':>12}{'KV MB written':>15}")
    for name, r in c["runs"].items():
        att, cache = name.split("_")
        read = rd["swa_padded"] if att == "swa" else rd["dense"]
        written = wr[{"dynamic": "hf", "static": "store"}.get(cache, cache)]  # StaticCache: index_copy of the new row
        print(f"{att:10}{cache:10}{r['step_ms_median']:10.1f}{r['tokens_per_s']:10.2f}"
              f"{read / 1e6:12.1f}{written / 1e6:15.2f}")
    for name in STOCK:
        if name in c["runs"] and "swa_store" in c["runs"]:
            print(f"speedup SWA + store vs stock {name}: "
                  f"{c['runs'][name]['step_ms_median'] / c['runs']['swa_store']['step_ms_median']:.2f}x")
    for cache, sp in c["speedup"].items():
        print(f"speedup SWA vs dense, both with the {cache} cache: {sp:.2f}x")
    if "speedup_swa_store_vs_dense_hf" in c:
        print(f"speedup SWA + store vs dense + HF cache: {c['speedup_swa_store_vs_dense_hf']:.2f}x")
    for name, r in c["runs"].items():
        for t in r["top_ops"] or []:
            print(f"  {name:10} {t['op']:48} {t['ms_per_step']:8.1f} ms/step ({t['calls']} calls)")


def cpu_op_bench(args) -> dict:
    """One attention site, decode only, at ``--op-context`` tokens (no prefill needed): dense
    ``llmaccel::attention`` math (cache concat + SDPA) vs ``swa_step`` (trim, select, gather,
    attend, score update; cache not concatenated). The SWA state starts with random scores."""
    B, Hq, Hkv, D, n0, steps = args.batch, 9, 3, 64, args.op_context, args.steps
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(B, Hkv, n0 + steps, D, generator=g), torch.randn(B, Hkv, n0 + steps, D, generator=g)
    qs = torch.randn(steps, B, Hq, 1, D, generator=g)
    cfg = SWAConfig(sparsity=args.sparsity, bucket=args.bucket, kernel="torch", policy=args.policy)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    st.grow(n0)
    st.score[:] = torch.randint(0, 1 << 30, (B, 1, n0), generator=g)
    times = {"dense": [], "swa": []}
    for i in range(steps):
        n = n0 + i
        t0 = time.perf_counter()
        kf, vf = torch.cat([kc[:, :, :n], kc[:, :, n:n + 1]], 2), torch.cat([vc[:, :, :n], vc[:, :, n:n + 1]], 2)
        torch.nn.functional.scaled_dot_product_attention(qs[i], kf, vf, scale=D ** -0.5, enable_gqa=True)
        times["dense"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        swa.swa_step(st, qs[i], kc[:, :, :n], vc[:, :, :n], D ** -0.5, cfg,
                     k_new=kc[:, :, n:n + 1], v_new=vc[:, :, n:n + 1])
        times["swa"].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    b = compute_budget(n0 + steps, cfg)
    row = 2 * Hkv * D * 4 * B
    return {"context": n0, "batch": B, "policy": args.policy, "budget": b.describe(), "dense_ms": med["dense"],
            "swa_ms": med["swa"], "speedup": med["dense"] / med["swa"],
            "kv_bytes": {"dense": n0 * row, "swa_padded": b.padded * row}}


def _cuda_ms(fn, reps=50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"))


def gpu_bench(args) -> dict:
    from llm_compile.codegen.swa_kernels import swa_decode_attention

    dev, dt, B, Hq, Hkv, D, n = "cuda", torch.float16, args.batch, 9, 3, 64, args.gpu_context
    torch.manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, n, D, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, n, D, device=dev, dtype=dt)
    cfg = SWAConfig(sparsity=args.sparsity, bucket=args.bucket)
    b = compute_budget(n, cfg)
    st = SWAState(B, 1, dev)
    st.grow(n)
    st.score[:] = torch.randint(0, 1 << 30, (B, 1, n), device=dev)
    idx = st.select(b)
    bias = torch.zeros(B, 1, b.padded, device=dev)
    bias[..., b.total:] = float("-inf")
    scale = D ** -0.5
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, scale=scale, enable_gqa=True)
    tri = lambda: swa_decode_attention(q[:, :, 0], k, v, idx, bias, scale)  # noqa: E731
    tor = lambda: swa.gather_attend_torch(q[:, :, 0], k, v, idx, bias, scale)  # noqa: E731
    o_t, w_t = tri()
    o_r, w_r = tor()
    err = float((o_t.float() - o_r.float()).abs().max())
    kv_row = 2 * Hkv * D * 2 * B
    return {"device": torch.cuda.get_device_name(), "context": n, "batch": B, "dtype": "fp16",
            "budget": b.describe(), "dense_sdpa_ms": _cuda_ms(dense), "swa_triton_ms": _cuda_ms(tri),
            "swa_torch_gather_ms": _cuda_ms(tor), "select_topk_ms": _cuda_ms(lambda: st.select(b)),
            "max_abs_err_triton_vs_torch": err,
            "kv_bytes": {"dense": n * kv_row, "swa_padded": b.padded * kv_row}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps (compilation)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--policy", default="alisa", choices=sorted(POLICY_DEFAULTS),
                   help="SWA policy of the swa rows (CPU model and op benchmarks; the GPU kernel "
                        "benchmark times alisa's selection)")
    p.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    p.add_argument("--cache", default="both", choices=["both", "store", "hf"],
                   help="KV cache of the model runs: the in-place store (kv_store), HF DynamicCache, or both")
    p.add_argument("--gpu-context", type=int, default=32768)
    p.add_argument("--op-context", type=int, default=8192, help="context of the one-site CPU op bench")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many extra decode steps per config and print the top ops")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU model benchmark")
    p.add_argument("--short-contexts", type=lambda x: [int(v) for v in x.split(",")], default=None,
                   help="also run the short-prompt rows at these contexts, e.g. 64,128,256,512")
    p.add_argument("--short-batch", type=int, default=1)
    p.add_argument("--short-repeats", type=int, default=3)
    p.add_argument("--min-context", type=int, default=1024, help="swa.min_context of the short rows")
    p.add_argument("--no-stock", action="store_true", help="skip the stock backend='inductor' rows")
    p.add_argument("--json", default="bench_swa.json")
    p.add_argument("--png", default=None, help="bar chart of the step times (needs matplotlib)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"platform": platform.platform(), "torch": torch.__version__}
    o = res["cpu_op"] = cpu_op_bench(args)
    print(f"CPU one attention site, decode, context {o['context']}, batch {o['batch']}: dense "
          f"{o['dense_ms']:.2f} ms, SWA {o['swa_ms']:.2f} ms ({o['speedup']:.2f}x; {o['budget']}); "
          f"KV MB read {o['kv_bytes']['dense'] / 1e6:.1f} -> {o['kv_bytes']['swa_padded'] / 1e6:.1f}")
    if args.short_contexts:
        print_short(res.setdefault("short", short_bench(args)))
    if not args.no_cpu:
        print_cpu(res.setdefault("cpu", cpu_bench(args)))
    if torch.cuda.is_available():
        g = res["gpu"] = gpu_bench(args)
        print(f"\nGPU decode attention, {g['device']}, context {g['context']}, batch {g['batch']}, fp16")
        for key in ("dense_sdpa_ms", "swa_triton_ms", "swa_torch_gather_ms", "select_topk_ms"):
            print(f"{key:22}{g[key]:10.4f} ms")
    else:
        res["gpu"] = "no CUDA device in this run"
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {args.json}")
    if args.png and isinstance(res.get("cpu"), dict):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c = res["cpu"]
        plt.bar(list(c["runs"]), [r["step_ms_median"] for r in c["runs"].values()])
        plt.ylabel("ms / decode step")
        plt.title(f"batch {c['batch']}, context {c['context']}, SWA sparsity {c['sparsity']}")
        plt.savefig(args.png)
    return res


if __name__ == "__main__":
    main()
