"""``llmaccel::stored_attention``: attention whose KV cache lives in the in-process KV store.

Contract: exactly ``llmaccel::offload_attention``'s (:mod:`llm_compile.ops.offload`), with
``store_handle`` the runtime handle of a :class:`~llm_compile.runtime.kv_store.LocalKVStore`::

    stored_attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site,
                     store_handle, swa_handle) -> out [B, Hq, Lq, Dv]

* no cache (prefill): (current instance, site) is reset with the new K/V (dense: attention runs
  on them directly; SWA, ``swa_handle`` != 0: through the store, which seeds the token scores).
* with cache (decode): ``k_cache``/``v_cache`` are the phantoms (``llmaccel::kv_phantom``) the
  previous step returned to the model; only their length is read and checked against the store.
  ``k``/``v`` are appended in place and attention runs over the stored cache.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.ops.attention import attention_out_like
from llm_compile.ops.offload import external_attention
from llm_compile.runtime.context import lookup_handle


@torch.library.custom_op("llmaccel::stored_attention", mutates_args=())
def stored_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                     attn_mask: Tensor | None, scale: float, is_causal: bool, site: int,
                     store_handle: int, swa_handle: int) -> Tensor:
    return external_attention(lookup_handle(store_handle), "kv_store", q, k, v, k_cache, attn_mask,
                              scale, is_causal, site, swa_handle)


@stored_attention.register_fake
def _(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, store_handle, swa_handle):
    return attention_out_like(q, v)
