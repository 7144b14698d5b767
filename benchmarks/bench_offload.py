"""Attention offload on CPU: per-token overhead vs local attention, and micro-batch overlap.

    python benchmarks/bench_offload.py                      # attention-level + overlap (~1 min)
    python benchmarks/bench_offload.py --model              # + small Llama greedy decode, per token
    python benchmarks/bench_offload.py --json out.json

Measures (median of ``--iters`` after warm-up; workers are local processes, gloo on 127.0.0.1):

* ``decode``: one attention decode step of one layer (B, Hq/Hkv, D, context n) locally
  (``dense_attention`` over the full cache) vs through a pool of 1 and 2 workers (q/k_new/v_new out,
  output back). The difference is the transport overhead per layer per token.
* ``overlap``: micro-batch A's attention issued with ``decode_async`` while micro-batch B's
  non-attention work (a matmul) runs locally; ``overlap = (t_attn + t_compute - t_both) /
  min(t_attn, t_compute)`` (1 = fully hidden, 0 = serialised).
* ``model`` (``--model``): per-token latency of a small random Llama's greedy generation compiled
  with ``llmaccel`` (``inner="eager"``), local vs ``offload: {workers: 2}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from llm_compile.ops.attention import dense_attention
from llm_compile.runtime.offload_pool import AttentionWorkerPool

log = logging.getLogger(__name__)


def _median_s(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_decode(pools: dict, ctx: int, iters: int, B=1, hq=8, hkv=2, D=64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, hkv, ctx, D, generator=g), torch.randn(B, hkv, ctx, D, generator=g)
    q, kn, vn = torch.randn(B, hq, 1, D), torch.randn(B, hkv, 1, D), torch.randn(B, hkv, 1, D)
    kf, vf = torch.cat([k, kn], -2), torch.cat([v, vn], -2)
    rows = [{"bench": "decode", "ctx": ctx, "where": "local",
             "ms": 1e3 * _median_s(lambda: dense_attention(q, kf, vf, None, D ** -0.5, False), iters)}]
    for n, pool in pools.items():
        pool.prefill(1, ctx, k, v)

        def step():  # append + attend; the cache grows by one token per call, as in decoding
            pool.decode(1, ctx, q, kn, vn, D ** -0.5)

        rows.append({"bench": "decode", "ctx": ctx, "where": f"{n} worker(s)", "ms": 1e3 * _median_s(step, iters)})
        pool.release(1)
    base = rows[0]["ms"]
    for r in rows:
        r["overhead_ms"] = r["ms"] - base
    return rows


def bench_overlap(pool, iters: int, ctx=2048, B=4, hq=8, hkv=2, D=64, mm=384) -> dict:
    g = torch.Generator().manual_seed(1)
    pool.prefill(2, 0, torch.randn(B, hkv, ctx, D, generator=g), torch.randn(B, hkv, ctx, D, generator=g))
    q, kn, vn = torch.randn(B, hq, 1, D), torch.randn(B, hkv, 1, D), torch.randn(B, hkv, 1, D)
    a = torch.randn(mm, mm)

    def attn():
        pool.decode(2, 0, q, kn, vn, D ** -0.5)

    def compute():
        (a @ a @ a).sum()

    def both():
        fut = pool.decode_async(2, 0, q, kn, vn, D ** -0.5)
        compute()
        fut.wait()

    t_attn, t_comp, t_both = (_median_s(f, iters) for f in (attn, compute, both))
    pool.release(2)
    hidden = (t_attn + t_comp - t_both) / min(t_attn, t_comp)
    return {"bench": "overlap", "attn_ms": 1e3 * t_attn, "compute_ms": 1e3 * t_comp,
            "sequential_ms": 1e3 * (t_attn + t_comp), "overlapped_ms": 1e3 * t_both, "overlap": hidden}


def bench_model(tokens: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=512)
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, opts in (("local", {"inner": "eager"}),
                       ("offload 2 workers", {"inner": "eager", "offload": {"workers": 2}})):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        model.forward = torch.compile(model.forward, backend="llmaccel", options=opts)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # compile prefill + decode graphs
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            t_pre = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens + 1, do_sample=False)
            t_all = time.perf_counter() - t0
        rows.append({"bench": "model", "where": name, "ms_per_token": 1e3 * (t_all - t_pre) / tokens})
    rows[1]["overhead_ms"] = rows[1]["ms_per_token"] - rows[0]["ms_per_token"]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--ctx", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--model", action="store_true", help="also time a small Llama's greedy decode")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pools = {n: AttentionWorkerPool.spawn(n, timeout_s=60) for n in (1, 2)}
    try:
        rows = [r for ctx in a.ctx for r in bench_decode(pools, ctx, a.iters)]
        rows.append(bench_overlap(pools[1], a.iters))
    finally:
        for p in pools.values():
            p.shutdown()
    if a.model:
        rows += bench_model(a.tokens)
        from llm_compile.runtime.offload_pool import shutdown_pools

        shutdown_pools()
    print(f"{'bench':8} {'case':24} {'ms':>9} {'overhead ms':>12}  notes")
    for r in rows:
        if r["bench"] == "decode":
            print(f"decode   ctx={r['ctx']:<5} {r['where']:14} {r['ms']:9.3f} {r['overhead_ms']:12.3f}")
        elif r["bench"] == "overlap":
            print(f"overlap  {'A attn || B compute':24} {r['overlapped_ms']:9.3f} {'':12}  attn {r['attn_ms']:.2f} + "
                  f"compute {r['compute_ms']:.2f} = {r['sequential_ms']:.2f} sequential; overlap {r['overlap']:.2f}")
        else:
            print(f"model    {r['where']:24} {r['ms_per_token']:9.3f} {r.get('overhead_ms', 0.0):12.3f}  per token")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
