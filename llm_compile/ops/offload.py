"""``llmaccel::offload_attention``, ``llmaccel::offload_sequence`` and ``llmaccel::kv_phantom``:
attention whose KV cache lives in attention workers (Lamina), the sequence it belongs to, and the
zero-memory stand-in the model's cache keeps instead.

Contracts::

    offload_attention(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site,
                      pool_handle, swa_handle, seq=None) -> out
        exactly llmaccel::attention's arguments and math (out [B, Hq, Lq, Dv], layout of
        attention_out_like), plus
        pool_handle  runtime handle (register_handle) of the SharedPool of the offload config
        swa_handle   0 for dense attention, else the handle of an SWAConfig: the workers run
                     sparse window attention (ALISA) instead of dense
        seq          at prefill: the offload_sequence tensor naming the new sequence
        k_cache/v_cache are read only for their length and the sequence they name (phantoms).

      * no cache (prefill): the new K/V reset the (sequence, site) cache on the workers.
        Dense: the prompt attention runs here, locally (it is compute-bound, and Lamina prefills on
        the compute device too) and K/V are shipped without waiting for an answer. SWA: the
        workers run the prompt attention (it seeds their token scores) and return the output.
      * with cache (decode): q, k_new, v_new go to the workers (split by KV head) under the
        sequence the phantom cache names; they append k_new/v_new, attend, and return their
        query heads' output.

    offload_sequence(like, pool_handle) -> int64[2]
        a new sequence on the pool's workers (a SequenceHandle): 16 bytes (magic, id) whose storage
        keeps the handle alive; the offload pass puts one at the start of every prefill graph.

    kv_phantom(past, new, seq=None) -> [*new.shape[:-2], past.shape[-2] + new.shape[-2], D]
        a tensor with the shape of cat([past, new], -2) but all strides 0 and at most 16 bytes of
        storage: Hugging Face caches store it, so their bookkeeping (``get_seq_length`` reads
        ``keys.shape[-2]``) works while no KV stays on the compute device. Never read its values.
        When ``seq`` (prefill) or ``past`` (decode) names an offload sequence, the phantom names
        the same one and keeps it alive: the sequence's KV on the workers lives exactly as long as
        the cache that holds these phantoms (released when it is garbage-collected).
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from llm_compile.ops.attention import attention_out_like, dense_attention, to_out_layout
from llm_compile.runtime.context import lookup_handle
from llm_compile.runtime.offload.protocol import SUB_BATCH_SHIFT
from llm_compile.runtime.offload.sequences import OWNER_BYTES, live_handle, sequence_of, sequence_phantom

log = logging.getLogger(__name__)


def _phantom_shape(past: Tensor | None, new: Tensor) -> list:
    n = new.shape[-2] + (past.shape[-2] if past is not None else 0)
    return [*new.shape[:-2], n, new.shape[-1]]


@torch.library.custom_op("llmaccel::kv_phantom", mutates_args=())
def kv_phantom(past: Tensor | None, new: Tensor, seq: Tensor | None = None) -> Tensor:
    shape = _phantom_shape(past, new)
    seq_id = sequence_of(seq if seq is not None else past)
    if seq_id is not None:
        return sequence_phantom(live_handle(seq_id), new, shape)
    return new.new_zeros(1).as_strided(shape, [0] * len(shape))


@kv_phantom.register_fake
def _(past, new, seq=None):
    shape = _phantom_shape(past, new)
    return new.new_empty_strided(shape, [0] * len(shape))


@torch.library.custom_op("llmaccel::offload_sequence", mutates_args=())
def offload_sequence(like: Tensor, pool_handle: int) -> Tensor:
    return sequence_phantom(lookup_handle(pool_handle).new_sequence(), like)


@offload_sequence.register_fake
def _(like, pool_handle):
    return like.new_empty(2, dtype=torch.int64)


def is_phantom(t: Tensor) -> bool:
    """True for a :func:`kv_phantom` result (all strides 0, one element or a sequence's 16 bytes
    of storage)."""
    return t.numel() > 1 and all(s == 0 for s in t.stride()) and \
        t.untyped_storage().nbytes() <= max(t.element_size(), OWNER_BYTES)


_sub = threading.local()


@contextmanager
def sub_batch(h: int | None) -> Iterator[None]:
    """Offload calls in this block go to sub-batch ``h`` of their sequence (``offload.overlap``'s
    halves: each half is its own cache on the workers)."""
    prev = getattr(_sub, "h", None)
    _sub.h = h
    try:
        yield
    finally:
        _sub.h = prev


def worker_key(seq_id: int) -> int:
    """The workers' key of ``seq_id`` in the current :func:`sub_batch`."""
    h = getattr(_sub, "h", None)
    return seq_id if h is None else seq_id + ((h + 1) << SUB_BATCH_SHIFT)


def cache_sequence(k_cache: Tensor, site: int) -> int:
    """The sequence a decode step's (phantom) cache names, or a clear error."""
    seq_id = sequence_of(k_cache)
    if seq_id is None:
        raise RuntimeError(
            f"llmaccel offload: site {site} got a KV cache of shape {tuple(k_cache.shape)} that names no "
            "offload sequence: it was not produced by the prefill of a model compiled with offload "
            "(a cache from another model or store?). Start the sequence again (prefill) through this "
            "compiled model")
    return seq_id


_SWA_MODES: dict[int, object] = {}


def _swa_mode(handle: int):
    mode = _SWA_MODES.get(handle)
    if mode is None:
        from llm_compile.runtime.offload.modes import SWAMode

        mode = _SWA_MODES[handle] = SWAMode(lookup_handle(handle))
    return mode


def check_cache_is_phantom(k_cache: Tensor, site: int, where: str) -> None:
    """At decode the model's cache must be the phantom this op's graph returned last step: real
    values there mean it was filled without this option, or changed outside the compiled model
    (beam-search reorder, crop), and the held KV would not match it."""
    if k_cache.numel() > 1 and not is_phantom(k_cache):
        raise RuntimeError(
            f"llmaccel {where}: site {site} got a real KV cache of shape {tuple(k_cache.shape)}, not the "
            "phantom its previous step returned: the cache was filled by a model compiled without "
            f"{where}, or changed outside the compiled model (beam-search reordering, cropping), so the "
            f"KV held by {where} would not match it. Start the sequence again (prefill) through this "
            "compiled model; greedy/sampled generate() works, beam search does not")


@torch.library.custom_op("llmaccel::offload_attention", mutates_args=())
def offload_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                      attn_mask: Tensor | None, scale: float, is_causal: bool, site: int,
                      pool_handle: int, swa_handle: int, seq: Tensor | None = None) -> Tensor:
    pool = lookup_handle(pool_handle)
    if k_cache is None:
        seq_id = sequence_of(seq)
        if seq_id is None:
            raise RuntimeError(f"llmaccel offload: the prefill of site {site} names no sequence (the graph "
                               "lacks llmaccel::offload_sequence); recompile the model")
        key = worker_key(seq_id)
        if swa_handle:
            out = pool.prefill(key, site, k, v, q=q, scale=scale, attn_mask=attn_mask,
                               is_causal=is_causal, mode=_swa_mode(swa_handle))
        else:
            out = dense_attention(q, k, v, attn_mask, scale, is_causal)
            pool.prefill(key, site, k, v)
    else:
        check_cache_is_phantom(k_cache, site, "offload")
        key = worker_key(cache_sequence(k_cache, site))
        out = pool.decode(key, site, q, k, v, scale, attn_mask, is_causal, cached_len=k_cache.shape[-2])
    return to_out_layout(out)


@offload_attention.register_fake
def _(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, pool_handle, swa_handle, seq=None):
    return attention_out_like(q, v)
