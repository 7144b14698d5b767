"""Sparse window attention's CPU math over the kept rows of a decode step (the torch path of
:func:`~llm_compile.runtime.swa.step.swa_step`; the Triton kernel is
:mod:`llm_compile.codegen.swa_kernels`): gather what must be gathered, read the rest of the cache in
place, and return the output and the kept tokens' weights for the score update::

    out, w = attend_split_torch(q, k_cache, v_cache, idx, budget, attn_mask, scale)  # [B,Hq,Dv], [B,Hq,P]

:func:`attend_native` runs the C kernel instead where it applies (float32 rows of a CPU cache,
read in place: :mod:`~llm_compile.runtime.swa.native`).

:func:`gather_attend_torch` (gather every kept row, then dense attention) is the reference the
split path is tested against; :func:`attend_rows` attends over rows already gathered (tiered KV).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from llm_compile.runtime.swa import native


def _mask_bias(attn_mask: Tensor | None, B: int, Lq: int, n: int) -> Tensor | None:
    """``attn_mask`` (bool: True = attend, or additive) as fp32 bias [B, 1|Hq, Lq, n]."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, m.shape[1], Lq, n)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    return m.float()


def _slot_bias(attn_mask: Tensor | None, idx: Tensor, total: int, Hq: int, n: int) -> Tensor:
    """Additive bias [B, 1|Hq, P] for the kept slots: the mask gathered at the kept tokens, and
    -inf on padding slots (``>= total``)."""
    B, G, P = idx.shape
    if attn_mask is None:
        bias = torch.zeros(B, 1, P, dtype=torch.float32, device=idx.device)
    else:
        m = _mask_bias(attn_mask, B, 1, n)[:, :, 0]  # [B, H', n]
        if G > 1 or m.shape[1] > 1:
            m = m.expand(B, Hq, n)
            ii = idx.repeat_interleave(Hq // G, dim=1) if G > 1 else idx.expand(B, Hq, P)
        else:
            ii = idx
        bias = torch.gather(m, 2, ii).contiguous()
    bias[..., total:] = float("-inf")
    return bias


@lru_cache(maxsize=64)
def _row_base(B: int, H: int, s0: int, s1: int, device: torch.device) -> Tensor:
    """Row of ``x[b, h, 0]`` in the rows view of a cache with row strides ``s0``/``s1`` (a shape
    constant, made once per shape: not per-sequence state)."""
    return (torch.arange(B, device=device)[:, None, None] * s0
            + torch.arange(H, device=device)[None, :, None] * s1)


def _row_view(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``x`` [B, H, n, D] (a possibly sliced contiguous cache) as contiguous rows [R, D] without a
    copy, and the row of ``x[b, h, 0]`` as ``base`` [B, H, 1]; None if its strides do not allow it."""
    B, H, n, D = x.shape
    if not (x.stride(-1) == 1 and x.stride(2) == D and x.stride(1) % D == 0 and x.stride(0) % D == 0):
        return None
    s0, s1 = x.stride(0) // D, x.stride(1) // D
    return (x.as_strided(((B - 1) * s0 + (H - 1) * s1 + n, D), (D, 1), x.storage_offset()),
            _row_base(B, H, s0, s1, x.device))


def gather_rows(x: Tensor, idx: Tensor, new: Tensor | None = None) -> Tensor:
    """Rows ``x[b, h, idx[b, h|0, t]]`` -> [B, H, P, D]. With ``new`` ([B, H, 1, D]), index
    ``x.shape[2]`` means that row (the call's new token, so the cache need not be concatenated)."""
    B, H, n, D = x.shape
    P = idx.shape[-1]
    ii = idx.expand(B, H, P)
    if new is not None:
        is_new = ii == n
        ii = ii.clamp(max=n - 1)
    view = _row_view(x)
    if view is not None:  # rows of a (possibly sliced) contiguous cache: one index_select
        rows, base = view
        out = rows.index_select(0, (base + ii).reshape(-1)).view(B, H, P, D)
    else:
        out = x[torch.arange(B, device=x.device)[:, None, None],
                torch.arange(H, device=x.device)[None, :, None], ii]
    if new is not None:
        out = torch.where(is_new[..., None], new.expand(B, H, P, D), out)
    return out


def weighted_rows(w: Tensor, v: Tensor, idx: Tensor) -> Tensor | None:
    """``out[b, h, g] = sum_p w[b, h, g, p] * v[b, h, idx[b, h|0, p]]`` -> [B, H, G, Dv] fp32, read
    in place by one ``embedding_bag`` (no gathered copy of the rows: one read of each kept row
    instead of a gather's read, write and re-read). None where it does not apply (a cache that is
    not float32 or not rows of a contiguous buffer): the caller gathers instead."""
    if v.dtype != torch.float32:
        return None
    view = _row_view(v)
    if view is None:
        return None
    rows, base = view
    B, H, G, P = w.shape
    bags = (base + idx.expand(B, H, P)).unsqueeze(2).expand(B, H, G, P).reshape(B * H * G, P)
    out = torch.nn.functional.embedding_bag(bags, rows, mode="sum",
                                            per_sample_weights=w.reshape(B * H * G, P))
    return out.view(B, H, G, v.shape[-1])


def attend_native(q: Tensor, kf: Tensor, vf: Tensor, idx: Tensor, total: int, attn_mask: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor] | None:
    """The first ``total`` slots of ``idx`` attended by the C kernel
    (:func:`~llm_compile.runtime.swa.native.sparse_attend`: rows read in place, prefetched), same
    contract as :func:`gather_attend_torch` over those slots; None where it does not apply (GPU,
    not float32, no C compiler): the caller takes a torch path."""
    ii = idx[..., :total]
    bias = None if attn_mask is None else _slot_bias(attn_mask, ii, total, q.shape[1], kf.shape[2])
    return native.sparse_attend(q, kf, vf, ii, bias, scale)


def gather_attend_torch(q: Tensor, kf: Tensor, vf: Tensor, idx: Tensor, bias: Tensor,
                        scale: float, k_new: Tensor | None = None,
                        v_new: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CPU/reference path: gather the kept K/V rows, dense attention over them.

    q [B, Hq, D]; kf/vf [B, Hkv, n, D|Dv]; idx [B, 1|Hkv, P]; bias [B, 1|Hq, P]; optional
    ``k_new``/``v_new`` [B, Hkv, 1, D]: then ``kf``/``vf`` are the cache without the new token and
    index ``n`` is the new token. Returns out [B, Hq, Dv] (dtype of q) and weights [B, Hq, P]
    fp32 (same contract as :func:`llm_compile.codegen.swa_kernels.swa_decode_attention`).
    """
    return attend_rows(q, gather_rows(kf, idx, k_new), gather_rows(vf, idx, v_new), bias, scale)


def attend_rows(q: Tensor, kg: Tensor, vg: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense attention of q [B, Hq, D] over gathered rows kg/vg [B, Hkv, P, D|Dv] with ``bias``
    [B, 1|Hq, P]; returns out [B, Hq, Dv] and weights [B, Hq, P] (see :func:`gather_attend_torch`)."""
    B, Hq, D = q.shape
    Hkv, Dv, P = kg.shape[1], vg.shape[-1], kg.shape[2]
    grp = Hq // Hkv
    kg, vg = kg.float(), vg.float()
    logits = torch.matmul(q.float().reshape(B, Hkv, grp, D), kg.transpose(-1, -2)).mul_(scale)
    logits += bias.expand(B, Hq, P).reshape(B, Hkv, grp, P)
    w = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(w, vg).reshape(B, Hq, Dv).to(q.dtype)
    return out, w.reshape(B, Hq, P)


def attend_split_torch(q: Tensor, kf: Tensor, vf: Tensor, idx: Tensor, b, attn_mask: Tensor | None,
                       scale: float, k_new: Tensor | None = None,
                       v_new: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CPU decode path: like :func:`gather_attend_torch` over the first ``b.total`` slots of
    ``idx`` (sinks, global, recent — the layout of :meth:`SWAState.select`), but nothing is
    gathered that can be read in place: the sinks and the recent window (contiguous rows of the
    cache) enter the logits in place, only the global keys are gathered, and the output is one
    weighted ``embedding_bag`` over the kept value rows (:func:`weighted_rows`; a gather where it
    does not apply); no padding slots. Returns out [B, Hq, Dv] and weights [B, Hq, b.total] fp32
    in slot order.
    """
    B, Hq, D = q.shape
    Hkv, Dv = kf.shape[1], vf.shape[-1]
    n, grp = b.n, Hq // Hkv
    s, g, r = b.sinks, b.global_, b.recent
    kr = kf[:, :, n - r: n] if k_new is None else torch.cat([kf[:, :, n - r: n - 1], k_new], dim=2)
    parts_k = [kf[:, :, :s]] if s else []
    if g:
        parts_k.append(gather_rows(kf, idx[..., s: s + g]))
    parts_k.append(kr)
    qf = q.float().reshape(B, Hkv, grp, D) * scale  # the scale on q: grp rows, not P columns
    logits = torch.cat([torch.matmul(qf, kp.float().transpose(-1, -2)) for kp in parts_k], dim=-1)
    if attn_mask is not None:
        m = _mask_bias(attn_mask, B, 1, n)[:, :, 0]  # [B, 1|Hq, n]
        ii = idx[..., : b.total]
        if ii.shape[1] > 1 or m.shape[1] > 1:  # per-KV-head slots or a per-head mask
            m = m.expand(B, Hq, n)
            ii = ii.repeat_interleave(Hq // ii.shape[1], dim=1) if ii.shape[1] > 1 else ii.expand(B, Hq, b.total)
        logits += torch.gather(m, 2, ii).expand(B, Hq, b.total).reshape(B, Hkv, grp, b.total)
    w = torch.softmax(logits, dim=-1)
    if attn_mask is not None:  # a row whose kept tokens are all masked: zeros, not NaN
        w.nan_to_num_(0.0)
    out = None if v_new is not None else weighted_rows(w, vf, idx[..., : b.total])
    if out is None:  # the cache without the new token, or rows embedding_bag cannot read
        vr = vf[:, :, n - r: n] if v_new is None else torch.cat([vf[:, :, n - r: n - 1], v_new], dim=2)
        parts_v = ([vf[:, :, :s]] if s else []) + ([gather_rows(vf, idx[..., s: s + g])] if g else []) + [vr]
        lo = 0
        for vp in parts_v:
            t = vp.shape[2]
            o = torch.matmul(w[..., lo: lo + t], vp.float())
            out = o if out is None else out.add_(o)
            lo += t
    return out.reshape(B, Hq, Dv).to(q.dtype), w.reshape(B, Hq, b.total)
