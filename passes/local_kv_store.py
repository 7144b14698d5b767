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
When phase 3 may run (a host budget or ``p2``, recompute not ``"off"``, ``beta`` not 0), each site
also gets what recomputes its K/V — the layer input, the K/V projection weights (graph inputs),
the RoPE cos/sin rows — as the op's ``rec`` list and ``rec_spec`` JSON
(:mod:`llm_compile.passes.recompute_inputs`); a site whose attention is of another form gets none
(``stats["recompute"]`` says why) and its plan keeps beta = 0, unless ``kv_tiers.beta`` > 0 asked
for recompute: then the compile fails with the reason (as for ``beta`` > 0 on a GQA model, whose
recompute would free no memory).
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
from llm_compile.passes.base import PassContext, PassResult, RequestedPassError
from llm_compile.passes.kv_relocation import STATIC_TARGETS, fake_call, relocate_kv
from llm_compile.passes.recompute_inputs import recompute_inputs
from llm_compile.passes.sliding_window import sliding_window_of, sliding_window_reason
from llm_compile.runtime.kv import store  # noqa: F401  (registers llmaccel::stored_attention)
from llm_compile.runtime.tiers.plan import TiersPlanError, make_plan
from llm_compile.runtime.tiers.recompute import SUPPORTED, kept_width

log = logging.getLogger(__name__)
STORED = torch.ops.llmaccel.stored_attention.default
SITE_TARGETS = (torch.ops.llmaccel.attention.default, torch.ops.llmaccel.swa_attention.default)


def tiers_json(tiers, sites: int) -> str:
    """The ``tiers`` argument of the op: the kv_tiers options and the graph's number of sites."""
    return "" if tiers is None else json.dumps({**dataclasses.asdict(tiers), "sites": sites}, sort_keys=True)


def may_recompute(tiers) -> bool:
    """Whether phase 3 can be planned: a host budget or p2, recompute on, beta not 0."""
    return (tiers is not None and tiers.recompute != "off" and tiers.beta != 0
            and (tiers.host_budget is not None or tiers.p2 is not None))


def _rec_args(tiers, a: dict, notes: list) -> tuple[list, str]:
    """The ``rec`` list and ``rec_spec`` of one site (``[]``, ``""`` when none; why in ``notes``)."""
    if not may_recompute(tiers):
        return [], ""
    found = recompute_inputs(a["k"], a["v"])
    if isinstance(found, str):
        why = f"site {a['site']}: no recompute inputs: {found}; supported: {SUPPORTED}"
        if tiers.beta:
            raise RequestedPassError(f"llmaccel kv_tiers: beta={tiers.beta} asks for recompute, but {why}")
        notes.append(why)
        return [], ""
    nodes, spec = found
    k, v = _val(a["k"]), _val(a["v"])
    if tiers.beta and k is not None and v is not None:
        keep, kv = kept_width(spec, int(k.shape[-1])), int(k.shape[1]) * int(k.shape[-1] + v.shape[-1])
        if keep >= kv:
            raise RequestedPassError(
                f"llmaccel kv_tiers: beta={tiers.beta} refused: recompute keeps {keep} values per token (layer "
                f"input{' and RoPE cos/sin' if spec['rope'] else ''}) to free K+V of {kv} values ({int(k.shape[1])} "
                "KV heads): it frees no memory (grouped-query attention); use beta=0 (or None) and raise host_budget")
    return nodes, json.dumps(spec, sort_keys=True)


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


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
                             swa=json.loads(shapes["swa"]) if shapes.get("swa") else None,
                             **_keep(shapes.get("rec_spec"), int(k.shape[-1])))
    except TiersPlanError as e:
        return {"batch": batch, "error": str(e)}
    return {"batch": batch, **plan.as_dict()}


def _keep(rec_spec: str | None, d: int) -> dict:
    if not rec_spec:
        return {}
    spec = json.loads(rec_spec)
    return {"keep": kept_width(spec, d), "hidden": spec["hidden"]}


def _builder(cfg, tiers: str = "", shapes: dict | None = None, tiers_cfg=None, notes: list | None = None):
    def build(g: torch.fx.Graph, node: torch.fx.Node, a: dict):
        rec, rec_spec = _rec_args(tiers_cfg, a, notes if notes is not None else [])
        args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], a["attn_mask"], a["scale"],
                a["is_causal"], a["site"], int(cfg.reserve_tokens), float(cfg.growth), a.get("swa") or "",
                tiers) + ((rec, rec_spec) if rec_spec else ())
        if shapes is not None and not shapes:
            shapes.update({x: a[x].meta.get("val") for x in ("q", "k", "v")}, swa=a.get("swa") or "",
                          rec_spec=rec_spec)
        new = g.call_function(STORED, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        parts = [g.call_function(operator.getitem, (new, i)) for i in range(3)]
        vals = [[_val(y) for y in x] if isinstance(x, list) else _val(x) if isinstance(x, torch.fx.Node) else x
                for x in args]
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
    notes: list = []
    matched = relocate_kv(gm, _builder(cfg, tiers, shapes, config.kv_tiers, notes), "kv_store",
                          require_returned_cache=True)
    skipped = [{"node": n, "reason": "reads a preallocated StaticCache, already written in place: left "
                                     "as it is"} for n in static]
    if not matched and not static:
        skipped = [{"reason": "no attention site whose K/V cache the graph returns "
                              "(no cache kept, e.g. use_cache=False): nothing to store"}]
    stats = {"sites": len(matched), "reserve_tokens": cfg.reserve_tokens, "growth": cfg.growth}
    if tiers and matched:
        stats["kv_tiers_plan"] = plan_for_dump(config.kv_tiers, sites, shapes)
        if may_recompute(config.kv_tiers):
            stats["recompute"] = notes or f"recompute inputs passed at all {len(matched)} site(s)"
    log.info("kv_store: %d attention site(s) of %s keep their KV in in-place buffers owned by the cache",
             len(matched), getattr(ctx, "graph_id", "?"))
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped, stats=stats)
