"""Implementations of ``llmaccel::swa_attention`` and ``llmaccel::static_swa_attention``
(schemas: :mod:`llm_compile.ops.swa`), with the SWA state owned by the sequence's cache.

Where the state lives:

* ``swa_attention`` (a ``DynamicCache``-like cache whose tensors the graph returns): the op
  returns the cache after the call (``cat([k_cache, k], -2)``) and hangs a :class:`SiteState` on
  that tensor (``tensor.llmaccel_state``); the model's cache stores the tensor, and the next decode
  step receives it back as ``k_cache``. A new sequence (prefill) starts a new state; another
  sequence's cache carries its own state. Nothing is looked up by model identity.
* ``static_swa_attention`` (HF ``StaticCache``): the state hangs on the cache layer's
  ``cumulative_length`` tensor (``anchor``), which lives as long as the cache; it is reset when the
  call writes at position 0, and checked against the write position and key buffer otherwise.

A decode step whose cache carries no state, or a state that does not match it (length, batch,
site, buffer), raises :class:`SequenceStateError`, never attends with the wrong scores.
"""
from __future__ import annotations

import torch
from torch import Tensor

import llm_compile.ops.swa  # noqa: F401  (declares the ops)
from llm_compile.ops.attention import (check_not_phantom, dense_attention, filled_length, filled_rows,
                                       to_out_layout)
from llm_compile.runtime.swa.policies import config_from_json
from llm_compile.runtime import dense_prefix
from llm_compile.runtime.swa.step import new_state, restart_step, swa_step

STATE_ATTR = "llmaccel_state"
FIX = ("Use llm_compile.LLMAccelCache for beam search and assisted decoding (it reorders and crops "
       "the state with the KV), or start the sequence again with a prefill")


class SequenceStateError(RuntimeError):
    """A decode step got a cache whose per-sequence state is missing or does not match it."""


class SiteState:
    """One attention site's SWA state for one cache (batch of sequences)."""

    def __init__(self, site: int, state, buffer_ptr: int = 0) -> None:
        self.site, self.state, self.buffer_ptr = site, state, buffer_ptr

    def map_batch(self, fn) -> "SiteState":
        return SiteState(self.site, self.state.map_batch(fn), self.buffer_ptr)

    def crop(self, n: int) -> "SiteState":
        return SiteState(self.site, self.state.crop(n), self.buffer_ptr)


def attach(t: Tensor, obj) -> Tensor:
    setattr(t, STATE_ATTR, obj)
    return t


def state_of(t: Tensor | None):
    return None if t is None else getattr(t, STATE_ATTR, None)


def _checked(holder, site: int, n: int, what: str):
    if holder is None:
        raise SequenceStateError(
            f"llmaccel swa: site {site}: the {what} passed to this decode step carries no SWA state: "
            "it was not produced by this compiled model for this sequence (a cache filled without "
            f"swa, reordered by beam search, cropped, or copied). {FIX}")
    if holder.site != site:
        raise SequenceStateError(f"llmaccel swa: site {site} got the cache state of site {holder.site}")
    if holder.state.n != n:
        raise SequenceStateError(
            f"llmaccel swa: site {site}: the cache holds {n} tokens, its SWA state covers "
            f"{holder.state.n}: the cache was changed outside the compiled model or belongs to an "
            f"earlier step. {FIX}")
    return holder


def _cat(past: Tensor | None, new: Tensor) -> Tensor:
    return new.contiguous().clone() if past is None else torch.cat([past, new], dim=-2)


@torch.library.impl("llmaccel::swa_attention", "CompositeExplicitAutograd")
def swa_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                  attn_mask: Tensor | None, scale: float, is_causal: bool, site: int, swa: str):
    cfg = config_from_json(swa)
    check_not_phantom(k_cache, "key cache")
    check_not_phantom(v_cache, "value cache")
    k_full, v_full = _cat(k_cache, k), _cat(v_cache, v)
    if cfg is None or cfg.sparsity == 0:
        out = dense_attention(q, k_full, v_full, attn_mask, scale, is_causal)
        return to_out_layout(out), k_full, v_full
    adopt = k_cache is not None and state_of(k_cache) is None and dense_prefix.is_marked(k_cache)
    if k_cache is None or adopt:
        holder = SiteState(site, new_state(q.shape[0], k.shape[1], q.device, cfg))
    else:
        holder = _checked(state_of(k_cache), site, k_cache.shape[-2], "KV cache")
    if adopt:  # a cache filled by the dense graph below swa.min_context
        out = restart_step(holder.state, q, k_full, v_full, scale, cfg, attn_mask=attn_mask,
                           is_causal=is_causal)
    else:
        out = swa_step(holder.state, q, k_full, v_full, scale, cfg, attn_mask=attn_mask,
                       is_causal=is_causal)
    attach(k_full, holder)
    attach(v_full, holder)
    return to_out_layout(out), k_full, v_full


@torch.library.impl("llmaccel::static_swa_attention", "CompositeExplicitAutograd")
def static_swa_attention(q: Tensor, k_all: Tensor, v_all: Tensor, cache_position: Tensor,
                         anchor: Tensor, k_buf: Tensor | None, attn_mask: Tensor | None,
                         scale: float, is_causal: bool, site: int, swa: str) -> Tensor:
    cfg = config_from_json(swa)
    end = filled_length(cache_position)
    kf, vf, mask = filled_rows(k_all, v_all, attn_mask, end)
    if cfg is None or cfg.sparsity == 0:
        return to_out_layout(dense_attention(q, kf, vf, mask, scale, is_causal))
    start = int(cache_position[0])
    buf_ptr = (k_buf if k_buf is not None else k_all).data_ptr()
    if start == 0:  # a new sequence in this cache
        holder = attach(anchor, SiteState(site, new_state(q.shape[0], kf.shape[1], q.device, cfg), buf_ptr))
        holder = state_of(anchor)
    else:
        holder = _checked(state_of(anchor), site, start, "StaticCache layer")
        if holder.buffer_ptr != buf_ptr or holder.state.batch != q.shape[0]:
            raise SequenceStateError(
                f"llmaccel swa: site {site}: the StaticCache's key buffer was replaced since its "
                f"prefill (beam-search reorder?), so the SWA state no longer matches it. {FIX}")
    return to_out_layout(swa_step(holder.state, q, kf, vf, scale, cfg, attn_mask=mask,
                                  is_causal=is_causal))
