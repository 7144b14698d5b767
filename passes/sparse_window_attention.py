"""Pass: sparse window attention (ALISA) — swap every canonical attention site for its SWA form.

``canonicalize_attention`` has already turned each attention site into ``llmaccel::attention``
(or ``llmaccel::static_attention`` over an HF ``StaticCache``); this pass replaces each by
``llmaccel::swa_attention`` (``static_swa_attention``) with the same arguments plus the
``SWAConfig`` as a JSON string, so the graph carries its configuration, not a handle into process
state. Prefill stays dense and seeds the token scores; each decode step attends only to
sinks + recent + top-scored tokens.

State is per sequence and owned by the caller's cache: ``swa_attention`` returns the cache after
the call (``cat([past, new], -2)``) carrying the scores, and the graph returns *that* to the
model's cache instead of its own ``cat`` (see :mod:`llm_compile.runtime.swa.op`).

Before (one decode site)::

    cat = aten.cat.default([arg_past_k, k_new], -2)          # cache append, returned to the cache
    cat_1 = aten.cat.default([arg_past_v, v_new], -2)
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, mask,
                                           0.125, False, 0, cat, cat_1)
    return (cat_1, cat, ..., logits)

After::

    swa_attention = llmaccel.swa_attention.default(q, k_new, v_new, arg_past_k, arg_past_v, mask,
                                                   0.125, False, 0, '{"bucket":64,...}')
    getitem = swa_attention[0]                    # attention output
    getitem_1 = swa_attention[1]                  # cat([past_k, k_new]) carrying the SWA state
    getitem_2 = swa_attention[2]
    return (getitem_2, getitem_1, ..., logits)

``PassResult.matched``: one entry per site (site id, node names, the budget rule);
``stats``: the config as a dict.
"""
from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx

import llm_compile.ops  # noqa: F401  (declares the llmaccel:: ops)
from llm_compile.ops.swa import swa_config_json
from llm_compile.passes.attention_patterns import call_args, is_cache_append, static_cache_write
from llm_compile.passes.base import PassContext, PassResult
from llm_compile.passes.kv_relocation import fake_call
from llm_compile.passes.sliding_window import sliding_window_of, sliding_window_reason
from llm_compile.runtime import swa as _swa_runtime  # noqa: F401  (registers the op implementations)
from llm_compile.runtime.swa.state import describe_policy

log = logging.getLogger(__name__)

ATTENTION = torch.ops.llmaccel.attention.default
STATIC = torch.ops.llmaccel.static_attention.default
SWA = torch.ops.llmaccel.swa_attention.default
STATIC_SWA = torch.ops.llmaccel.static_swa_attention.default


def _with_val(g, target, args, vals=None):
    node = g.call_function(target, args)
    vals = vals or [x.meta.get("val") if isinstance(x, torch.fx.Node) else x for x in args]
    fake = fake_call(lambda *xs: target(*xs), *vals)
    if fake is not None:
        node.meta["val"] = fake
    return node


def _returns_cache(node: torch.fx.Node, outs) -> bool:
    """Does the graph return this site's cache after the call (``k`` at prefill, the ``cat`` at
    decode) as it is? (A sliding-window cache layer returns a slice of it instead.)"""
    a = call_args(node)
    if node.target is STATIC:
        return True
    past, fresh = a["k_cache"], a["k"]
    return any((past is None and o is fresh) or (past is not None and is_cache_append(o, past, fresh))
               for o in outs)


def _key_buffer(a: dict) -> torch.fx.Node | None:
    """The StaticCache key buffer (graph input) a static site writes, for the op's check that the
    buffer was not replaced since its prefill (``canonicalize_attention`` leaves it out of the dense
    op). Costs a copy of the buffer per step: Inductor cannot re-inplace a write whose old value is
    still read."""
    if a["k_buf"] is not None:
        return a["k_buf"]
    st = static_cache_write(a["k_all"]) if isinstance(a["k_all"], torch.fx.Node) else None
    return st.buffer if st is not None and st.buffer.op == "placeholder" else None


def _rewrite(g: torch.fx.Graph, node: torch.fx.Node, text: str) -> torch.fx.Node:
    a = call_args(node)
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    if node.target is STATIC:
        if a["anchor"] is None:
            raise ValueError(f"{node.name}: StaticCache site without its cumulative_length tensor: "
                             "cannot keep SWA state for it")
        args = (a["q"], a["k_all"], a["v_all"], a["cache_position"], a["anchor"], _key_buffer(a),
                a["attn_mask"], a["scale"], a["is_causal"], a["site"], text)
        with g.inserting_before(node):
            new = _with_val(g, STATIC_SWA, args)
        node.replace_all_uses_with(new)
        return new
    args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], a["attn_mask"], a["scale"],
            a["is_causal"], a["site"], text)
    with g.inserting_before(node):
        new = _with_val(g, SWA, args)
        parts = [g.call_function(operator.getitem, (new, i)) for i in range(3)]
    for p, v in zip(parts, new.meta.get("val") or ()):
        p.meta["val"] = v
    node.replace_all_uses_with(parts[0])
    if isinstance(out_node.args[0], (tuple, list)):  # the returned cache is the op's (with state)
        outs = list(out_node.args[0])
        for i, o in enumerate(outs):
            for past, fresh, part in ((a["k_cache"], a["k"], parts[1]), (a["v_cache"], a["v"], parts[2])):
                if (past is None and o is fresh) or (past is not None and is_cache_append(o, past, fresh)):
                    outs[i] = part
        out_node.args = (tuple(outs),) + tuple(out_node.args[1:])
    return new


def run(gm: torch.fx.GraphModule, config, ctx: PassContext | None = None) -> PassResult:
    """Rewrite the canonical attention ops of ``gm`` to their SWA forms (in place).

    ``config`` is an ``LLMAccelConfig`` (its ``swa`` section is used) or an ``SWAConfig``.
    """
    cfg = getattr(config, "swa", config)
    if cfg is None:
        return PassResult(changed=False, skipped=[{"reason": "swa is off"}])
    text = swa_config_json(cfg)
    rule = describe_policy(cfg)
    matched, skipped = [], []
    g = gm.graph
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    outs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else []
    sites = [n for n in g.nodes if n.op == "call_function" and n.target in (ATTENTION, STATIC)]
    keeps = {n: _returns_cache(n, outs) for n in sites}
    for node in sites:
        window = sliding_window_of(node)  # issue 13 item 10: a rolling cache, leave the site dense
        if window is not None:
            skipped.append({"node": node.name, "site": call_args(node)["site"],
                            "reason": sliding_window_reason(window)})
            continue
        if any(keeps.values()) and not keeps[node]:
            skipped.append({"node": node.name, "site": call_args(node)["site"],
                            "reason": "the model keeps something else than this site's full cache "
                                      "(a sliding-window cache layer?): SWA state could not follow "
                                      "the sequence, site left dense"})
            continue
        try:
            new = _rewrite(g, node, text)
        except (ValueError, KeyError) as e:
            skipped.append({"node": node.name, "reason": str(e)})
            continue
        site = call_args(new)["site"]
        matched.append({"site": site, "node": node.name, "new_node": new.name,
                        "cached": node.target is STATIC or call_args(node)["k_cache"] is not None,
                        "static_cache": node.target is STATIC, "budget": rule})
        g.erase_node(node)
        log.debug("swa: site %s (%s) -> %s", site, node.name, new.name)
    if matched:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    if skipped:
        log.warning("llmaccel swa: %d attention site(s) of %s left dense: %s", len(skipped),
                    getattr(ctx, "graph_id", "?"), skipped[0]["reason"])
    stats = {"config": dataclasses.asdict(cfg), "sites": len(matched)}
    log.info("swa: rewrote %d attention site(s) in %s (%s)", len(matched),
             getattr(ctx, "graph_id", "?"), rule)
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped, stats=stats)
