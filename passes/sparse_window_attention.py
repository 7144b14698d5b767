"""Pass: sparse window attention (ALISA) — swap every canonical attention site for its SWA form.

``canonicalize_attention`` has already turned each attention site into ``llmaccel::attention``;
this pass replaces each such node by ``llmaccel::swa_attention`` with the same arguments plus an
int ``handle`` (the optional ``k_all``/``v_all`` travel as keywords) that maps, at run time, to the ``SWAConfig`` (one handle per distinct config). The
op keeps per-(model instance, site) token scores in :mod:`llm_compile.runtime.swa`: prefill stays
dense and seeds them, each decode step attends only to sinks + recent + top-scored tokens.

Before (one decode site)::

    cat = aten.cat.default([arg_past_k, k_new], -2)          # cache append, stays
    cat_1 = aten.cat.default([arg_past_v, v_new], -2)
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, mask,
                                           0.125, False, 0)

After::

    cat = aten.cat.default([arg_past_k, k_new], -2)
    cat_1 = aten.cat.default([arg_past_v, v_new], -2)
    swa_attention = llmaccel.swa_attention.default(q, k_new, v_new, arg_past_k, arg_past_v, mask,
                                                   0.125, False, 0, 1)   # handle 1 -> SWAConfig

``PassResult.matched``: one entry per site (site id, node names, the budget rule);
``stats``: the config as a dict and the handle.
"""
from __future__ import annotations

import dataclasses
import logging
import threading

import torch
import torch.fx

import llm_compile.ops.attention  # noqa: F401  (registers llmaccel::attention)
import llm_compile.ops.swa  # noqa: F401  (registers llmaccel::swa_attention)
from llm_compile.passes.base import PassContext, PassResult
from llm_compile.passes.sliding_window import sliding_window_of, sliding_window_reason
from llm_compile.runtime.context import register_handle
from llm_compile.runtime.swa_state import describe_policy

log = logging.getLogger(__name__)

ATTN_ARGS = ("q", "k", "v", "k_cache", "v_cache", "attn_mask", "scale", "is_causal", "site")
OPTIONAL_ARGS = ("k_all", "v_all")
_handles: dict = {}
_lock = threading.Lock()


def handle_for(cfg) -> int:
    """The runtime handle of an ``SWAConfig`` (frozen, so equal configs share one handle)."""
    with _lock:
        h = _handles.get(cfg)
        if h is None:
            h = _handles[cfg] = register_handle(cfg)
        return h


def _attention_args(node: torch.fx.Node) -> tuple[list, dict]:
    """The 9 required arguments of an ``llmaccel::attention`` node, positional, and its optional
    ``k_all``/``v_all`` (as keywords), whatever way the node was built."""
    vals = list(node.args[:9])
    for name in ATTN_ARGS[len(vals):]:
        if name not in node.kwargs:
            raise ValueError(f"{node.name}: llmaccel::attention without argument {name!r}")
        vals.append(node.kwargs[name])
    extra = dict(zip(OPTIONAL_ARGS, node.args[9:]))
    extra.update({n: node.kwargs[n] for n in OPTIONAL_ARGS if n in node.kwargs})
    return vals, {n: a for n, a in extra.items() if a is not None}


def run(gm: torch.fx.GraphModule, config, ctx: PassContext | None = None) -> PassResult:
    """Rewrite ``llmaccel.attention`` -> ``llmaccel.swa_attention`` in ``gm`` (in place).

    ``config`` is an ``LLMAccelConfig`` (its ``swa`` section is used) or an ``SWAConfig``.
    """
    cfg = getattr(config, "swa", config)
    if cfg is None:
        return PassResult(changed=False, skipped=[{"reason": "swa is off"}])
    attention = torch.ops.llmaccel.attention.default
    swa = torch.ops.llmaccel.swa_attention.default
    handle = handle_for(cfg)
    rule = describe_policy(cfg)
    matched, skipped = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not attention:
            continue
        try:
            args, extra = _attention_args(node)
        except ValueError as e:
            skipped.append({"node": node.name, "reason": str(e)})
            continue
        window = sliding_window_of(node)  # issue 13 item 10: a rolling cache, leave the site dense
        if window is not None:
            skipped.append({"site": args[8], "node": node.name, "reason": sliding_window_reason(window)})
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(swa, tuple(args) + (handle,), extra)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        site = args[8]
        matched.append({"site": site, "node": node.name, "new_node": new.name,
                        "cached": args[3] is not None, "budget": rule})
        log.debug("swa: site %s (%s) -> %s", site, node.name, new.name)
    if matched:
        gm.graph.lint()
        gm.recompile()
    stats = {"config": dataclasses.asdict(cfg), "handle": handle, "sites": len(matched)}
    log.info("swa: rewrote %d attention site(s) in %s (%s)", len(matched),
             getattr(ctx, "graph_id", "?"), rule)
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped, stats=stats)
