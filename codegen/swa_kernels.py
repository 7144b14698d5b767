"""Triton decode kernel for sparse window attention: attend to selected KV rows, emit weights.

One decode step (one query token per sequence) attends to ``T`` kept tokens per sequence (and
per KV head when the selection is per KV head), given by their positions ``idx`` in the full
cache. The kernel reads only those K/V rows, by index, straight from the cache (no full
``Q @ K^T``, no gathered copy), and in the same pass returns the softmax probabilities over the
kept tokens, which the SWA runtime adds to its token scores.

Work split (flash-decoding): program ``(b, kv_head, split)`` handles the ``GRP`` query heads of one
KV head (GQA: the K/V rows are loaded once for the whole group) over one slice of the kept
tokens, with an online softmax; it stores the raw logits in the weights buffer and its partial
``(max, sum, acc)``. A second kernel, over the same grid, merges the partials into the global
log-sum-exp; split 0 writes the output and every split normalises its own slice of logits into
probabilities. Tiles follow GPU ``tl.dot`` rules (every dim >= 16 and a power of two; query
heads of a group are padded to 16 rows). Arithmetic is fp32 (``input_precision="ieee"``; fp16
inputs are upcast on load): decode is memory bound, so the fp32 dot costs nothing measurable.

On CPU, run with ``TRITON_INTERPRET=1`` set before triton is imported.
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (avoids inf - inf)


@triton.jit
def _swa_partial_kernel(
    Q, K, V, IDX, BIAS, W, MP, LP, ACC, scale, T, GRP, T_SPLIT,
    sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sib, sig, sit, sbb, sbh, sbt, swb, swh, swt, smb, smh, sms, sab, sah, sas, sad,
    D: tl.constexpr, DV: tl.constexpr, PER_HEAD_IDX: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GRP
    qh = h * GRP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    q = tl.load(Q + b * sqb + qh[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * scale
    if PER_HEAD_IDX:
        ibase = IDX + b * sib + h * sig
    else:
        ibase = IDX + b * sib
    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    lo = s * T_SPLIT
    for t0 in range(lo, lo + T_SPLIT, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        tok = tl.load(ibase + offs_t * sit, mask=t_mask, other=0).to(tl.int64)
        k = tl.load(K + b * skb + h * skh + tok[:, None] * skn + offs_d[None, :] * skd,
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        gt_mask = g_mask[:, None] & t_mask[None, :]
        bias = tl.load(BIAS + b * sbb + qh[:, None] * sbh + offs_t[None, :] * sbt,
                       mask=gt_mask, other=float("-inf"))
        logits = logits + bias
        tl.store(W + b * swb + qh[:, None] * swh + offs_t[None, :] * swt, logits, mask=gt_mask)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + tok[:, None] * svn + offs_dv[None, :] * svd,
                    mask=t_mask[:, None] & dv_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(MP + b * smb + qh * smh + s * sms, m_i, mask=g_mask)
    tl.store(LP + b * smb + qh * smh + s * sms, l_i, mask=g_mask)
    tl.store(ACC + b * sab + qh[:, None] * sah + s * sas + offs_dv[None, :] * sad, acc,
             mask=g_mask[:, None] & dv_mask[None, :])


@triton.jit
def _swa_finish_kernel(
    W, MP, LP, ACC, OUT, T, GRP, T_SPLIT, NSPLIT,
    swb, swh, swt, smb, smh, sms, sab, sah, sas, sad, sob, soh, sod,
    DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GRP
    qh = h * GRP + offs_g
    offs_s = tl.arange(0, BLOCK_S)
    gs_mask = g_mask[:, None] & (offs_s[None, :] < NSPLIT)
    mp = tl.load(MP + b * smb + qh[:, None] * smh + offs_s[None, :] * sms, mask=gs_mask, other=_NEG)
    lp = tl.load(LP + b * smb + qh[:, None] * smh + offs_s[None, :] * sms, mask=gs_mask, other=0.0)
    m = tl.max(mp, 1)
    f = tl.exp(mp - m[:, None])
    l_tot = tl.sum(lp * f, 1)
    l_safe = tl.where(l_tot > 0, l_tot, 1.0)
    if s == 0:
        offs_dv = tl.arange(0, BLOCK_DV)
        gd_mask = g_mask[:, None] & (offs_dv[None, :] < DV)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for j in range(0, NSPLIT):
            mj = tl.load(MP + b * smb + qh * smh + j * sms, mask=g_mask, other=_NEG)
            aj = tl.load(ACC + b * sab + qh[:, None] * sah + j * sas + offs_dv[None, :] * sad,
                         mask=gd_mask, other=0.0)
            acc += aj * tl.exp(mj - m)[:, None]
        out = acc / l_safe[:, None]
        tl.store(OUT + b * sob + qh[:, None] * soh + offs_dv[None, :] * sod,
                 out.to(OUT.dtype.element_ty), mask=gd_mask)
    inv = 1.0 / l_safe
    lo = s * T_SPLIT
    for t0 in range(lo, lo + T_SPLIT, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        gt_mask = g_mask[:, None] & (offs_t[None, :] < T)
        ptrs = W + b * swb + qh[:, None] * swh + offs_t[None, :] * swt
        logits = tl.load(ptrs, mask=gt_mask, other=float("-inf"))
        tl.store(ptrs, tl.exp(logits - m[:, None]) * inv[:, None], mask=gt_mask)


def block_pow2(x: int, lo: int = 16) -> int:
    """A Triton block size: the next power of two of ``x``, at least ``lo`` (16: ``tl.dot``'s minimum)."""
    return max(lo, triton.next_power_of_2(int(x)))


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("llmaccel swa triton kernel: CPU tensors need TRITON_INTERPRET=1 "
                           "(set before triton is imported), or use swa kernel='torch'")


def swa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                         bias: torch.Tensor, scale: float, num_splits: int | None = None,
                         block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over the selected cache rows.

    q [B, Hq, D]; k/v [B, Hkv, N, D]/[B, Hkv, N, Dv] (any strides, fp32 or fp16);
    idx [B, G, T] integer positions into N (G = 1: same tokens for every KV head, G = Hkv: per
    KV head); bias [B, 1 or Hq, T] additive fp32 (0 = keep, -inf = padding/masked).
    Returns ``out`` [B, Hq, Dv] (dtype of q) and ``weights`` [B, Hq, T] fp32 (softmax over T).
    """
    _check_device(q)
    B, Hq, D = q.shape
    Hkv, Dv, T = k.shape[1], v.shape[-1], idx.shape[-1]
    if Hq % Hkv:
        raise ValueError(f"swa kernel: {Hq} query heads is not a multiple of {Hkv} KV heads")
    if idx.shape[1] not in (1, Hkv):
        raise ValueError(f"swa kernel: idx has {idx.shape[1]} groups, expected 1 or {Hkv}")
    grp = Hq // Hkv
    bias = bias.to(torch.float32).expand(B, Hq, T)
    BLOCK_T = block_t or (64 if T >= 64 else block_pow2(T))
    n_blocks = triton.cdiv(T, BLOCK_T)
    if num_splits is None:
        if q.is_cuda:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = max(1, triton.cdiv(2 * sms, B * Hkv))
        else:
            num_splits = 2
    per_split = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks)))
    nsplit = triton.cdiv(n_blocks, per_split)
    t_split = per_split * BLOCK_T
    dev = q.device
    w = torch.empty(B, Hq, T, dtype=torch.float32, device=dev)
    mp = torch.empty(B, Hq, nsplit, dtype=torch.float32, device=dev)
    lp = torch.empty_like(mp)
    acc = torch.empty(B, Hq, nsplit, Dv, dtype=torch.float32, device=dev)
    out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=dev)
    blocks = dict(BLOCK_G=block_pow2(grp), BLOCK_T=BLOCK_T, BLOCK_DV=block_pow2(Dv))
    grid = (B, Hkv, nsplit)
    _swa_partial_kernel[grid](
        q, k, v, idx, bias, w, mp, lp, acc, float(scale), T, grp, t_split,
        *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *bias.stride(), *w.stride(),
        *mp.stride(), *acc.stride(),
        D=D, DV=Dv, PER_HEAD_IDX=idx.shape[1] != 1, BLOCK_D=block_pow2(D), **blocks,
    )
    _swa_finish_kernel[grid](
        w, mp, lp, acc, out, T, grp, t_split, nsplit,
        *w.stride(), *mp.stride(), *acc.stride(), *out.stride(),
        DV=Dv, BLOCK_S=block_pow2(nsplit, 2), **blocks,
    )
    return out, w
