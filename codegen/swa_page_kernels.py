"""Triton kernel: upper bounds of ``q . k`` per page from the key summaries (Quest; issue 15).

For one decode query per sequence and per query head, and every page of ``page_size`` tokens whose
keys have the elementwise minimum ``kmin`` and maximum ``kmax`` (per KV head)::

    bound[b, h, p] = scale * (relu(q[b, h]) . kmax[b, h // GRP, p] + min(q[b, h], 0) . kmin[b, h // GRP, p])

which is ``scale * max over the page's keys of q . k`` or more. The kernel reads only the summaries
(``2 * D`` values per page per KV head), never the keys. Program ``(b, kv_head, page block)``
handles the ``GRP`` query heads of one KV head (the summaries are loaded once for the group),
padded to 16 rows for ``tl.dot``; arithmetic is fp32 (``input_precision="ieee"``; fp16/bf16
summaries are upcast on load). On CPU, run with ``TRITON_INTERPRET=1`` set before triton is imported.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm_compile.codegen.swa_kernels import block_pow2


@triton.jit
def _page_bound_kernel(
    Q, KMIN, KMAX, OUT, scale, NP, GRP,
    sqb, sqh, sqd, skb, skh, skp, skd, sob, soh, sop,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pb = tl.program_id(2).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GRP
    qh = h * GRP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + b * sqb + qh[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.minimum(q, 0.0)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < NP
    pd_mask = p_mask[:, None] & d_mask[None, :]
    kofs = b * skb + h * skh + offs_p[:, None] * skp + offs_d[None, :] * skd
    kmax = tl.load(KMAX + kofs, mask=pd_mask, other=0.0).to(tl.float32)
    kmin = tl.load(KMIN + kofs, mask=pd_mask, other=0.0).to(tl.float32)
    ub = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee")
    ub += tl.dot(q_neg, tl.trans(kmin), input_precision="ieee")
    tl.store(OUT + b * sob + qh[:, None] * soh + offs_p[None, :] * sop, ub * scale,
             mask=g_mask[:, None] & p_mask[None, :])



def swa_page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float,
                    block_p: int | None = None) -> torch.Tensor:
    """q [B, Hq, D]; kmin/kmax [B, Hkv, pages, D] (any strides, fp32/fp16/bf16) -> bounds
    [B, Hq, pages] fp32 (same contract as ``PageSummary.bounds``)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("llmaccel swa page kernel: CPU tensors need TRITON_INTERPRET=1 "
                           "(set before triton is imported), or use swa kernel='torch'")
    B, Hq, D = q.shape
    Hkv, NP = kmin.shape[1], kmin.shape[2]
    if Hq % Hkv or kmax.shape != kmin.shape:
        raise ValueError(f"swa page kernel: {Hq} query heads vs summaries {tuple(kmin.shape)}/"
                         f"{tuple(kmax.shape)}")
    if kmin.stride() != kmax.stride():
        kmin, kmax = kmin.contiguous(), kmax.contiguous()
    grp = Hq // Hkv
    out = torch.empty(B, Hq, NP, dtype=torch.float32, device=q.device)
    if NP == 0:
        return out
    BLOCK_P = block_p or (64 if NP >= 64 else block_pow2(NP))
    grid = (B, Hkv, triton.cdiv(NP, BLOCK_P))
    _page_bound_kernel[grid](
        q, kmin, kmax, out, float(scale), NP, grp,
        *q.stride(), *kmin.stride(), *out.stride(),
        D=D, BLOCK_G=block_pow2(grp), BLOCK_P=BLOCK_P, BLOCK_D=block_pow2(D),
    )
    return out
