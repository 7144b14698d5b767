"""Schemas of the sparse-window-attention ops (implementations: :mod:`llm_compile.runtime.swa.op`).

``ops`` imports nothing from ``runtime``: this module only *declares* the ops (schema + fake
kernel, so passes and Inductor can place them); importing :mod:`llm_compile.runtime` registers
their implementations. Contracts::

    swa_attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, swa)
        -> (out, k_full, v_full)
      llmaccel::attention's arguments (``swa`` = the SWAConfig as JSON, see
      :func:`swa_config_json`), plus the cache after this call: ``k_full = cat([k_cache, k], -2)``
      (``k`` at prefill), a fresh tensor that carries the sequence's SWA state as an attribute.
      The pass makes the graph return ``k_full``/``v_full`` to the model's cache instead of its own
      ``cat``, so the state lives in the caller's cache object and dies with it.

    static_swa_attention(q, k_all, v_all, cache_position, anchor, k_buf, attn_mask, scale,
                         is_causal, site, swa) -> out
      llmaccel::static_attention (HF StaticCache) under SWA; the state is kept on ``anchor`` (the
      cache layer's ``cumulative_length`` tensor), reset when ``cache_position[0] == 0``.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from llm_compile.ops.attention import attention_out_like

torch.library.define(
    "llmaccel::swa_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? k_cache, Tensor? v_cache, Tensor? attn_mask, float scale, "
    "bool is_causal, int site, str swa) -> (Tensor, Tensor, Tensor)")
torch.library.define(
    "llmaccel::static_swa_attention",
    "(Tensor q, Tensor k_all, Tensor v_all, Tensor cache_position, Tensor anchor, Tensor? k_buf, "
    "Tensor? attn_mask, float scale, bool is_causal, int site, str swa) -> Tensor")


def cache_after(past, new):
    """Fake of ``cat([past, new], -2)`` (``new`` alone when ``past`` is None)."""
    if past is None:
        return torch.empty_like(new, memory_format=torch.contiguous_format)
    shape = list(new.shape)
    shape[-2] = past.shape[-2] + new.shape[-2]
    return new.new_empty(shape)


@torch.library.register_fake("llmaccel::swa_attention")
def _(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, swa):
    return attention_out_like(q, v), cache_after(k_cache, k), cache_after(v_cache, v)


@torch.library.register_fake("llmaccel::static_swa_attention")
def _(q, k_all, v_all, cache_position, anchor, k_buf, attn_mask, scale, is_causal, site, swa):
    return attention_out_like(q, v_all)


def swa_config_json(cfg) -> str:
    """An ``SWAConfig`` as the compact JSON string the ops carry (``""`` = dense)."""
    if cfg is None:
        return ""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True, separators=(",", ":"))
