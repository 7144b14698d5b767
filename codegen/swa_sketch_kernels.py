"""Triton kernel: the key sketch's logits (``recall``'s scorer, issue 15) from the packed codes.

For one decode query per sequence and query head, and every token ``t`` of a sketched block ``i``
(:class:`~llm_compile.runtime.swa.sketch.KeySketch`: per block and channel a float16 minimum
``mn`` and step, ``BITS``-bit codes packed ``PER = 8 // BITS`` per byte, channel-major)::

    logit[b, h, i*BLK + t] = scale * (q[b, h] . mn[b, h // GRP, i] + sw * sum_d wq[d] * code[t, d])

with ``w[d] = q[b, h, d] * step[b, h // GRP, i, d]`` quantised to int8 as
:func:`llm_compile.runtime.swa.sketch.quantized_weights` does (``wq = round(w * (127 / amax))``,
``sw = amax / 127``; round half to even by adding and subtracting 1.5 * 2^23), so the sum over
channels is of small integers and exact.

Program ``(b, kv_head, block)`` loads the block's ``D x PB`` bytes once for the ``GRP`` query heads
of the KV head (padded to 16 rows for ``tl.dot``), and for each of the ``PER`` bit fields unpacks
``PB`` tokens and multiplies them in one ``tl.dot`` (fp32, ``input_precision="ieee"``; codes and
weights are small integers, exact in fp32). It never reads the keys. The CPU's kernel is
:mod:`llm_compile.runtime.swa.native`; on CPU this one runs only with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm_compile.codegen.swa_kernels import block_pow2


@triton.jit
def _sketch_logit_kernel(
    Q, PACKED, STEP, MN, OUT, scale, GRP, PB,
    sqb, sqh, spb, sph, spi, spd, ssb, ssh, ssi, sob, soh,
    D: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_PB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GRP
    qh = h * GRP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + b * sqb + qh[:, None] * sqh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    srow = b * ssb + h * ssh + i * ssi + offs_d
    step = tl.load(STEP + srow, mask=d_mask, other=0.0).to(tl.float32)
    mn = tl.load(MN + srow, mask=d_mask, other=0.0).to(tl.float32)
    w = q * step[None, :]                                   # [G, D]
    amax = tl.max(tl.abs(w), axis=1)                        # [G]
    pos = amax > 0
    r = tl.where(pos, 127.0 / tl.where(pos, amax, 1.0), 0.0)
    x = w * r[:, None]
    w = (x + 12582912.0) - 12582912.0                       # round half to even (|x| <= 127)
    sw = amax / 127.0
    base = tl.sum(q * mn[None, :], axis=1)                  # [G]
    offs_j = tl.arange(0, BLOCK_PB)
    j_mask = offs_j < PB
    p = tl.load(PACKED + b * spb + h * sph + i * spi + offs_d[:, None] * spd + offs_j[None, :],
                mask=d_mask[:, None] & j_mask[None, :], other=0).to(tl.int32)   # [D, PB]
    blk = PB * PER
    for s in tl.static_range(PER):
        codes = ((p >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        lg = tl.dot(w, codes, input_precision="ieee") * sw[:, None] + base[:, None]   # [G, PB]
        tl.store(OUT + b * sob + qh[:, None] * soh + i * blk + s * PB + offs_j[None, :], lg * scale,
                 mask=g_mask[:, None] & j_mask[None, :])



def swa_sketch_logits(packed: torch.Tensor, step: torch.Tensor, mn: torch.Tensor, q: torch.Tensor,
                      nb: int, bits: int, scale: float) -> torch.Tensor:
    """Same contract as :func:`llm_compile.runtime.swa.native.sketch_logits`: ``packed`` [B, H,
    NBc, D, PB] uint8, ``step``/``mn`` [B, H, NBc, D] float16, ``q`` [B, Hq, D] -> [B, Hq, nb*BLK]
    float32 over the first ``nb`` blocks."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("llmaccel swa sketch kernel: CPU tensors need TRITON_INTERPRET=1 "
                           "(set before triton is imported), or use the CPU kernel (swa kernel='torch')")
    B, H, NBc, D, PB = packed.shape
    Hq = q.shape[1]
    if (Hq % H or 8 % bits or q.shape != (B, Hq, D) or step.shape != (B, H, NBc, D)
            or mn.stride() != step.stride() or packed.stride(-1) != 1 or q.stride(-1) != 1
            or step.stride(-1) != 1 or not 0 <= nb <= NBc):
        raise ValueError(f"swa sketch kernel: bad inputs packed {tuple(packed.shape)}, step "
                         f"{tuple(step.shape)}, q {tuple(q.shape)}, nb={nb}, bits={bits}")
    per = 8 // bits
    out = torch.empty(B, Hq, nb * PB * per, dtype=torch.float32, device=q.device)
    if nb == 0:
        return out
    _sketch_logit_kernel[(B, H, nb)](
        q, packed, step, mn, out, float(scale), Hq // H, PB,
        q.stride(0), q.stride(1), *packed.stride()[:4], *step.stride()[:3], out.stride(0), out.stride(1),
        D=D, BITS=bits, PER=per, BLOCK_G=block_pow2(Hq // H), BLOCK_PB=block_pow2(PB),
        BLOCK_D=block_pow2(D),
    )
    return out
