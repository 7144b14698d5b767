"""Sparse window attention (ALISA) vs dense: decode speed and KV bytes read, one run, table + JSON.

CPU (always): a random-weight Llama with SmolLM2-135M shapes (30 layers, hidden 576, 9 heads,
3 KV heads, head dim 64), batch 4, prompt of ``--context`` tokens. Every config of ``--configs``
(see :func:`model_configs`: llmaccel dense / SWA with HF ``DynamicCache``, with
``llm_compile.LLMAccelCache`` (in-place KV) and with HF ``StaticCache``; stock
``backend="inductor"`` with ``StaticCache`` / ``DynamicCache``) is compiled and prefilled once,
each with its own cache; then ``--repeats`` rounds of ``--steps`` timed greedy decode steps per
config, interleaved (the order rotates every round), so a noisy moment hits every config. Each
config's time is the median over rounds of the round's median step; each speed ratio is the median
of the per-round ratios, printed with its range. KV bytes read per step: dense reads every cached
K/V row of every layer, SWA the kept rows; written: ``DynamicCache``'s append rewrites the whole
cache (``torch.cat``), the in-place and static caches write the new row — analytic from the shapes.

GPU (when available): one decode attention call at ``--gpu-context`` tokens (default 32k), fp16,
batch 4: dense SDPA over the whole cache vs the SWA Triton kernel over the bucketed budget (and
the torch gather path), plus the cost of the token selection (top-k over the scores).

    python benchmarks/bench_swa.py --threads 1                 # CPU, context 1024 (minutes)
    python benchmarks/bench_swa.py --context 8192 --threads 1  # the issue-12 table (about an hour)
    python benchmarks/bench_swa.py --layers 2 --context 256 --threads 1   # quick look

Also (CPU, always, seconds): one attention site's decode at ``--op-context`` (default 8192);
that and the GPU part live in ``swa_site_bench.py``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from llm_compile.config import POLICY_DEFAULTS, SWAConfig
from llm_compile.runtime.swa.state import compute_budget
from decode_harness import Decoder, _median, smollm2_config  # benchmarks/ (this script's folder)
from swa_short_bench import print_short, short_bench
from swa_site_bench import cpu_op_bench, gpu_bench, policy_bench, print_policy_bench


def _decode_run(model, ids, steps: int, warmup: int, options: dict | None, profile: int = 0,
                backend: str = "llmaccel", hf_cache: str = "dynamic") -> dict:
    """One config alone: prefill + ``warmup`` untimed + ``steps`` timed decode steps (median)."""
    torch._dynamo.reset()
    d = Decoder(model, ids, backend, options, hf_cache, ids.shape[1] + steps + warmup + profile + 1)
    for _ in range(warmup):
        d.step()
    med = d.block(steps)
    top = d.profile(profile) if profile else None
    return {"prefill_s": d.prefill_s, "step_ms_median": med * 1e3, "tokens_per_s": ids.shape[0] / med,
            "budget": _budget_of(d.cache), "final_n": d.L, "top_ops": top}


def _layer_state(layer):
    """The SWA state a cache layer carries (on the in-place store's phantom, or on the K tensor,
    or on a StaticCache layer's ``cumulative_length``)."""
    for t in (getattr(layer, "keys", None), getattr(layer, "cumulative_length", None)):
        kv = getattr(t, "llmaccel_kv", None)
        if kv is not None:
            return kv.state
        holder = getattr(t, "llmaccel_state", None)
        if holder is not None:
            return holder.state
    return None


def _budget_of(cache):
    states = [st for st in map(_layer_state, cache.layers) if st is not None]
    budgets = [st.last_budget for st in states if st.last_budget is not None]
    return budgets[0] if budgets else None


def model_configs(args) -> dict:
    """name -> (backend, options, cache kind) of the 30-layer run (``--configs`` picks them)."""
    inner = {"inner": args.inner}
    mm = dict(inner, decode_matmul=True)
    swa = {"sparsity": args.sparsity, "bucket": args.bucket, "policy": args.policy}
    return {
        "dense_dynamic": ("llmaccel", dict(inner), "dynamic"),
        "dense_llmaccel": ("llmaccel", dict(inner, kv_store=True), "llmaccel"),
        "swa_llmaccel": ("llmaccel", dict(inner, swa=dict(swa)), "llmaccel"),
        "recall_llmaccel": ("llmaccel", dict(inner, swa=dict(swa, policy="recall")), "llmaccel"),
        "dense_llmaccel_mm": ("llmaccel", dict(mm, kv_store=True), "llmaccel"),
        "swa_llmaccel_mm": ("llmaccel", dict(mm, swa=dict(swa)), "llmaccel"),
        "swa_dynamic": ("llmaccel", dict(inner, swa=dict(swa), kv_store=False), "dynamic"),
        "dense_static": ("llmaccel", dict(inner), "static"),
        "swa_static": ("llmaccel", dict(inner, swa=dict(swa)), "static"),
        "inductor_static": ("inductor", None, "static"),
        "inductor_dynamic": ("inductor", None, "dynamic"),
    }


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return 1 << 62


def _check_memory(names, table, cfg, args, max_len: int) -> None:
    """Every config keeps its cache alive for the interleaved rounds: refuse up front (instead of
    being OOM-killed an hour in) when their KV, plus the largest prefill transient, exceeds 80 %
    of the available memory. Stock Inductor over a StaticCache builds a [B, 1, context, max_len]
    fp32 mask and attends over all max_len rows at prefill."""
    row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 64 * 4 * args.batch  # K+V, fp32
    rows = {"dynamic": args.context, "llmaccel": int(args.context * 1.5), "static": max_len}
    kv = sum(rows[table[n][2]] * row for n in names)
    transient = max(args.batch * args.context * max_len * 4 * 3 if table[n][0] == "inductor" and table[n][2] == "static"
                    else args.batch * 9 * args.context * 64 * 4 * 8 for n in names)
    # SWA state per layer and sequence (README "Limits"): the weight ring W x 2k x 12 bytes plus the
    # prompt's last W0 = W weight rows over n tokens (fp32), with W = k = n (1 - sparsity) / 2
    k = int(args.context * (1 - args.sparsity) / 2)
    swa_state = cfg.num_hidden_layers * args.batch * (k * 2 * k * 12 + k * args.context * 4)
    state = sum(swa_state for n in names if (table[n][1] or {}).get("swa"))
    need, have = kv + transient + state, _available_bytes()
    print(f"memory: caches {kv / 2**30:.1f} GiB + SWA state {state / 2**30:.1f} GiB + largest prefill "
          f"transient {transient / 2**30:.1f} GiB (available {have / 2**30:.1f} GiB)", flush=True)
    if need > 0.8 * have:
        raise SystemExit(f"bench_swa: {len(names)} configs at context {args.context} need about "
                         f"{need / 2**30:.1f} GiB, more than 80 % of the {have / 2**30:.1f} GiB available: "
                         "run fewer --configs per process (e.g. the StaticCache rows apart), or a smaller "
                         "--static-len / --batch")


RATIOS = (("swa_llmaccel", "dense_llmaccel", "SWA vs dense, both LLMAccelCache (target >= 2.3x)"),
          ("recall_llmaccel", "dense_llmaccel", "recall SWA vs dense, both LLMAccelCache (issue 15 target >= 2x)"),
          ("swa_llmaccel_mm", "dense_llmaccel_mm", "SWA vs dense, both LLMAccelCache, both decode_matmul (target >= 2.3x)"),
          ("dense_llmaccel_mm", "dense_llmaccel", "dense + decode_matmul vs dense, both LLMAccelCache"),
          ("dense_llmaccel", "dense_dynamic", "dense LLMAccelCache vs dense DynamicCache (target >= 1.3x)"),
          ("swa_dynamic", "dense_dynamic", "SWA vs dense, both DynamicCache"),
          ("swa_static", "dense_static", "SWA vs dense, both StaticCache"),
          ("dense_static", "inductor_static", "llmaccel dense vs stock inductor, both StaticCache"),
          ("swa_llmaccel", "inductor_static", "llmaccel SWA + LLMAccelCache vs stock inductor + StaticCache"),
          ("swa_llmaccel", "inductor_dynamic", "llmaccel SWA + LLMAccelCache vs stock inductor + DynamicCache"))
"""(faster, slower, label): each ratio is slower/faster ms per step, computed within each repeat."""


def cpu_bench(args) -> dict:
    """Every config of ``--configs`` compiled and prefilled once (each its own cache), then
    ``--repeats`` rounds of ``--steps`` timed decode steps per config, interleaved (the order
    rotates every round). Reported: per config the median over rounds of each round's median step
    time, with the range; per ratio the median and range of the per-round ratios."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = smollm2_config(args.layers)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context))
    table = model_configs(args)
    names = [c for c in args.configs if c in table]
    unknown = set(args.configs) - set(table)
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}; choose from {sorted(table)}")
    max_len = max(args.static_len, args.context + (args.steps + 1) * args.repeats + args.warmup + args.profile + 8)
    if not args.no_memory_check:
        _check_memory(names, table, cfg, args, max_len)
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(names))
    dec = {}
    for name in names:
        backend, opts, cache = table[name]
        t0 = time.perf_counter()
        if args.prefill_threads:
            torch.set_num_threads(args.prefill_threads)
        d = dec[name] = Decoder(model, ids, backend, opts, cache, max_len)
        torch.set_num_threads(args.threads or torch.get_num_threads())
        for _ in range(args.warmup):
            d.step()
        print(f"[{name}] compiled + prefill {d.prefill_s:.1f} s + {args.warmup} warm-up steps "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    per_round = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            per_round[name].append(dec[name].block(args.steps) * 1e3)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {per_round[n][-1]:.1f}" for n in names),
              flush=True)
    runs = {}
    row_bytes = 2 * cfg.num_key_value_heads * 64 * 4 * args.batch * args.layers  # K+V, fp32
    for name in names:
        v = per_round[name]
        own = _budget_of(dec[name].cache)   # this config's own SWA budget (None: dense)
        reads = dec[name].L if own is None or own.dense else own.reads
        runs[name] = {"step_ms_median": _median(v), "step_ms_range": [min(v), max(v)], "rounds_ms": v,
                      "tokens_per_s": args.batch / (_median(v) / 1e3), "prefill_s": dec[name].prefill_s,
                      "budget": None if own is None else own.describe(),
                      "kv_bytes_read_per_step": reads * row_bytes,
                      "top_ops": dec[name].profile(args.profile) if args.profile else None}
    ratios = {}
    for fast, slow, label in RATIOS:
        if fast in runs and slow in runs:
            rr = [s_ / f_ for s_, f_ in zip(per_round[slow], per_round[fast])]
            ratios[f"{fast}/{slow}"] = {"label": label, "median": _median(rr), "range": [min(rr), max(rr)]}
    n = max(d.L for d in dec.values())
    budget = next((b for b in map(_budget_of, (d.cache for d in dec.values())) if b is not None), None)
    b = compute_budget(n, SWAConfig(sparsity=args.sparsity, bucket=args.bucket, policy=args.policy))
    return {"device": "cpu", "threads": torch.get_num_threads(), "layers": args.layers,
            "batch": args.batch, "context": args.context, "steps": args.steps, "repeats": args.repeats,
            "inner": args.inner, "sparsity": args.sparsity, "policy": args.policy, "static_len": max_len,
            "final_n": n, "budget": b.describe(), "swa_state_budget": None if budget is None else budget.describe(),
            "runs": runs, "ratios": ratios,
            "kv_bytes_read_per_step": {"dense": n * row_bytes, "swa_kept": b.total * row_bytes,
                                       "swa_reads_incl_summaries": b.reads * row_bytes},
            "kv_bytes_written_per_step": {"dynamic": n * row_bytes, "llmaccel": row_bytes, "static": row_bytes}}


def print_cpu(c: dict) -> None:
    print(f"\nCPU decode, SmolLM2 shapes x{c['layers']} layers, batch {c['batch']}, context "
          f"{c['context']} -> {c['final_n']} ({c['threads']} threads, inner={c['inner']}); median of "
          f"{c['repeats']} interleaved rounds of {c['steps']} steps [range]")
    print(f"SWA budget at the last step: {c['budget']}")
    print("| config | ms / step | tokens/s | KV MB read / step | KV MB written / step |")
    print("|---|---:|---:|---:|---:|")
    rd, wr = c["kv_bytes_read_per_step"], c["kv_bytes_written_per_step"]
    for name, r in c["runs"].items():
        cache = name.split("_")[1]
        read = r.get("kv_bytes_read_per_step", rd["dense"])   # its own budget, summaries included
        lo, hi = r["step_ms_range"]
        print(f"| {name} | {r['step_ms_median']:.1f} [{lo:.1f}-{hi:.1f}] | {r['tokens_per_s']:.2f} | "
              f"{read / 1e6:.1f} | {wr[cache] / 1e6:.2f} |")
    for key, r in c["ratios"].items():
        print(f"{r['label']}: {r['median']:.2f}x [{r['range'][0]:.2f}-{r['range'][1]:.2f}]")
    for name, r in c["runs"].items():
        for t in r["top_ops"] or []:
            print(f"  {name:16} {t['op']:48} {t['ms_per_step']:8.1f} ms/step ({t['calls']} calls)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps (compilation)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--inner", default="inductor", choices=["eager", "inductor"],
                   help="llmaccel inner compiler (default: inductor, as a user gets with {})")
    p.add_argument("--configs", type=lambda x: x.split(","),
                   default="dense_dynamic,dense_llmaccel,swa_llmaccel,dense_static,inductor_static".split(","),
                   help="model configs of the CPU run (see model_configs): "
                        "dense_dynamic,dense_llmaccel,swa_llmaccel,dense_llmaccel_mm,swa_llmaccel_mm (the _mm "
                        "ones with options decode_matmul=True),swa_dynamic,dense_static,swa_static,"
                        "inductor_static,inductor_dynamic")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of --steps steps per config")
    p.add_argument("--static-len", type=int, default=16384, help="StaticCache max_cache_len")
    p.add_argument("--policy", default="alisa", choices=sorted(POLICY_DEFAULTS),
                   help="SWA policy of the swa rows (CPU model and op benchmarks; the GPU kernel "
                        "benchmark times alisa's selection)")
    p.add_argument("--prefill-threads", type=int, default=None,
                   help="threads for the (untimed) prefills; decode uses --threads")
    p.add_argument("--gpu-context", type=int, default=32768)
    p.add_argument("--gpu-policies", type=lambda x: [v for v in x.split(",") if v], default=["alisa", "quest", "recall"],
                   help="policies of the GPU one-site step bench (empty: skip it)")
    p.add_argument("--gpu-policy-contexts", type=lambda x: [int(v) for v in x.split(",")], default=[8192, 32768])
    p.add_argument("--gpu-steps", type=int, default=20, help="timed steps per policy of the GPU step bench")
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
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even where the up-front estimate (an upper bound: it counts every SWA ring full) "
                        "exceeds 80 %% of the available memory")
    p.add_argument("--json", default="bench_swa.json")
    p.add_argument("--png", default=None, help="bar chart of the step times (needs matplotlib)")
    args = p.parse_args(argv)
    bad = sorted(set(args.gpu_policies) - set(POLICY_DEFAULTS))
    if bad:
        p.error(f"--gpu-policies: unknown {bad}; choose from {sorted(POLICY_DEFAULTS)}")
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
        if args.gpu_policies:
            print_policy_bench(res.setdefault("gpu_policies", policy_bench(args)))
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
        plt.xticks(rotation=30, ha="right")
        plt.tight_layout()
        plt.ylabel("ms / decode step")
        plt.title(f"batch {c['batch']}, context {c['context']}, SWA sparsity {c['sparsity']}")
        plt.savefig(args.png)
    return res


if __name__ == "__main__":
    main()
