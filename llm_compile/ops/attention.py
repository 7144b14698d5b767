"""``llmaccel::attention``: the one canonical attention op every attention pass targets.

Contract (SDPA semantics)::

    attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, k_all=None, v_all=None) -> out
      q        [B, Hq,  Lq, D]
      k, v     [B, Hkv, Ln, D] / [B, Hkv, Ln, Dv]   keys/values produced by this call ("new")
      k_cache  [B, Hkv, Lp, D] or None              cached keys/values before this call
      v_cache  [B, Hkv, Lp, Dv] or None
      attn_mask  None, bool (True = attend) or additive float, broadcastable to [B, Hq, Lq, Lp+Ln]
      scale    softmax scale (float)
      is_causal  SDPA's is_causal (top-left aligned), only used without attn_mask
      site     stable id of the attention site (its layer index in graph order)
      k_all, v_all  optional: the graph's own ``cat([k_cache, k], -2)`` (the model's cache update);
               when given, implementations read it instead of concatenating a second time
      out      [B, Hq, Lq, Dv], dtype of q, in B, Lq, Hq, Dv memory order (see attention_out_like)

    Keys attended are cat([k_cache, k], -2); GQA: query head h uses KV head h // (Hq // Hkv).

The cache append itself (``cat([past_k, k_new], -2)`` returned to the model's KV cache) stays in
the graph: this op only *reads* the cache; passes that move the cache elsewhere (offload) rewrite it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_not_phantom(t: Tensor | None, what: str = "KV cache") -> None:
    """Raise if ``t`` is a phantom cache (``llmaccel::kv_phantom``: all strides 0, its values are
    not the keys/values, which live in attention workers). Cheap: reads the strides only."""
    if t is not None and t.dim() and t.numel() > 1 and not any(t.stride()):
        raise RuntimeError(
            f"llmaccel: local attention received a phantom {what} of shape {tuple(t.shape)} (all "
            "strides 0): its keys/values live in attention-offload workers, and reading it would "
            "attend to zeros. This site was not offloaded (see the attention_offload record in "
            "passes.json / llm_compile.backend.COMPILED), or a cache filled under offload was "
            "passed to a model compiled without it.")


def full_kv(k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
            k_all: Tensor | None = None, v_all: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keys/values attended by the call: the cache followed by the new ones. A phantom cache
    (offloaded KV, see :func:`check_not_phantom`) raises ``RuntimeError``."""
    check_not_phantom(k_cache, "key cache")
    check_not_phantom(v_cache, "value cache")
    if k_all is not None and v_all is not None:
        return k_all, v_all
    if k_cache is None:
        return k, v
    return torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                    is_causal: bool) -> Tensor:
    """SDPA over full K/V with GQA handled by head grouping (no copy of K/V per query head)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"llmaccel::attention: {hq} query heads is not a multiple of {hkv} KV heads")
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=bool(is_causal) and attn_mask is None,
        scale=scale, enable_gqa=hq != hkv,
    )


def attention_out_like(q: Tensor, v: Tensor) -> Tensor:
    """Empty output [B, Hq, Lq, Dv] laid out in B, Lq, Hq, Dv memory order (as flash attention's).

    Every attention op of this package returns this layout, so the ``transpose(1, 2)`` + ``view``
    that models apply to the output stays a free view.
    """
    b, hq, lq, _ = q.shape
    return q.new_empty((b, lq, hq, v.shape[-1])).transpose(1, 2)


def to_out_layout(out: Tensor) -> Tensor:
    """Copy ``out`` into the layout of :func:`attention_out_like` (no copy if already there)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("llmaccel::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
              attn_mask: Tensor | None, scale: float, is_causal: bool, site: int,
              k_all: Tensor | None = None, v_all: Tensor | None = None) -> Tensor:
    kf, vf = full_kv(k, v, k_cache, v_cache, k_all, v_all)
    return to_out_layout(dense_attention(q, kf, vf, attn_mask, scale, is_causal))


@attention.register_fake
def _(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, k_all=None, v_all=None):
    return attention_out_like(q, v)


def filled_length(cache_position: Tensor) -> int:
    """Rows of a static cache buffer that hold keys after this call: ``cache_position[-1] + 1``."""
    return int(cache_position[-1]) + 1


def filled_rows(k_all: Tensor, v_all: Tensor, attn_mask: Tensor | None, end: int):
    """The first ``end`` rows of static buffers (and the matching mask columns)."""
    if attn_mask is not None and attn_mask.shape[-1] > end:
        attn_mask = attn_mask[..., :end]
    return k_all[:, :, :end], v_all[:, :, :end], attn_mask


@torch.library.custom_op("llmaccel::static_attention", mutates_args=())
def static_attention(q: Tensor, k_all: Tensor, v_all: Tensor, cache_position: Tensor,
                     anchor: Tensor | None, k_buf: Tensor | None, attn_mask: Tensor | None,
                     scale: float, is_causal: bool, site: int) -> Tensor:
    """Attention over a preallocated (HF ``StaticCache``) buffer: ``k_all``/``v_all`` are the
    buffers ``[B, Hkv, max_len, D]`` after this call's rows were written at ``cache_position``;
    only the filled rows ``[:cache_position[-1] + 1]`` are read (and the mask's matching columns),
    never the unwritten tail. ``anchor`` (the layer's ``cumulative_length`` tensor) and ``k_buf``
    (the key buffer graph input, None when the graph creates it) are not read here: they are where
    stateful forms (``static_swa_attention``) keep and check their per-sequence state."""
    kf, vf, mask = filled_rows(k_all, v_all, attn_mask, filled_length(cache_position))
    return to_out_layout(dense_attention(q, kf, vf, mask, scale, is_causal))


@static_attention.register_fake
def _(q, k_all, v_all, cache_position, anchor, k_buf, attn_mask, scale, is_causal, site):
    return attention_out_like(q, v_all)
