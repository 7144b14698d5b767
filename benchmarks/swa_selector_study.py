"""How well does each query scorer find the tokens the query attends to? (issue 15, analysis)

    python benchmarks/swa_selector_study.py --threads 1 --sparsities 0.5,0.8,0.9 \
        --out benchmarks/continuation/selector_study.json

On SmolLM2-135M, for ``--windows`` windows of the evaluation split (``--context`` tokens + the
next ``--continuation``), the post-RoPE queries and keys of every layer are captured from one dense
forward. For every ``--stride``-th continuation query, each selector picks one token set per layer
(``selection="layer"``: weights summed over the 9 heads) within the read budget of
``floor(n * (1 - sparsity))`` token rows, its summaries counted as in
:func:`llm_compile.runtime.swa.state.compute_budget` (float32 cache), plus the newest
``--recent`` tokens and token 0. Reported, averaged over queries, layers and windows:

* ``mass``: the share of the exact attention weight (mean over heads) on the picked tokens;
* ``rel.err``: ``|o_S - o| / |o|`` of attention restricted to the picked tokens against dense.

``--speed``: instead, time one site's scoring on random keys (no model): the sketch's logits and
Quest's page bounds against the dense ``q K^T`` they replace, at ``--speed-context`` tokens,
batch 4, SmolLM2's heads (9 query, 3 KV, head dim 64), float32 CPU; median of 20 calls.

Selectors: ``oracle`` (exact top-k, reads every key), ``pages<P>`` (Quest's min/max bound per page
of P tokens), ``sketch<b>`` (the ``b``-bit per-channel key sketch over 64-token blocks,
:class:`~llm_compile.runtime.swa.sketch.KeySketch`), ``recent`` (the newest tokens only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import transformers.models.llama.modeling_llama as ml

from llm_compile.config import SWAConfig
from llm_compile.eval import data
from llm_compile.eval.model import load_smollm2
from llm_compile.runtime.swa import native
from llm_compile.runtime.swa.pages import PageSummary
from llm_compile.runtime.swa.scorers import SCORERS
from llm_compile.runtime.swa.sketch import KeySketch


def capture(model, ids: torch.Tensor, keep: int):
    """Per layer (q of the last ``keep`` positions [Hq, keep, D], k [Hkv, n, D], v) of one forward."""
    rec, orig = [], ml.eager_attention_forward

    def hook(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        rec.append((query[0, :, -keep:].float(), key[0].float(), value[0].float()))
        return orig(module, query, key, value, attention_mask, scaling, dropout, **kw)

    ml.eager_attention_forward = hook
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        ml.eager_attention_forward = orig
    return rec


def selector_weights(name: str, q, k, scale):
    """Per-head weights [Hq, n] a selector ranks by (softmax of its logits; tail tokens 0)."""
    Hq, D = q.shape
    n = k.shape[1]
    if name == "oracle":
        return torch.softmax((q.reshape(k.shape[0], -1, D) @ k.transpose(-1, -2)).reshape(Hq, n) * scale, -1)
    if name.startswith("pages"):
        s = PageSummary(int(name[5:]))
    else:
        s = KeySketch(int(name[6:]), 64)
    scorer = SCORERS["pages" if name.startswith("pages") else "sketch"]
    return scorer.to_tokens(scorer.weights(s, q[None], k[None], None, scale, n, False), s, n)[0]


def summary_rows(name: str, n: int, D: int) -> float:
    if name.startswith("pages"):
        return SCORERS["pages"].summary_rows(n, SWAConfig(page_size=int(name[5:])), D, D, 4)[0]
    if name.startswith("sketch"):
        return SCORERS["sketch"].summary_rows(n, SWAConfig(sketch_bits=int(name[6:])), D, D, 4)[0]
    return 0.0


def study(records, selectors, sparsity, stride, recent, context):
    agg = {s: [0.0, 0.0, 0] for s in selectors}
    for Q, K, V in records:
        Hq, keep, D = Q.shape
        Hkv = K.shape[0]
        scale = D ** -0.5
        for i in range(0, keep, stride):
            n = context + i + 1
            q, k, v = Q[:, i], K[:, :n], V[:, :n]
            w = torch.softmax((q.reshape(Hkv, -1, D) @ k.transpose(-1, -2)).reshape(Hq, n) * scale, -1)
            vv = v.repeat_interleave(Hq // Hkv, 0)
            o = (w.unsqueeze(1) @ vv).squeeze(1)
            cap = int(math.floor(round(n * (1 - sparsity), 9)))
            for s in selectors:
                take = cap - math.ceil(summary_rows(s, n, D))
                score = (torch.arange(n).float() if s == "recent"
                         else selector_weights(s, q, k, scale).sum(0))
                score[n - recent:] = float("inf")
                score[0] = float("inf")
                sel = torch.topk(score, take).indices
                ws = w[:, sel]
                mass = ws.sum(-1)
                o_s = ((ws / mass[:, None]).unsqueeze(1) @ vv[:, sel]).squeeze(1)
                a = agg[s]
                a[0] += mass.mean().item()
                a[1] += ((o_s - o).norm(dim=-1) / o.norm(dim=-1)).mean().item()
                a[2] += 1
    return {s: {"mass": a[0] / a[2], "rel_err": a[1] / a[2],
                "rows_attended_at_context": int(math.floor(round(context * (1 - sparsity), 9)))
                - math.ceil(summary_rows(s, context, 64))} for s, a in agg.items()}


def speed(context: int, batch: int = 4, reps: int = 20) -> dict:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(batch, 3, context, 64, generator=g)
    q = torch.randn(batch, 9, 64, generator=g)
    sk, pg = KeySketch(2, 64), PageSummary(16)
    sk.update(k)
    pg.update(k)
    vnni = native.sketch_vnni()
    fns = {"dense q.K^T": (lambda: torch.matmul(q.reshape(batch, 3, 3, 64), k.transpose(-1, -2)), None),
           f"sketch logits (2 bits), C kernel{' (AVX-512 VNNI)' if vnni else ''}": (lambda: sk.logits(q, 0.125), None),
           "sketch logits (2 bits), torch path": (lambda: sk.logits_torch(q, 0.125), None),
           "page bounds (16 tokens)": (lambda: pg.bounds(q, 0.125), None)}
    if vnni:   # the float tiles that CPUs without VNNI run (same integers, same floats)
        fns["sketch logits (2 bits), C kernel, float tiles"] = (lambda: sk.logits(q, 0.125), False)
    out = {}
    for name, (fn, use_vnni) in fns.items():
        if use_vnni is not None:
            native.sketch_vnni(use_vnni)
        try:
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        finally:
            if use_vnni is not None:
                native.sketch_vnni(True)
        out[name] = sorted(ts)[reps // 2] * 1e3
    print(f"one site, {context} tokens, batch {batch}: | scoring | ms |\n|---|---:|")
    for name, ms in out.items():
        print(f"| {name} | {ms:.3f} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", default="0.8")
    ap.add_argument("--selectors", default="oracle,pages16,pages32,sketch1,sketch2,sketch4,recent")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--recent", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/out/selector_study.json")
    ap.add_argument("--speed", action="store_true", help="time one site's scoring instead (no model)")
    ap.add_argument("--speed-context", type=int, default=8192)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed:
        speed(args.speed_context)
        return 0
    model, tok = load_smollm2(attn_implementation="eager")
    size = args.context + args.continuation
    ids = data.load_tokens(tok, "evaluation", args.windows * size)
    records = []
    for i in range(args.windows):
        records += capture(model, ids[:, i * size:(i + 1) * size], args.continuation)
        print(f"captured window {i + 1}/{args.windows}", flush=True)
    selectors = [s for s in args.selectors.split(",") if s]
    out = {"args": vars(args), "results": {}}
    for sp in (float(x) for x in args.sparsities.split(",")):
        res = study(records, selectors, sp, args.stride, args.recent, args.context)
        out["results"][str(sp)] = res
        print(f"\nsparsity {sp}: | selector | attention mass kept | rel. output error | rows attended at "
              f"{args.context} |\n|---|---:|---:|---:|")
        for s, r in res.items():
            print(f"| {s} | {r['mass']:.4f} | {r['rel_err']:.4f} | {r['rows_attended_at_context']} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
