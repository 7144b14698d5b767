"""``llmaccel::swa_attention``: ``llmaccel::attention`` under sparse window attention (ALISA).

Contract: exactly :mod:`llm_compile.ops.attention`'s, plus ``handle``::

    swa_attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, handle,
                  k_all=None, v_all=None) -> out

(``k_all``/``v_all``: the graph's own cache concatenation, read instead of concatenating again.)

``handle`` comes from :func:`llm_compile.runtime.context.register_handle` and maps to the
``SWAConfig``; the pass ``sparse_window_attention`` bakes it into the graph. State (token scores)
is kept per (model instance, site) in :mod:`llm_compile.runtime.swa`; a call without cache
(prefill) resets it. Output shape, dtype and memory layout ([B, Lq, Hq, Dv] order, see
:func:`~llm_compile.ops.attention.attention_out_like`) are those of ``llmaccel::attention``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.ops.attention import attention_out_like, to_out_layout
from llm_compile.runtime.context import lookup_handle


@torch.library.custom_op("llmaccel::swa_attention", mutates_args=())
def swa_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                  attn_mask: Tensor | None, scale: float, is_causal: bool, site: int,
                  handle: int, k_all: Tensor | None = None, v_all: Tensor | None = None) -> Tensor:
    from llm_compile.runtime.swa import swa_attention_impl  # lazy: runtime.swa imports llm_compile.ops

    cfg = lookup_handle(handle)
    out = swa_attention_impl(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, cfg,
                             k_all, v_all)
    return to_out_layout(out)


@swa_attention.register_fake
def _(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, handle, k_all=None, v_all=None):
    return attention_out_like(q, v)
