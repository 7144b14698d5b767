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
* ``overlap_model`` (``--overlap-model``): per-token decode of a random 8-layer Llama at batch
  ``--batch`` (``dynamic=True``): local, offload, offload + ``overlap`` (ping-pong halves); the
  hidden fraction is ``(offload - overlap) / (offload - local)``.
* ``smollm2`` (``--smollm2``): the same on the real SmolLM2-135M (30 layers, 9/3 heads; compile
  takes minutes on 2 cores), plus the per-token estimate from the attention-level numbers at
  SmolLM2's shape (``decode`` rows with ``--shape smollm2``: per-layer overhead x 30).
* ``capacity`` (``--capacity``): the largest batch whose KV fits when the compute process may
  grow by at most ``--cap-mib`` MiB of address space (``RLIMIT_AS`` set in a fresh subprocess after
  start-up), at context ``--cap-ctx``, SmolLM2's KV shape (30 layers x 3 KV heads x 64, fp32):
  ``local`` keeps the cache in the process and attends over it; ``offload`` ships each layer's
  prompt K/V to 2 workers (made one layer at a time, as a compiled prefill does) and decodes
  through them. Weights and activations are not counted (the same for both). Binary search over
  the batch, one subprocess per trial.

SmolLM2 numbers::

    python benchmarks/bench_offload.py --shape smollm2 --ctx 128 1024 --capacity --smollm2 \
        --json benchmarks/out/offload.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from llm_compile.ops.attention import dense_attention
from llm_compile.runtime.offload import AttentionWorkerPool

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
    """One layer's decode attention at context ``ctx``: local vs each pool."""
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


def _decode_ms_per_token(model, ids, tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decode ms per token of a compiled ``model``: (time of ``tokens + 1`` new tokens minus
    the time of 1, i.e. the prefill) / ``tokens``, after a warm-up that compiles both graphs; and
    the generated sequences of the timed run."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # compile prefill + decode graphs
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens + 1, do_sample=False)
        t_all = time.perf_counter() - t0
    return 1e3 * (t_all - t_pre) / tokens, out


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
        rows.append({"bench": "model", "where": name, "ms_per_token": _decode_ms_per_token(model, ids, tokens)[0]})
    rows[1]["overhead_ms"] = rows[1]["ms_per_token"] - rows[0]["ms_per_token"]
    return rows


SHAPES = {"default": dict(B=1, hq=8, hkv=2, D=64), "smollm2": dict(B=1, hq=9, hkv=3, D=64)}
SMOLLM2_LAYERS = 30


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def capacity_trial(mode: str, batch: int, ctx: int, cap_mib: int, steps: int = 4, layers=SMOLLM2_LAYERS,
                   hq=9, hkv=3, D=64) -> dict:
    """One trial (run in a fresh subprocess): does a batch of ``batch`` sequences at ``ctx`` fit
    when this process may grow by ``cap_mib`` MiB of address space from here on?"""
    torch.set_num_threads(1)
    pool = AttentionWorkerPool.spawn(2, timeout_s=120) if mode == "offload" else None
    scale = D ** -0.5
    g = torch.Generator().manual_seed(0)
    q1 = torch.randn(1, hq, 1, D)  # warm-up: allocator, SDPA, gloo threads exist before the cap
    dense_attention(q1, torch.randn(1, hkv, 8, D), torch.randn(1, hkv, 8, D), None, scale, False)
    if pool is not None:
        pool.prefill(0, 0, torch.randn(1, hkv, 8, D), torch.randn(1, hkv, 8, D))
        pool.decode(0, 0, q1, torch.randn(1, hkv, 1, D), torch.randn(1, hkv, 1, D), scale)
        pool.release(0)
    base = _vm_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + (cap_mib << 20), resource.RLIM_INFINITY))
    try:
        if pool is None:
            cache = []
            for _ in range(layers):
                k = torch.empty(batch, hkv, ctx + steps, D)
                v = torch.empty(batch, hkv, ctx + steps, D)
                k[:, :, :ctx].normal_(generator=g)
                v[:, :, :ctx].normal_(generator=g)
                cache.append((k, v))
            for s in range(steps):
                n = ctx + s + 1
                for k, v in cache:
                    k[:, :, n - 1:n].normal_(generator=g)
                    v[:, :, n - 1:n].normal_(generator=g)
                    dense_attention(torch.randn(batch, hq, 1, D), k[:, :, :n], v[:, :, :n], None, scale, False)
        else:
            for layer in range(layers):
                pool.prefill(1, layer, torch.randn(batch, hkv, ctx, D, generator=g),
                             torch.randn(batch, hkv, ctx, D, generator=g))
            for s in range(steps):
                for layer in range(layers):
                    pool.decode(1, layer, torch.randn(batch, hq, 1, D), torch.randn(batch, hkv, 1, D),
                                torch.randn(batch, hkv, 1, D), scale, cached_len=ctx + s)
        ok = True
    except (RuntimeError, MemoryError) as e:
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        ok = False
    grew = _vm_bytes() - base
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out = {"mode": mode, "batch": batch, "ok": ok, "grew_mib": grew / 2 ** 20}
    if pool is not None:
        out["worker_kv_mib"] = sum(pool.kv_bytes()) / 2 ** 20 if ok else None
        pool.shutdown()
    return out


def _run_trial(mode: str, batch: int, ctx: int, cap_mib: int) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_trial", mode, str(batch), str(ctx),
                        str(cap_mib)], capture_output=True, text=True, env=env, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("TRIAL "):
            return json.loads(line[6:])
    raise RuntimeError(f"trial {mode} B={batch} failed (rc {r.returncode}): {r.stderr[-1500:]}")


def bench_capacity(cap_mib: int, ctx: int, max_batch: int) -> list[dict]:
    """Largest batch that fits under the cap, local vs offload (binary search, subprocess per trial)."""
    kv_per_seq = SMOLLM2_LAYERS * 3 * ctx * 64 * 2 * 4
    rows = []
    for mode in ("local", "offload"):
        lo, hi, trials = 0, max_batch + 1, []  # lo fits (0 trivially), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            t = _run_trial(mode, mid, ctx, cap_mib)
            trials.append(t)
            lo, hi = (mid, hi) if t["ok"] else (lo, mid)
        best = next((t for t in trials if t["batch"] == lo), {})
        rows.append({"bench": "capacity", "where": mode, "cap_mib": cap_mib, "ctx": ctx, "max_batch": lo,
                     "search_limit": max_batch, "kv_mib_per_seq": kv_per_seq / 2 ** 20,
                     "compute_grew_mib": best.get("grew_mib"), "worker_kv_mib": best.get("worker_kv_mib"),
                     "trials": [(t["batch"], t["ok"]) for t in trials]})
    return rows


def bench_overlap_model(tokens: int, batch: int, ctx: int = 256) -> list[dict]:
    """Per-token decode of a random Llama (8 layers, 512 wide, 8/2 heads) at batch ``batch``,
    ``dynamic=True``, inner eager: local, offload (2 workers), offload + overlap (ping-pong halves).
    ``hidden = (offload - overlap) / (offload - local)``: the share of the offload cost (transport
    + remote attention) that the ping-pong hides."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from llm_compile.runtime.offload import shutdown_pools

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=2048)
    ids = torch.randint(0, 2048, (batch, ctx), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, off in (("local", None), ("offload 2 workers", {"workers": 2}),
                      ("offload 2 workers + overlap", {"workers": 2, "overlap": True})):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        opts = {"inner": "eager", **({"offload": off} if off else {})}
        model.forward = torch.compile(model.forward, backend="llmaccel", options=opts, dynamic=True)
        ms, out = _decode_ms_per_token(model, ids, tokens)
        rows.append({"bench": "overlap_model", "where": name, "batch": batch, "ctx": ctx,
                     "ms_per_token": ms, "tokens": out[:, ctx:].tolist()})
        shutdown_pools()
    loc, off, ovl = (r["ms_per_token"] for r in rows)
    rows[1]["overhead_ms"], rows[2]["overhead_ms"] = off - loc, ovl - loc
    rows[2]["hidden_fraction"] = (off - ovl) / (off - loc) if off > loc else None
    rows[2]["same_tokens"] = rows[2]["tokens"] == rows[1]["tokens"] == rows[0]["tokens"]
    for r in rows:
        del r["tokens"]
    return rows


def bench_smollm2(tokens: int) -> list[dict]:
    """Per-token greedy decode latency of the real SmolLM2-135M, local vs offload (inner eager)."""
    from llm_compile.eval.model import load_smollm2
    from llm_compile.runtime.offload import shutdown_pools

    model, tok = load_smollm2()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    rows = []
    for name, opts in (("local", {"inner": "eager"}),
                       ("offload 2 workers", {"inner": "eager", "offload": {"workers": 2}})):
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="llmaccel", options=opts)
        ms = _decode_ms_per_token(model, ids, tokens)[0]
        del model.forward
        rows.append({"bench": "smollm2", "where": name, "ctx": ids.shape[1], "ms_per_token": ms})
    shutdown_pools()
    rows[1]["overhead_ms"] = rows[1]["ms_per_token"] - rows[0]["ms_per_token"]
    return rows


def print_table(rows: list[dict]) -> None:
    """Markdown table of every row."""
    print("| bench | case | ms | overhead ms | notes |\n|---|---|---|---|---|")
    for r in rows:
        b = r["bench"]
        if b == "decode":
            note = f"{r['shape']}, one layer" + (f"; x{SMOLLM2_LAYERS} layers = {r['per_token_overhead_ms']:.2f} ms/token"
                                                if "per_token_overhead_ms" in r else "")
            print(f"| decode | ctx={r['ctx']} {r['where']} | {r['ms']:.3f} | {r['overhead_ms']:.3f} | {note} |")
        elif b == "overlap":
            print(f"| overlap | A attn ‖ B compute | {r['overlapped_ms']:.3f} | | attn {r['attn_ms']:.2f} + compute "
                  f"{r['compute_ms']:.2f} = {r['sequential_ms']:.2f} sequential; hidden fraction {r['overlap']:.2f} |")
        elif b == "overlap_model":
            extra = ""
            if "hidden_fraction" in r:
                hf = r["hidden_fraction"]
                extra = f"; hidden fraction {hf:.2f}" if hf is not None else "; nothing to hide"
                extra += f"; same tokens: {r['same_tokens']}"
            print(f"| overlap_model | {r['where']} | {r['ms_per_token']:.3f} | {r.get('overhead_ms', 0.0):.3f} | "
                  f"per token, batch {r['batch']}, prompt {r['ctx']}{extra} |")
        elif b in ("model", "smollm2"):
            print(f"| {b} | {r['where']} | {r['ms_per_token']:.3f} | {r.get('overhead_ms', 0.0):.3f} | per token"
                  + (f", prompt {r['ctx']} tokens" if "ctx" in r else "") + " |")
        elif b == "capacity":
            extra = f", workers hold {r['worker_kv_mib']:.0f} MiB" if r.get("worker_kv_mib") else ""
            lim = " (search limit)" if r["max_batch"] == r["search_limit"] else ""
            print(f"| capacity | {r['where']}, cap {r['cap_mib']} MiB, ctx {r['ctx']} | | | max batch "
                  f"**{r['max_batch']}**{lim} (KV {r['kv_mib_per_seq']:.1f} MiB/seq; compute grew "
                  f"{(r['compute_grew_mib'] or 0):.0f} MiB{extra}) |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--ctx", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default",
                    help="attention shape of the decode rows (smollm2: 9/3 heads, D=64; adds x30 per token)")
    ap.add_argument("--model", action="store_true", help="also time a small Llama's greedy decode")
    ap.add_argument("--smollm2", action="store_true", help="also time the real SmolLM2-135M's greedy decode")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--overlap-model", action="store_true",
                    help="per-token decode local / offload / offload+overlap on a random 8-layer Llama")
    ap.add_argument("--batch", type=int, default=8, help="batch of --overlap-model")
    ap.add_argument("--capacity", action="store_true", help="batch capacity under a compute memory cap")
    ap.add_argument("--cap-mib", type=int, default=256)
    ap.add_argument("--cap-ctx", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--skip-attention", action="store_true", help="skip the decode/overlap rows")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_trial", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._trial:
        mode, b, ctx, cap = a._trial
        print("TRIAL " + json.dumps(capacity_trial(mode, int(b), int(ctx), int(cap))), flush=True)
        return
    torch.set_num_threads(1)
    rows = []
    if not a.skip_attention:
        pools = {n: AttentionWorkerPool.spawn(n, timeout_s=60) for n in (1, 2)}
        try:
            for ctx in a.ctx:
                part = bench_decode(pools, ctx, a.iters, **SHAPES[a.shape])
                for r in part:
                    r["shape"] = a.shape
                    if a.shape == "smollm2":
                        r["per_token_overhead_ms"] = r["overhead_ms"] * SMOLLM2_LAYERS
                rows += part
            rows.append(bench_overlap(pools[1], a.iters))
        finally:
            for p in pools.values():
                p.shutdown()
    if a.model:
        rows += bench_model(a.tokens)
        from llm_compile.runtime.offload import shutdown_pools

        shutdown_pools()
    if a.smollm2:
        rows += bench_smollm2(a.tokens)
    if a.overlap_model:
        rows += bench_overlap_model(a.tokens, a.batch)
    if a.capacity:
        rows += bench_capacity(a.cap_mib, a.cap_ctx, a.max_batch)
    print_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                       "load_avg": os.getloadavg(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
