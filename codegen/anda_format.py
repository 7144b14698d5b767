"""The Anda activation format: exact reference conversion, bit-plane packing and unpacking.

Anda (arXiv 2411.15982) stores FP16 activations in groups of ``G = 64`` consecutive values along
the reduction dimension ``K`` (the last dimension). A group shares one exponent; every value keeps
its sign and an ``M``-bit mantissa that *counts the hidden bit* (``M = 1..16``).

Definition (this module is the reference; the Triton kernels compute exactly the same numbers)
-----------------------------------------------------------------------------------------------
1. ``x16 = x.clamp(-65504, 65504).to(torch.float16)`` (round to nearest even): finite values beyond
   the FP16 range *saturate* to +-65504 (with a one-time :class:`RuntimeWarning`, see
   :func:`warn_saturated`) instead of overflowing to inf. Inputs that are inf/NaN raise
   :class:`ValueError` (the Triton kernels cannot raise: they return NaN in the affected rows).
2. ``F = max over the group of the 5-bit biased FP16 exponent field of x16`` (bits 14..10), i.e. the
   exponent field of the group's largest ``|x16|``; ``0 <= F <= 30``. Zero padding (see 6) and zeros
   have field 0 and never raise ``F``. ``F`` is what is stored (5 bits, kept in a ``uint8``).
3. The unbiased shared exponent is the one FP16 itself uses for that field:
   ``E = max(F, 1) - 15``, so ``E`` in ``[-14, 15]``; a group whose largest value is an FP16
   subnormal (``F = 0``) uses ``E = -14`` and its mantissas have no hidden bit (as in FP16).
4. Magnitudes: ``m = floor(|x16| * 2**(M - 1 - E))``, an integer in ``[0, 2**M - 1]`` (truncation:
   values below ``2**(E - M + 1)`` flush to zero). The sign is the FP16 sign bit, so ``-0.0`` and
   negative values that flush to zero keep sign 1 and decode to ``-0.0``.
5. Decoding: ``x_hat = (-1)**sign * m * 2**(E - M + 1)``; with ``q = sign * m`` this is the
   ``q = sign*floor(|x|*2^(M-1-E))``, ``x_hat = q*2^(E-M+1)`` of DESIGN.md. All steps are exact in FP32.
6. ``K`` not a multiple of 64: the last group is padded with ``+0.0``; ``unpack`` drops the padding.

Relation to microxcaling: this equals MX integer quantization (``mx.mx_ops._quantize_mx`` with an
``int{M+1}`` element format, i.e. ``ebits=0, mbits=M+1``, ``block_size=64``, ``round="floor"``,
shared exponent ``floor(log2(max|x|))``) applied to ``x16``, whenever the group's largest value is a
normal FP16 number or the group is all zeros. (MX's element max ``2 - 2**(2-mbits)`` is never hit,
because ``|x16| / 2**E < 2``.) Groups whose maximum is an FP16 subnormal differ: MX would use an
exponent below -14, which the 5-bit Anda exponent cannot hold.

Packed layout (:class:`AndaTensor`), per group of 64 values, bit ``i`` of every 64-bit word is
value ``i`` of the group (LSB first; bit 63 is the int64 sign bit, so words may be negative):

* ``sign``     int64 ``[..., G]``: one sign plane;
* ``mantissa`` int64 ``[..., G, M]``: ``M`` planes, plane 0 holds the most significant bit of ``m``;
* ``exponent`` uint8 ``[..., G]``: the field ``F`` (5 bits used).

Storage is ``64 * (M + 1) + 5`` bits per group, ``(M + 1) / 8 + 5 / 512`` bytes per value.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

GROUP = 64
"""Values per group along K that share one exponent (Anda: 64)."""
FP16_BIAS = 15
MAX_MANTISSA_BITS = 16
FP16_MAX = 65504.0
"""Largest finite FP16 value: larger finite activations saturate to it (step 1 above)."""

__all__ = [
    "GROUP", "AndaTensor", "pack", "unpack", "quantize", "dequantize", "fake_quantize",
    "shared_exponent", "pow2", "bytes_per_value", "check_mantissa_bits", "FP16_MAX", "warn_saturated",
]


@functools.lru_cache(maxsize=None)
def warn_saturated() -> None:
    """Warn once per process that finite activations beyond the FP16 range were saturated."""
    warnings.warn(f"Anda: finite activations with |x| > {FP16_MAX:g} are saturated to +-{FP16_MAX:g} "
                  f"(the format is defined on FP16 values); this warning is shown once",
                  RuntimeWarning, stacklevel=3)


def check_mantissa_bits(mantissa_bits: int) -> int:
    if isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, int) \
            or not 1 <= mantissa_bits <= MAX_MANTISSA_BITS:
        raise ValueError(f"Anda mantissa_bits must be an int in 1..16, got {mantissa_bits!r}")
    return mantissa_bits


def bytes_per_value(mantissa_bits: int) -> float:
    """Storage cost of one activation value: ``(M + 1)/8 + 5/512`` bytes."""
    return (check_mantissa_bits(mantissa_bits) + 1) / 8 + 5 / (8 * GROUP)


def pow2(k: Tensor) -> Tensor:
    """Exact ``2.0**k`` in float32 for integer ``k`` in ``[-126, 127]``, built from the bits."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def _to_fp16_groups(x: Tensor) -> tuple[Tensor, int]:
    """Cast to FP16 (checking finiteness), pad K to a multiple of 64, view as ``[..., G, 64]``."""
    if not x.is_floating_point():
        raise TypeError(f"Anda input must be a floating tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("Anda input needs at least one dimension (K is the last one)")
    if not torch.isfinite(x).all():
        raise ValueError("Anda format cannot represent inf or NaN")
    x16 = x.to(torch.float16)
    if not torch.isfinite(x16).all():          # finite values beyond the FP16 range: saturate
        warn_saturated()
        x16 = x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16)   # fp32: bf16 has no 65504
    k = x16.shape[-1]
    pad = (-k) % GROUP
    if pad:
        x16 = torch.nn.functional.pad(x16, (0, pad))
    return x16.contiguous().reshape(*x16.shape[:-1], -1, GROUP), k


def shared_exponent(field: Tensor) -> Tensor:
    """Unbiased shared exponent ``E = max(F, 1) - 15`` (int32) from the stored field ``F``."""
    return field.to(torch.int32).clamp(min=1) - FP16_BIAS


def _encode(x: Tensor, mantissa_bits: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(magnitude int32 [...,G,64], negative bool [...,G,64], field uint8 [...,G], K)``."""
    m_bits = check_mantissa_bits(mantissa_bits)
    g16, k = _to_fp16_groups(x)
    bits = g16.view(torch.int16).to(torch.int32)
    field = ((bits >> 10) & 0x1F).amax(dim=-1)
    e = shared_exponent(field)
    scale_up = pow2(m_bits - 1 - e).unsqueeze(-1)
    mag = torch.floor(g16.abs().to(torch.float32) * scale_up).to(torch.int32)
    return mag, bits < 0, field.to(torch.uint8), k


def quantize(x: Tensor, mantissa_bits: int) -> tuple[Tensor, Tensor]:
    """Integer form used by the kernels: ``(q int32 [..., Kpad], field uint8 [..., G])``.

    ``q = sign * m`` (so ``-0`` becomes ``0``); ``Kpad`` is K rounded up to a multiple of 64.
    """
    mag, neg, field, _ = _encode(x, mantissa_bits)
    q = torch.where(neg, -mag, mag)
    return q.reshape(*q.shape[:-2], -1), field


def dequantize(q: Tensor, field: Tensor, mantissa_bits: int, k: int | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize`: ``q * 2**(E - M + 1)``, trimmed to ``k`` columns."""
    m_bits = check_mantissa_bits(mantissa_bits)
    qg = q.reshape(*q.shape[:-1], -1, GROUP).to(torch.float32)
    scale = pow2(shared_exponent(field) - m_bits + 1).unsqueeze(-1)
    out = (qg * scale).reshape(*q.shape)
    return out[..., : (q.shape[-1] if k is None else k)].to(dtype)


@dataclass(frozen=True)
class AndaTensor:
    """Bit-plane packed Anda tensor (see the module docstring for the layout)."""

    sign: Tensor
    """int64 ``[..., G]``: bit i = sign of value i of the group."""
    mantissa: Tensor
    """int64 ``[..., G, M]``: plane j holds bit ``M-1-j`` of the magnitudes (MSB first)."""
    exponent: Tensor
    """uint8 ``[..., G]``: the shared 5-bit biased FP16 exponent field ``F``."""
    shape: tuple[int, ...]
    """Shape of the original tensor (before padding K)."""
    mantissa_bits: int

    @property
    def num_groups(self) -> int:
        return self.exponent.numel()

    def storage_bits(self) -> int:
        """Bits the format needs: ``64 * (M + 1) + 5`` per group."""
        return self.num_groups * (GROUP * (self.mantissa_bits + 1) + 5)


def _bit_weights(device) -> Tensor:
    """``[1 << i for i in range(64)]`` as int64 (``1 << 63`` wraps to ``-2**63``)."""
    w = torch.ones(GROUP, dtype=torch.int64, device=device)
    return w << torch.arange(GROUP, dtype=torch.int64, device=device)


def _planes_to_words(bits: Tensor) -> Tensor:
    """``[..., 64]`` of 0/1 -> int64 words (bit i = element i); sums of distinct bits = OR."""
    return (bits.to(torch.int64) * _bit_weights(bits.device)).sum(dim=-1)


def _words_to_planes(words: Tensor) -> Tensor:
    """int64 words -> ``[..., 64]`` int64 of 0/1."""
    shifts = torch.arange(GROUP, dtype=torch.int64, device=words.device)
    return (words.unsqueeze(-1) >> shifts) & 1


def pack(x: Tensor, mantissa_bits: int) -> AndaTensor:
    """Convert ``x`` (``[..., K]``, any float dtype) to a bit-plane packed :class:`AndaTensor`."""
    mag, neg, field, _ = _encode(x, mantissa_bits)
    m_bits = mantissa_bits
    sign = _planes_to_words(neg)
    shifts = torch.arange(m_bits - 1, -1, -1, dtype=torch.int32, device=mag.device)
    mant_bits = (mag.unsqueeze(-2) >> shifts.view(-1, 1)) & 1      # [..., G, M, 64], MSB first
    mantissa = _planes_to_words(mant_bits)
    return AndaTensor(sign, mantissa, field, tuple(x.shape), m_bits)


def unpack(a: AndaTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode an :class:`AndaTensor` to ``dtype`` with the original shape (exact in float32)."""
    m_bits = a.mantissa_bits
    planes = _words_to_planes(a.mantissa)                            # [..., G, M, 64]
    weights = torch.ones(m_bits, dtype=torch.int64, device=planes.device) << torch.arange(
        m_bits - 1, -1, -1, dtype=torch.int64, device=planes.device)
    mag = (planes * weights.view(-1, 1)).sum(dim=-2).to(torch.float32)   # [..., G, 64]
    neg = _words_to_planes(a.sign).bool()
    val = torch.where(neg, -mag, mag) * pow2(shared_exponent(a.exponent) - m_bits + 1).unsqueeze(-1)
    val = val.reshape(*val.shape[:-2], -1)[..., : a.shape[-1]]
    return val.reshape(a.shape).to(dtype)


def fake_quantize(x: Tensor, mantissa_bits: int, dtype: torch.dtype | None = None) -> Tensor:
    """``unpack(pack(x, M))`` without building the planes (signs of zeros kept).

    Fast path (the reference kernel of every Anda linear runs it, so it is on the perplexity
    evaluations' critical path): about 8 passes over ``x`` instead of 20, bit-identical to
    :func:`_encode`: the exponent field of a group's largest ``|x16|`` gives ``E = max(F, 1) - 15``,
    which equals ``max(frexp(max|x16|).exponent - 1, -14)`` (an all-zero group decodes to zeros
    whatever ``E`` is); ``copysign`` keeps the FP16 sign bit, ``-0.0`` included.
    """
    m_bits = check_mantissa_bits(mantissa_bits)
    if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] % GROUP or x.numel() == 0:
        return _fake_quantize_slow(x, m_bits, dtype)
    x16 = x.to(torch.float16)
    a = x16.abs().to(torch.float32).reshape(*x.shape[:-1], -1, GROUP)
    gmax = a.amax(dim=-1, keepdim=True)                  # NaN propagates, inf stays inf
    if not torch.isfinite(gmax).all():
        if not torch.isfinite(x).all():
            return _fake_quantize_slow(x, m_bits, dtype)     # raises the precise ValueError
        warn_saturated()                                     # finite |x| > 65504: saturate
        x16 = x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16)   # fp32: bf16 has no 65504
        a = x16.abs().to(torch.float32).reshape(*x.shape[:-1], -1, GROUP)
        gmax = a.amax(dim=-1, keepdim=True)
    e = torch.frexp(gmax).exponent.sub_(1).clamp_(min=1 - FP16_BIAS)
    a.mul_(pow2(m_bits - 1 - e)).floor_().mul_(pow2(e - m_bits + 1))
    val = torch.copysign(a.reshape(x.shape), x16.to(torch.float32))
    return val.to(x.dtype if dtype is None else dtype)


def _fake_quantize_slow(x: Tensor, mantissa_bits: int, dtype: torch.dtype | None = None) -> Tensor:
    mag, neg, field, k = _encode(x, mantissa_bits)
    magf = mag.to(torch.float32)
    val = torch.where(neg, -magf, magf) * pow2(shared_exponent(field) - mantissa_bits + 1).unsqueeze(-1)
    val = val.reshape(*val.shape[:-2], -1)[..., :k]
    return val.to(x.dtype if dtype is None else dtype)
