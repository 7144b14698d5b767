"""A low-bit sketch of the keys (issue 15): ``recall`` ranks every token by its approximate
attention from it, instead of one upper bound per page.

Keys are quantized per channel over blocks of ``block`` consecutive tokens (KIVI's layout for keys,
arXiv 2402.02750: outlier channels get their own range), ``bits`` bits per value::

    k[t, d] ~ mn[blk, d] + code[t, d] * step[blk, d],   code in 0 .. 2**bits - 1

and the query's logit for token ``t`` is ``q . k~[t] = sum_d (q_d step_d) code_d + q . mn``. The
weights ``w_d = q_d step_d`` are quantised to int8 per block and query head
(:func:`quantized_weights`), so the sum over channels is of small integers: every path (the C
kernel's AVX-512 VNNI, AVX-512/AVX2 float and scalar tiles, the Triton kernel, the torch path
here) adds it exactly, and they differ only in the last bits of the final ``scale * (sw * sum +
q . mn)``; on SmolLM2 it moved ``recall``'s continuation perplexity by -0.02 / -0.06 / +0.28 %
at sparsity 0.5 / 0.8 / 0.9 (RESULTS, "The key sketch in int8"). A step reads ``bits`` bits per
key value plus two float16 numbers per block and channel: with 2 bits, 64-token blocks and a
float32 cache that is 20 bytes per token and KV head against 512 for its K+V (3.9 %). On SmolLM2
(1024-token contexts, sparsity 0.8, summaries counted) the tokens the 2-bit sketch picks hold
0.88 of the attention mass, where the exact top-k holds 0.93 and Quest's page bounds 0.76
(``benchmarks/swa_selector_study.py``).

Only complete blocks are sketched (their range is final, so a block is quantized once, when its
last token arrives); the newest ``n % block`` tokens have no sketch and are left to the recent
window and the history scores. The sketch is per-sequence state: it rides in the site's
:class:`~llm_compile.runtime.swa.state.SWAState` (so it lives in the sequence's cache and follows
its ``map_batch``/``crop``), and it is updated lazily from the key cache, like
:class:`~llm_compile.runtime.swa.pages.PageSummary`.

Codes are packed ``8 // bits`` per byte, channel-major within a block (``_packed`` [B, H, blocks,
D, block * bits / 8]: byte ``j`` of channel ``d`` holds tokens ``j + s * block * bits / 8`` at bits
``s * bits``), so a CPU step reads exactly the bytes the budget counts and sums over channels with
whole vectors of tokens: :mod:`~llm_compile.runtime.swa.native` (a C kernel, 3-5x faster than the
dense ``q K^T`` it replaces); elsewhere, or without a C compiler, a torch path unpacks the codes
(same values).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from llm_compile.runtime.swa import native


def quantized_weights(w: Tensor) -> tuple[Tensor, Tensor]:
    """The sketch's int8 weights, over the last dim of ``w`` (float32): ``amax = max |w|``,
    ``wq = round(w * (127 / amax))`` (half to even; integer values as float32), ``sw = amax / 127``
    (keepdim), so ``w ~ sw * wq``; a row of zeros gives zeros. Every path of
    :meth:`KeySketch.logits` (C, Triton, torch) computes exactly these numbers."""
    amax = w.abs().amax(-1, keepdim=True)
    r = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    return torch.round(w * r), amax / 127.0


class KeySketch:
    """Per-channel ``bits``-bit codes of the keys over blocks of ``block`` tokens."""

    def __init__(self, bits: int, block: int):
        self.bits = bits
        self.block = block
        self.n = 0
        """Tokens sketched (a multiple of ``block``)."""
        if 8 % bits or block % (8 // bits):
            raise ValueError(f"KeySketch: bits={bits} must divide 8 and block={block} be a multiple of 8 // bits")
        self.per_byte = 8 // bits
        self._packed: Tensor | None = None  # [B, H, cap // block, D, block // per_byte] uint8
        self._mn: Tensor | None = None      # [B, H, cap // block, D] float16
        self._step: Tensor | None = None

    @staticmethod
    def bytes_per_token(bits: int, block: int, head_dim: int) -> float:
        """Bytes a step reads per token and KV head: the codes, and the block's two float16 rows."""
        return head_dim * bits / 8 + 2 * 2 * head_dim / block

    def _reserve(self, k: Tensor, n: int) -> None:
        B, H, _, D = k.shape
        nbn = -(-n // self.block)
        if self._packed is not None and self._packed.shape[:2] == (B, H) and self._packed.shape[2] >= nbn:
            return
        old = 0 if self._packed is None else self._packed.shape[2]
        nbc = max(nbn, 2 * old, 4)
        packed = torch.empty(B, H, nbc, D, self.block // self.per_byte, dtype=torch.uint8, device=k.device)
        mn = torch.empty(B, H, nbc, D, dtype=torch.float16, device=k.device)
        step = torch.empty_like(mn)
        nb = self.n // self.block
        if self._packed is not None and nb:
            packed[:, :, :nb] = self._packed[:, :, :nb]
            mn[:, :, :nb] = self._mn[:, :, :nb]
            step[:, :, :nb] = self._step[:, :, :nb]
        self._packed, self._mn, self._step = packed, mn, step

    def _pack(self, codes: Tensor) -> Tensor:
        """[B, H, nb, block, D] codes -> [B, H, nb, D, block // per_byte] bytes (module docstring)."""
        B, H, nb, blk, D = codes.shape
        c = codes.transpose(-1, -2).reshape(B, H, nb, D, self.per_byte, blk // self.per_byte)
        out = c[..., 0, :].clone()
        for s in range(1, self.per_byte):
            out |= c[..., s, :] << (s * self.bits)
        return out

    def codes(self) -> Tensor:
        """The codes [B, H, n, D] uint8 of the sketched tokens (unpacked)."""
        nb = self.n // self.block
        p = self._packed[:, :, :nb]
        B, H, _, D, pb = p.shape
        mask = 2 ** self.bits - 1
        c = torch.stack([(p >> (s * self.bits)) & mask for s in range(self.per_byte)], dim=-2)
        return c.reshape(B, H, nb, D, self.block).transpose(-1, -2).reshape(B, H, self.n, D)

    def update(self, k: Tensor, k_new: Tensor | None = None) -> None:
        """Sketch every complete block of ``k`` [B, Hkv, N, D] (and ``k_new`` after it) not yet
        sketched; a crop below ``n`` drops the blocks past it."""
        N = k.shape[2] + (0 if k_new is None else k_new.shape[2])

        def read(lo: int, hi: int) -> Tensor:
            if hi <= k.shape[2]:
                return k[:, :, lo:hi]
            return torch.cat([k[:, :, lo:], k_new], dim=2)[:, :, : hi - lo]

        self.update_from(read, N)

    def update_from(self, read, N: int) -> None:
        """Like :meth:`update` for a cache of ``N`` tokens that is read by position (tiered KV):
        ``read(lo, hi)`` returns the keys ``[B, Hkv, hi - lo, D]`` of positions ``lo .. hi-1``,
        called only for the blocks that completed since the last call."""
        full = (N // self.block) * self.block
        lo = min(self.n, full)
        if lo == full:
            self.n = full
            return
        rows = read(lo, full)
        self._reserve(rows, full)
        B, H, m, D = rows.shape
        blk = rows.reshape(B, H, m // self.block, self.block, D).float()
        mn, mx = blk.amin(3), blk.amax(3)
        # the float16 range is what the step reads: quantize against it, so codes and decode agree
        mn16 = mn.to(torch.float16)
        step16 = ((mx - mn16.float()) / (2 ** self.bits - 1)).to(torch.float16)
        step = step16.float().clamp_min(torch.finfo(torch.float16).tiny)
        codes = torch.round((blk - mn16.float().unsqueeze(3)) / step.unsqueeze(3))
        codes = codes.clamp_(0, 2 ** self.bits - 1).to(torch.uint8)
        b0, b1 = lo // self.block, full // self.block
        self._packed[:, :, b0:b1] = self._pack(codes)
        self._mn[:, :, b0:b1] = mn16
        self._step[:, :, b0:b1] = step16
        self.n = full

    def dequantized(self) -> Tensor:
        """The sketched keys ``[B, H, n, D]`` float32 (for tests and analysis)."""
        B, H, _, D = self._packed.shape[:4]
        nb = self.n // self.block
        c = self.codes().float().reshape(B, H, nb, self.block, D)
        return (c * self._step[:, :, :nb].float().unsqueeze(3)
                + self._mn[:, :, :nb].float().unsqueeze(3)).reshape(B, H, self.n, D)

    def parts(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """What a kernel reads: packed codes, float16 steps and minima (capacity-sized), and the
        number of sketched blocks."""
        return self._packed, self._step, self._mn, self.n // self.block

    def logits(self, q: Tensor, scale: float) -> Tensor:
        """``scale * q . k~`` for every sketched token: q [B, Hq, D] -> [B, Hq, n] float32."""
        if not q.is_cuda and native.library() is not None:
            packed, step, mn, nb = self.parts()
            return native.sketch_logits(packed, step, mn, q, nb, self.bits, scale)
        return self.logits_torch(q, scale)

    def logits_torch(self, q: Tensor, scale: float) -> Tensor:
        """:meth:`logits` by unpacking the codes to float32 (any device; the reference)."""
        B, Hq, D = q.shape
        H = self._packed.shape[1]
        g, nb = Hq // H, self.n // self.block
        qg = q.float().reshape(B, H, g, 1, D)
        qs = qg * self._step[:, :, :nb].float().unsqueeze(2)           # [B, H, g, nb, D]
        wq, sw = quantized_weights(qs)                                  # sw [B, H, g, nb, 1]
        base = (qg * self._mn[:, :, :nb].float().unsqueeze(2)).sum(-1)   # [B, H, g, nb]
        c = self.codes().reshape(B, H, nb, self.block, D).float()
        lg = torch.matmul(wq.transpose(2, 3), c.transpose(-1, -2))      # [B, H, nb, g, block]: integers
        lg = lg.transpose(2, 3) * sw + base.unsqueeze(-1)               # [B, H, g, nb, block]
        return lg.reshape(B, Hq, self.n).mul_(scale)

    # -- cache operations ------------------------------------------------------------------------
    def map_batch(self, fn) -> "KeySketch":
        new = copy.copy(self)
        if self._packed is not None:
            new._packed, new._mn, new._step = fn(self._packed), fn(self._mn), fn(self._step)
        return new

    def crop(self, n: int) -> "KeySketch":
        """Cover the first ``n`` tokens: blocks past the last complete one are dropped."""
        new = self.map_batch(lambda t: t.clone())
        new.n = min(self.n, (n // self.block) * self.block)
        return new
