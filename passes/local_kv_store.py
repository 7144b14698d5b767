"""Pass: local KV store — attention sites keep their KV in in-place buffers owned by the cache.

Hugging Face's ``DynamicCache`` appends each decode token with ``cat([past_k, k_new], -2)`` inside
the graph: a copy of the whole cache per layer per step, which at long context costs more than
the attention that reads it (and sparse window attention, which reads only a budget of it, cannot
remove it). This pass turns every canonical attention site (``llmaccel::attention``, or
``llmaccel::swa_attention`` after the SWA pass) into ``llmaccel::stored_attention``: the KV lives in
preallocated buffers appended in place and grown by a factor when full
(:class:`~llm_compile.runtime.kv.buffer.SiteKV`), and the op returns two zero-memory phantoms that
*carry* those buffers; the graph returns them to the model's cache instead of its ``cat``. So the
KV belongs to the cache object the caller passed (one per sequence batch) and dies with it; the
graph holds no handle to process state (the store's ``reserve``/``growth`` and the SWA config are
plain op arguments). The rewrite itself is shared with attention offload
(:mod:`llm_compile.passes.kv_relocation`).

Before (decode step of one layer)::

    cat_2 = aten.cat.default([arg_past_k, k_new], -2)      # whole-cache copy, returned to the cache
    cat_3 = aten.cat.default([arg_past_v, v_new], -2)
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, None, 0.125,
                                           False, 0, cat_2, cat_3)
    return (cat_3, cat_2, ..., logits)

After::

    stored_attention = llmaccel.stored_attention.default(q, k_new, v_new, arg_past_k, arg_past_v,
                                                         None, 0.125, False, 0, 256, 1.5, '', '')
    getitem = stored_attention[0]                 # attention output
    getitem_1 = stored_attention[1]               # K phantom [B, Hkv, L+1, D], carries the SiteKV
    getitem_2 = stored_attention[2]               # V phantom
    return (getitem_2, getitem_1, ..., logits)

All or nothing: a site whose cache append feeds anything but the returned cache, or whose cache
the graph does not return while other sites' caches are returned, makes the pass raise, and the
manager leaves the whole graph as it was. A graph that returns no cache at all (a forward with
``use_cache=False``) is left unchanged without an error, and so are sites over an HF
``StaticCache`` (its buffers are already written in place; the reason is reported).

With ``kv_tiers`` the op's last argument carries those options and the graph's number of sites
(``'{"device_budget": ..., "sites": 30}'``): the KV then lives in tiers (device, host;
:mod:`llm_compile.runtime.tiers`), and the pass reports the plan for the example batch in its
stats (``passes.json``: ``stats["kv_tiers_plan"]``: p1, p2, alpha, beta, predicted step time, reasons).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llm_compile.config import LLMAccelConfig
from llm_compile.passes.base import PassContext, PassResult
from llm_compile.passes.kv_relocation import STATIC_TARGETS, fake_call, relocate_kv
from llm_compile.passes.sliding_window import sliding_window_of, sliding_window_reason
from llm_compile.runtime.kv import store  # noqa: F401  (registers llmaccel::stored_attention)
from llm_compile.runtime.tiers.plan import TiersPlanError, make_plan

log = logging.getLogger(__name__)
STORED = torch.ops.llmaccel.stored_attention.default
SITE_TARGETS = (torch.ops.llmaccel.attention.default, torch.ops.llmaccel.swa_attention.default)


def tiers_json(tiers, sites: int) -> str:
    """The ``tiers`` argument of the op: the kv_tiers options and the graph's number of sites."""
    return "" if tiers is None else json.dumps({**dataclasses.asdict(tiers), "sites": sites}, sort_keys=True)


def plan_for_dump(tiers, sites: int, shapes: dict) -> dict:
    """The plan for the first site's shapes (batch from the example input), for ``passes.json``;
    the run-time plan is made per cache at prefill with its real batch."""
    q, k, v = shapes.get("q"), shapes.get("k"), shapes.get("v")
    if q is None or k is None or v is None:
        return {"error": "no example shapes to plan for"}
    batch = k.shape[0] if isinstance(k.shape[0], int) else (k.shape[0].node.hint or 1)
    try:
        with unset_fake_temporarily():  # the cost model times real tensors (and maps real files)
            plan = make_plan(tiers, batch=batch, heads=int(k.shape[1]), q_heads=int(q.shape[1]), d=int(k.shape[-1]),
                             dv=int(v.shape[-1]), dtype=k.dtype, device=k.device, sites=sites,
                             swa=json.loads(shapes["swa"]) if shapes.get("swa") else None)
    except TiersPlanError as e:
        return {"batch": batch, "error": str(e)}
    return {"batch": batch, **plan.as_dict()}


def _builder(cfg, tiers: str = "", shapes: dict | None = None):
    def build(g: torch.fx.Graph, node: torch.fx.Node, a: dict):
        args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], a["attn_mask"], a["scale"],
                a["is_causal"], a["site"], int(cfg.reserve_tokens), float(cfg.growth), a.get("swa") or "",
                tiers)
        if shapes is not None and not shapes:
            shapes.update({x: a[x].meta.get("val") for x in ("q", "k", "v")}, swa=a.get("swa") or "")
        new = g.call_function(STORED, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        parts = [g.call_function(operator.getitem, (new, i)) for i in range(3)]
        vals = [x.meta.get("val") if isinstance(x, torch.fx.Node) else x for x in args]
        fake = fake_call(lambda *xs: STORED(*xs), *vals)
        for p, v in zip(parts, fake or ()):
            p.meta["val"] = v
        return parts[0], parts[1], parts[2]
    return build


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext | None = None) -> PassResult:
    cfg = config.kv_store
    sliding = [(n, w) for n in gm.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.llmaccel.attention.default, torch.ops.llmaccel.swa_attention.default)
               and (w := sliding_window_of(n)) is not None]
    if sliding:  # all or nothing: a rolling cache cannot live in the in-place store
        skipped = [{"node": n.name, "reason": f"kv_store left off for this graph: {sliding_window_reason(w)}"}
                   for n, w in sliding]
        return PassResult(changed=False, skipped=skipped, stats={"sites": 0})
    static = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in STATIC_TARGETS]
    sites = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in SITE_TARGETS)
    tiers = tiers_json(config.kv_tiers, sites)
    shapes: dict = {}
    matched = relocate_kv(gm, _builder(cfg, tiers, shapes), "kv_store", require_returned_cache=True)
    skipped = [{"node": n, "reason": "reads a preallocated StaticCache, already written in place: left "
                                     "as it is"} for n in static]
    if not matched and not static:
        skipped = [{"reason": "no attention site whose K/V cache the graph returns "
                              "(no cache kept, e.g. use_cache=False): nothing to store"}]
    stats = {"sites": len(matched), "reserve_tokens": cfg.reserve_tokens, "growth": cfg.growth}
    if tiers and matched:
        stats["kv_tiers_plan"] = plan_for_dump(config.kv_tiers, sites, shapes)
    log.info("kv_store: %d attention site(s) of %s keep their KV in in-place buffers owned by the cache",
             len(matched), getattr(ctx, "graph_id", "?"))
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped, stats=stats)
