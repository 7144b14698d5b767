"""``llmaccel::stored_attention``: attention whose KV cache lives in the in-process KV store.

Contract: exactly ``llmaccel::offload_attention``'s (:mod:`llm_compile.ops.offload`), with
``pool_handle`` the runtime handle of a :class:`~llm_compile.runtime.kv_store.LocalKVStore`::

    stored_attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site,
                     pool_handle, swa_handle) -> out [B, Hq, Lq, Dv]

* no cache (prefill): (current instance, site) is reset with the new K/V (dense: attention runs
  on them directly; SWA, ``swa_handle`` != 0: through the store, which seeds the token scores).
* with cache (decode): ``k_cache``/``v_cache`` are the phantoms (``llmaccel::kv_phantom``) the
  previous step returned to the model; only their length is read and checked against the store.
  ``k``/``v`` are appended in place and attention runs over the stored cache.
"""
from __future__ import annotations

from llm_compile.ops.offload import define_external_attention_op

stored_attention = define_external_attention_op("stored_attention", "kv_store")
