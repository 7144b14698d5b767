"""Implementation of ``llmaccel::stored_attention`` (schema: :mod:`llm_compile.ops.kv_store`):
attention over a site's KV kept in preallocated buffers appended in place, owned by the cache.

With ``options={"kv_store": True}`` the pass ``local_kv_store`` turns every attention site into
this op. Its KV lives in a :class:`~llm_compile.runtime.kv.buffer.SiteKV` that hangs on the two
zero-memory phantoms the op returns (``phantom.llmaccel_kv``); the graph returns the phantoms to
the model's cache (HF's ``DynamicCache`` stores them as ``layer.keys``/``layer.values`` and reads
their length), so the KV belongs to that cache object and is freed with it::

    prefill:  out, k_ph, v_ph = stored_attention(q, k, v, None, None, ...)     # new SiteKV
    decode:   out, k_ph, v_ph = stored_attention(q, k1, v1, k_ph, v_ph, ...)   # same SiteKV, +1 row

A decode whose ``k_cache`` is not the phantom this op returned at the previous step of that
cache (a real tensor, a phantom without KV, another site's, a stale or cropped one) raises
:class:`~llm_compile.runtime.swa.op.SequenceStateError` with what to do. Sparse window attention
over the stored KV (``swa`` != ``""``) keeps its state in ``SiteKV.state``.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

import llm_compile.ops.kv_store  # noqa: F401  (declares the op)
from llm_compile.ops.attention import dense_attention, to_out_layout
from llm_compile.runtime import dense_prefix
from llm_compile.runtime.kv.buffer import SiteKV
from llm_compile.runtime.swa.op import FIX, SequenceStateError
from llm_compile.runtime.swa.policies import config_from_json
from llm_compile.runtime.swa.step import new_state, restart_step, swa_step
from llm_compile.runtime.tiers.plan import plan_from_json
from llm_compile.runtime.tiers.recompute import KVRecompute, kept_width
from llm_compile.runtime.tiers.store import TieredKV

KV_ATTR = "llmaccel_kv"


def make_phantom(like: Tensor, length: int, batch: int | None = None) -> Tensor:
    """A zero-memory tensor of shape ``[B, H, length, D]`` (all strides 0, one element)."""
    shape = [like.shape[0] if batch is None else batch, like.shape[1], length, like.shape[-1]]
    return like.new_zeros(1).as_strided(shape, [0] * 4)


def phantoms(kv: SiteKV, like_k: Tensor, like_v: Tensor) -> tuple[Tensor, Tensor]:
    """The two phantoms a cache holds for ``kv``, each carrying it."""
    kp = make_phantom(like_k, kv.length, kv.shape[0])
    vp = make_phantom(like_v, kv.length, kv.shape[0])
    setattr(kp, KV_ATTR, kv)
    setattr(vp, KV_ATTR, kv)
    return kp, vp


def kv_of(t: Tensor | None) -> SiteKV | None:
    return None if t is None else getattr(t, KV_ATTR, None)


def _is_phantom(t: Tensor) -> bool:
    return t.numel() > 1 and not any(t.stride())


def site_kv(k_cache: Tensor, site: int, batch: int) -> SiteKV:
    """The SiteKV ``k_cache`` carries, checked against this call."""
    kv = kv_of(k_cache)
    if kv is None:
        if k_cache.numel() > 1 and not _is_phantom(k_cache):
            why = ("got a real KV cache of shape " f"{tuple(k_cache.shape)}, not the phantom its previous "
                   "step returned: the cache was filled by a model compiled without kv_store, or "
                   "changed outside the compiled model (beam-search reordering)")
        else:
            why = ("got a KV cache that carries no stored KV (a phantom cropped, reordered or copied "
                   "outside the compiled model, or a cache from another process)")
        raise SequenceStateError(f"llmaccel kv_store: site {site} {why}. {FIX}")
    if getattr(kv, "site", site) != site:
        raise SequenceStateError(f"llmaccel kv_store: site {site} got the KV of site {kv.site}")
    if int(k_cache.shape[-2]) != kv.length or kv.shape[0] != batch:
        raise SequenceStateError(
            f"llmaccel kv_store: site {site}: the model's cache says {int(k_cache.shape[-2])} cached "
            f"tokens of {k_cache.shape[0]} sequence(s), the KV store holds {kv.length} of "
            f"{kv.shape[0]}: the cache was changed outside the compiled model (cropped, reordered) or "
            f"is an earlier step's. {FIX}")
    return kv


def _attend(kv: SiteKV | TieredKV, q, attn_mask, scale, is_causal) -> Tensor:
    cfg = config_from_json(kv.swa)
    if isinstance(kv, TieredKV):  # dense reads every row of both tiers; SWA gathers its selection
        if cfg is None or cfg.sparsity == 0:
            return dense_attention(q, *kv.full(), attn_mask, scale, is_causal)
        return swa_step(kv.state, q, None, None, scale, cfg, attn_mask=attn_mask, is_causal=is_causal,
                        source=kv)
    if cfg is None or cfg.sparsity == 0:
        return dense_attention(q, kv.keys(), kv.values(), attn_mask, scale, is_causal)
    return swa_step(kv.state, q, kv.keys(), kv.values(), scale, cfg, attn_mask=attn_mask,
                    is_causal=is_causal)


def _tiered(tiers: str, q: Tensor, k: Tensor, v: Tensor, state, swa: str, rec_spec: str = "") -> TieredKV:
    """A new TieredKV for this prefill, with the plan for its batch (cached per shape)."""
    B, hkv, _, D = k.shape
    opts = json.loads(tiers)
    spec = json.loads(rec_spec) if rec_spec else None
    keep = kept_width(spec, D) if spec else None
    hidden = spec["hidden"] if spec else None

    def replan(batch: int):
        return plan_from_json(tiers, batch, hkv, q.shape[1], D, v.shape[-1], k.dtype, k.device, swa, keep, hidden)

    return TieredKV(B, hkv, D, v.shape[-1], k.dtype, k.device, state, replan(B), replan,
                    mmap_dir=opts.get("mmap_dir"), prefetch=opts.get("prefetch", True))


def _new_kv(q, k, v, site, reserve, growth, swa, tiers="", rec_spec=""):
    """A new sequence's store for this site (and its SWA state, None when dense)."""
    B, hkv, _, D = k.shape
    cfg = config_from_json(swa)
    state = new_state(B, hkv, k.device, cfg) if cfg is not None and cfg.sparsity > 0 else None
    kv = (_tiered(tiers, q, k, v, state, swa, rec_spec) if tiers else
          SiteKV(B, hkv, D, v.shape[-1], k.dtype, k.device, None, state, reserve=reserve, growth=growth))
    kv.site, kv.swa = site, swa
    return kv, cfg, state


def _adopt(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, reserve, growth, swa):
    """The first call on a cache a dense graph filled below ``swa.min_context``
    (:mod:`llm_compile.runtime.dense_prefix`): its KV moves into a new SiteKV (one copy), and the
    SWA state starts over from this call (:func:`~llm_compile.runtime.swa.step.restart_step`)."""
    if not dense_prefix.is_marked(v_cache) or v_cache.shape[-2] != k_cache.shape[-2]:
        raise SequenceStateError(f"llmaccel kv_store: site {site}: the key cache was filled by the dense "
                                 f"graph below swa.min_context but the value cache was not. {FIX}")
    kv, cfg, state = _new_kv(q, k, v, site, reserve, growth, swa)
    kv.append(k_cache, v_cache)
    kv.append(k, v)
    if state is None:
        return kv, dense_attention(q, kv.keys(), kv.values(), attn_mask, scale, is_causal)
    return kv, restart_step(state, q, kv.keys(), kv.values(), scale, cfg, attn_mask=attn_mask,
                            is_causal=is_causal)


def _recompute_inputs(kv, k: Tensor, v: Tensor, rec: list[Tensor], rec_spec: str):
    """Phase 3 (tiers with ``plan.beta > 0``): hand the store this call's recompute weights and
    return the kept rows of the new tokens (checked against ``k``/``v`` the first time the store
    sees this spec, i.e. once per graph form: prefill, decode)."""
    if not rec_spec or not isinstance(kv, TieredKV) or kv.plan.beta <= 0:
        return None
    rc = KVRecompute(rec_spec, list(rec or ()), k.shape[1], k.shape[-1], v.shape[-1])
    kept = rc.kept(k.shape[0])
    rc.drop_activations()
    if rec_spec not in kv.checked:
        rc.check(kept, k, v, kv.site)
        kv.checked.add(rec_spec)
    kv.recompute = rc
    return kept


@torch.library.impl("llmaccel::stored_attention", "CompositeExplicitAutograd")
def stored_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                     attn_mask: Tensor | None, scale: float, is_causal: bool, site: int,
                     reserve: int, growth: float, swa: str, tiers: str = "", rec=None, rec_spec: str = ""):
    B, hkv = k.shape[:2]
    if q.shape[1] % hkv:
        raise ValueError(f"llmaccel kv_store: {q.shape[1]} query heads is not a multiple of {hkv} KV heads")
    if k_cache is None:
        kv, cfg, state = _new_kv(q, k, v, site, reserve, growth, swa, tiers, rec_spec)
        kept = _recompute_inputs(kv, k, v, rec, rec_spec)
        if tiers and state is not None:  # tiered SWA prefill: attend over k/v, then store them
            out = swa_step(state, q, k, v, scale, cfg, attn_mask=attn_mask, is_causal=is_causal)
            kv.append(k, v, kept)
        elif state is None:  # dense prefill: attend over k/v directly, then store them
            out = dense_attention(q, k, v, attn_mask, scale, is_causal)
            kv.append(k, v, kept) if tiers else kv.append(k, v)
        else:
            kv.append(k, v)
            out = _attend(kv, q, attn_mask, scale, is_causal)
    elif kv_of(k_cache) is None and dense_prefix.is_marked(k_cache) and not tiers:
        kv, out = _adopt(q, k, v, k_cache, v_cache, attn_mask, scale, is_causal, site, reserve, growth, swa)
    else:
        kv = site_kv(k_cache, site, B)
        kept = _recompute_inputs(kv, k, v, rec, rec_spec)
        kv.append(k, v, kept) if kept is not None else kv.append(k, v)
        out = _attend(kv, q, attn_mask, scale, is_causal)
    kp, vp = phantoms(kv, k, v)
    return to_out_layout(out), kp, vp
