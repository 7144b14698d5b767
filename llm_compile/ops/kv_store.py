"""Schema of ``llmaccel::stored_attention`` (implementation: :mod:`llm_compile.runtime.kv.store`).

Contract::

    stored_attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site,
                     reserve, growth, swa, tiers="", rec=None, rec_spec="") -> (out, k_phantom, v_phantom)

* ``out``: llmaccel::attention's result ([B, Hq, Lq, Dv], layout of ``attention_out_like``).
* The KV of this site lives in a :class:`~llm_compile.runtime.kv.buffer.SiteKV` (preallocated
  buffers with ``reserve`` free rows, grown by ``growth``) that the op attaches to the two
  phantoms it returns (zero-memory tensors of the cache's shape, see ``llmaccel::kv_phantom``).
  The graph returns the phantoms to the model's cache, so the KV belongs to that cache object.
* No cache (prefill): a new SiteKV holds ``k``/``v``. With cache (decode): ``k_cache`` must be the
  phantom this op returned at the previous step *of this sequence*; the new rows are appended in
  place. Anything else (a real tensor, a phantom without state, a length or site mismatch) raises.
* ``swa``: ``""`` for dense attention, else the SWAConfig as JSON (sparse window attention over
  the stored KV; its state lives next to the KV in the SiteKV).
* ``tiers``: ``""`` (all KV on the model's device), else the ``kv_tiers`` options as JSON plus the
  graph's number of sites (``"sites"``): the KV lives in a
  :class:`~llm_compile.runtime.tiers.store.TieredKV` (device and host tiers, ALISA's phases).
* ``rec``/``rec_spec``: with ``kv_tiers`` when phase 3 may run, what recomputes this site's K/V —
  the layer input, the projection weights (graph inputs) and RoPE rows — and a JSON spec of how
  (:mod:`~llm_compile.runtime.tiers.recompute`); ``None``/``""`` otherwise.
"""
from __future__ import annotations

import torch

from llm_compile.ops.attention import attention_out_like
from llm_compile.ops.swa import cache_after

torch.library.define(
    "llmaccel::stored_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? k_cache, Tensor? v_cache, Tensor? attn_mask, float scale, "
    "bool is_causal, int site, int reserve, float growth, str swa, str tiers=\"\", Tensor[]? rec=None, "
    "str rec_spec=\"\") -> (Tensor, Tensor, Tensor)")


def phantom_like(t):
    return t.new_empty_strided(t.shape, [0] * t.dim())


@torch.library.register_fake("llmaccel::stored_attention")
def _(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, reserve, growth, swa, tiers="", rec=(),
      rec_spec=""):
    return (attention_out_like(q, v), phantom_like(cache_after(k_cache, k)),
            phantom_like(cache_after(v_cache, v)))


