"""Recognise attention sites of sliding-window layers (Mistral ``sliding_window``, Qwen2
``use_sliding_window``, Gemma2/3 local layers) in a canonicalised graph.

Hugging Face keeps, for such a layer, only the last ``w - 1`` keys/values
(``DynamicSlidingWindowLayer.update``: ``self.keys = full_key_states[:, :, -w + 1:, :]``), so the
graph slices the keys the site attends with a negative start along the sequence dim and returns
that slice as the new cache::

    cat_2 = aten.cat.default([arg_past_k, k_new], -2)                   # the keys attended
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, mask, 0.25,
                                           False, 1, cat_2, cat_3)
    slice_5 = aten.slice.Tensor(cat_2, 2, -7, 9223372036854775807)      # the cache kept: w = 8
    return (..., slice_5, ...)

In prefill the same slice is taken of the new keys (``k``). Passes that keep per-token state across
steps (SWA scores, the in-place KV store) cannot follow a cache that drops its oldest token every
step: they leave such sites alone, with this reason.
"""
from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten


def sliding_window_of(site: torch.fx.Node) -> int | None:
    """The layer's window ``w`` if ``site`` (an ``llmaccel::attention``-like node) belongs to a
    sliding-window layer, else ``None``."""
    keys = site.kwargs.get("k_all")
    if keys is None and len(site.args) > 9:
        keys = site.args[9]
    if keys is None:
        keys = site.args[1] if len(site.args) > 1 else site.kwargs.get("k")
    if not isinstance(keys, torch.fx.Node):
        return None
    for user in keys.users:
        if user.op != "call_function" or user.target is not aten.slice.Tensor or len(user.args) < 3:
            continue
        dim, start = user.args[1], user.args[2]
        if dim in (2, -2) and isinstance(start, int) and start < 0:
            return 1 - start
    return None


def sliding_window_reason(window: int) -> str:
    return (f"sliding-window layer (window {window}: the model's cache keeps only the last {window - 1} "
            "tokens and drops the oldest each step); per-token state cannot follow that cache, so the "
            "site runs as the model wrote it, attending its own window")
