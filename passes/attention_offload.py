"""Pass: attention offload (Lamina) — attention runs on attention workers holding the KV cache.

Every canonical attention site (``llmaccel::attention``, or ``llmaccel::swa_attention`` when the SWA
pass ran first) becomes ``llmaccel::offload_attention`` with the same arguments (minus the
optional ``k_all``/``v_all`` cache appends, which no longer exist) plus a runtime
handle of the :class:`~llm_compile.runtime.offload_pool.AttentionWorkerPool` (one shared pool per
``OffloadConfig``, spawned on first use or joined via ``offload.init_method``) and the SWA handle
(0 = dense). The KV cache then lives only in the workers, so the cache tensors the graph *returns*
to the model (Hugging Face's ``DynamicCache`` stores them) become zero-memory phantoms
(``llmaccel::kv_phantom``: right shape, all strides 0, one element of storage), and the cache
append ``cat([past_k, k_new], -2)`` disappears from the compute device.

Before (decode step of one layer)::

    cat_2 = aten.cat.default([arg_past_k, k_new], -2)      # returned to the KV cache
    cat_3 = aten.cat.default([arg_past_v, v_new], -2)
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, None, 0.25, False, 0,
                                           cat_2, cat_3)
    ...
    return (cat_3, cat_2, ..., logits)

After::

    offload_attention = llmaccel.offload_attention.default(q, k_new, v_new, arg_past_k, arg_past_v,
                                                           None, 0.25, False, 0, 7, 0)  # pool handle 7
    ...
    kv_phantom = llmaccel.kv_phantom.default(arg_past_v, v_new)    # [B, Hkv, L+1, D], 4 bytes
    kv_phantom_1 = llmaccel.kv_phantom.default(arg_past_k, k_new)
    return (kv_phantom, kv_phantom_1, ..., logits)

At prefill (no cache) the returned cache is ``k``/``v`` themselves; they become
``kv_phantom(None, k)``. ``arg_past_k`` is the previous step's phantom: the op reads only its length
(checked against the workers' cache: a mismatch, e.g. a cropped cache, is a clear error).

The cut. Each ``offload_attention`` call is the boundary between compute partitions: Inductor
treats the custom op as an opaque extern call, so the graph compiles to fused compute kernels
(QKV projection + RoPE of layer i | O projection + FFN of layer i + QKV of layer i+1 | ...) with one
blocking round trip to the workers between them; with ``inner="eager"`` the graph runs as is.
:func:`split_at_attention` makes the same cut explicit with ``torch.fx.passes.split_module``
(``compute_0, attention_1, compute_2, ...``) for inspection or a custom scheduler.

Not done here: ``offload.overlap`` (two micro-batches in ping-pong inside the graph) — the pool's
``decode_async`` provides the mechanism; the pass reports ``overlap: "not applied"``.
Sites whose cache append feeds anything besides the returned cache are skipped (KV would stay).
"""
from __future__ import annotations

import logging

import torch
import torch.fx

import llm_compile.ops.attention  # noqa: F401  (registers llmaccel::attention)
import llm_compile.ops.offload  # noqa: F401  (registers llmaccel::offload_attention, kv_phantom)
from llm_compile.config import LLMAccelConfig
from llm_compile.passes.base import PassContext, PassResult
from llm_compile.runtime.context import register_handle

log = logging.getLogger(__name__)

aten = torch.ops.aten
OFFLOAD = torch.ops.llmaccel.offload_attention.default
PHANTOM = torch.ops.llmaccel.kv_phantom.default
_POOL_HANDLES: dict[int, int] = {}


def _site_targets():
    targets = {torch.ops.llmaccel.attention.default}
    if hasattr(torch.ops.llmaccel, "swa_attention"):
        targets.add(torch.ops.llmaccel.swa_attention.default)
    return targets


def pool_handle(pool) -> int:
    """One runtime handle per pool (shared by the prefill and decode graphs)."""
    h = _POOL_HANDLES.get(id(pool))
    if h is None:
        h = _POOL_HANDLES[id(pool)] = register_handle(pool)
    return h


def _is_append(node, past, new) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == aten.cat.default):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(node.args[0]) == [past, new] and dim % 4 == 2


def _cache_outputs(out_node: torch.fx.Node, past, new) -> list[int]:
    """Indices of the graph outputs that are the cache after this site (cat or, at prefill, new)."""
    outs = out_node.args[0]
    idx = []
    for i, o in enumerate(outs):
        if past is None and o is new:
            idx.append(i)
        elif past is not None and _is_append(o, past, new):
            idx.append(i)
    return idx


def _named_args(node: torch.fx.Node) -> dict:
    """The call's arguments by schema name (robust to optional trailing arguments)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _is_phantom_val(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val is not None and val.numel() > 1 and all(st == 0 for st in val.stride())


def _fake(fn, *vals):
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([v for v in vals if v is not None])
    if mode is None:
        return None
    with mode:
        return fn(*vals)


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext) -> PassResult:
    cfg = config.offload
    g = gm.graph
    targets = _site_targets()
    sites = [n for n in g.nodes if n.op == "call_function" and n.target in targets]
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    if not sites:
        return PassResult(changed=False, stats={"sites": 0})
    from llm_compile.runtime.offload_pool import get_pool

    pool = get_pool(cfg)
    handle = pool_handle(pool)
    matched, skipped = [], []
    outs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else None
    for node in sites:
        a = _named_args(node)
        q, k, v, kc, vc, mask = (a[n] for n in ("q", "k", "v", "k_cache", "v_cache", "attn_mask"))
        scale, causal, site, swa = a["scale"], a["is_causal"], a["site"], a.get("handle") or 0
        cache_idx = []
        if outs is not None:
            cache_idx = _cache_outputs(out_node, kc, k) + _cache_outputs(out_node, vc, v)
            if kc is not None:
                busy = [outs[i].name for i in cache_idx if set(outs[i].users) - {out_node, node}]
                if busy:
                    if _is_phantom_val(kc):
                        log.error("llmaccel: offload site %s cannot be cut but its cache is a phantom: "
                                  "its attention would read zeros", site)
                    skipped.append({"node": node.name, "site": site,
                                    "reason": f"cache append {busy} has users besides the graph output"})
                    continue
        with g.inserting_before(node):
            new = g.call_function(OFFLOAD, (q, k, v, kc, vc, mask, scale, causal, site, handle, swa))
        new.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ in ("val", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        g.erase_node(node)
        for i in cache_idx:
            past, fresh = (kc, k) if (outs[i] is k or (kc is not None and _is_append(outs[i], kc, k))) else (vc, v)
            with g.inserting_before(out_node):
                ph = g.call_function(PHANTOM, (past, fresh))
            val = _fake(PHANTOM, past.meta.get("val") if past is not None else None, fresh.meta.get("val"))
            if val is not None:
                ph.meta["val"] = val
            outs[i] = ph
        out_node.args = (tuple(outs),) + tuple(out_node.args[1:]) if outs is not None else out_node.args
        matched.append({"site": site, "node": new.name, "form": "swa" if swa else "dense",
                        "decode": kc is not None, "cache_outputs_phantomized": len(cache_idx)})
    if cfg.overlap:
        log.warning("llmaccel: offload.overlap (in-graph micro-batch ping-pong) is not applied by the "
                    "pass; use AttentionWorkerPool.decode_async to overlap by hand")
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped,
                      stats={"sites": len(matched), "workers": pool.n_workers, "pool_handle": handle,
                             "transport": pool.backend, "overlap": "not applied" if cfg.overlap else "off"})


def split_at_attention(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The cut made explicit: ``split_module`` into ``submod_0`` (compute), ``submod_1`` (one
    ``offload_attention`` call), ``submod_2`` (compute), ... in graph order."""
    from torch.fx.passes.split_module import split_module

    part = {"i": 0}

    def which(node: torch.fx.Node) -> int:
        if node.op == "call_function" and node.target == OFFLOAD:
            part["i"] += 2
            return part["i"] - 1
        return part["i"]

    return split_module(gm, gm, which, keep_original_order=True)
