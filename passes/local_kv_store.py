"""Pass: local KV store — attention sites keep their KV cache in this process's in-place store.

Hugging Face's ``DynamicCache`` appends each decode token with ``cat([past_k, k_new], -2)`` inside
the graph: a copy of the whole cache per layer per step, which at long context costs more than
the attention that reads it (and sparse window attention, which reads only a budget of it, cannot
remove it). This pass turns every canonical attention site (``llmaccel::attention``, or
``llmaccel::swa_attention`` after the SWA pass) into ``llmaccel::stored_attention``: the KV lives in
a :class:`~llm_compile.runtime.kv_store.LocalKVStore` (preallocated, appended in place, grown by a
factor when full), attention runs over views of it, and the cache tensors the graph returns to
the model become zero-memory phantoms (``llmaccel::kv_phantom``) so the model's cache still
reports the right length. The rewrite is attention offload's (:func:`~llm_compile.passes.
attention_offload.move_kv_out`) with an in-process store instead of worker processes.

Before (decode step of one layer)::

    cat_2 = aten.cat.default([arg_past_k, k_new], -2)      # whole-cache copy, returned to the cache
    cat_3 = aten.cat.default([arg_past_v, v_new], -2)
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, None, 0.125,
                                           False, 0, cat_2, cat_3)
    return (cat_3, cat_2, ..., logits)

After::

    stored_attention = llmaccel.stored_attention.default(q, k_new, v_new, arg_past_k, arg_past_v,
                                                         None, 0.125, False, 0, 5, 0)  # store 5, dense
    kv_phantom = llmaccel.kv_phantom.default(arg_past_v, v_new)    # [B, Hkv, L+1, D], 4 bytes
    kv_phantom_1 = llmaccel.kv_phantom.default(arg_past_k, k_new)
    return (kv_phantom, kv_phantom_1, ..., logits)

The last argument is the SWA handle (0 = dense): SWA sites keep their token scores in the store
next to their KV. All or nothing, as for offload: a site whose cache append feeds anything but the
returned cache, or whose cache the graph does not return while other sites' caches are returned,
makes the pass raise, and the manager leaves the whole graph as it was. A graph that returns no
cache at all (a forward with ``use_cache=False``) is left unchanged without an error.
"""
from __future__ import annotations

import logging

import torch.fx

from llm_compile.config import LLMAccelConfig
from llm_compile.passes.attention_offload import STORED, move_kv_out
from llm_compile.passes.base import PassContext, PassResult
from llm_compile.passes.sliding_window import sliding_window_of, sliding_window_reason
from llm_compile.runtime.context import register_handle

log = logging.getLogger(__name__)
_STORE_HANDLES: dict[int, int] = {}


def store_handle(store) -> int:
    """One runtime handle per store (shared by the prefill and decode graphs)."""
    h = _STORE_HANDLES.get(id(store))
    if h is None:
        h = _STORE_HANDLES[id(store)] = register_handle(store)
    return h


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext | None = None) -> PassResult:
    from llm_compile.runtime.kv_store import get_store

    handle = store_handle(get_store(config.kv_store))
    sliding = [(n, w) for n in gm.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.llmaccel.attention.default, torch.ops.llmaccel.swa_attention.default)
               and (w := sliding_window_of(n)) is not None]
    if sliding:  # all or nothing: a rolling cache cannot live in the in-place store
        skipped = [{"node": n.name, "reason": f"kv_store left off for this graph: {sliding_window_reason(w)}"}
                   for n, w in sliding]
        return PassResult(changed=False, skipped=skipped, stats={"sites": 0, "store_handle": handle})
    matched = move_kv_out(gm, STORED, lambda: handle, "kv_store", require_returned_cache=True)
    skipped = [] if matched else [{"reason": "no attention site whose K/V cache the graph returns "
                                             "(no cache kept, e.g. use_cache=False): nothing to store"}]
    stats = {"sites": len(matched), "store_handle": handle,
             "reserve_tokens": config.kv_store.reserve_tokens, "growth": config.kv_store.growth}
    log.info("kv_store: %d attention site(s) of %s keep their KV in the in-place store", len(matched),
             getattr(ctx, "graph_id", "?"))
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped, stats=stats)
