"""``llmaccel::anda_linear``: Anda activations x INT4/INT8 group-quantized weights.

Contract::

    anda_linear(x, qweight, scales, mins, bias, mantissa_bits, weight_bits, group_size, kernel) -> out
      x         [..., K] float (fp32/fp16/bf16)
      qweight   symmetric (mins is None): INT4 uint8 [N, K/2] (low nibble = even k, offset 8),
                INT8 int8 [N, K]; asymmetric: unsigned, INT4 uint8 [N, K/2] (no offset), INT8 uint8 [N, K]
      scales    [N, K/group_size] float
      mins      None (symmetric) or [N, K/group_size], same dtype as scales (asymmetric)
      bias      [N] or None
      out       [..., N] in x.dtype
      = anda(x, M) @ W^T + bias, W = q * scale (symmetric) or u * scale + min (asymmetric), with
        anda() the exact conversion of llm_compile.codegen.anda_format (groups of 64 along K, shared
        FP16 exponent, M-bit mantissas); see llm_compile.quantize for the weight formats

``kernel``: ``"triton"`` (generated kernels: GEMV for <= 4 rows, compress + GEMM otherwise;
interpreted for CPU tensors, compiled for CUDA) or ``"reference"`` (pure torch: fake-quantize x,
dequantize W, FP32 matmul; the CPU path). The op's reference path keeps the dequantized FP32 weight
on the ``qweight`` tensor itself (:func:`cached_dequantized_weight`: it dies with the weight and is
recomputed when ``qweight``, ``scales`` or ``mins`` change in place), so decoding does not
re-dequantize every weight every token; this costs 4 bytes per weight of memory. The reference raises ``ValueError`` on inf/NaN activations; the kernels
cannot raise and return NaN in the affected rows instead.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from llm_compile.codegen import anda_format
from llm_compile.codegen.anda_launch import anda_matmul
from llm_compile.quantize import dequantize_weight

KERNELS = ("triton", "reference")

__all__ = ["anda_linear", "anda_linear_reference", "cached_dequantized_weight", "KERNELS"]


_CACHE_ATTR = "_llmaccel_dequantized"


def cached_dequantized_weight(qweight: Tensor, scales: Tensor, mins: Tensor | None, weight_bits: int,
                              group_size: int) -> Tensor:
    """``dequantize_weight(...)`` in FP32, cached as an attribute of ``qweight`` (owned by the
    weight, no global table). Valid while the same ``scales``/``mins`` objects are passed and none
    of the three tensors was modified in place (version counters); recomputed otherwise."""
    try:
        key = (qweight._version, scales._version, None if mins is None else mins._version,
               weight_bits, group_size, qweight.device)
    except RuntimeError:           # inference-mode tensors have no version counter: no cache
        return dequantize_weight(qweight, scales, weight_bits, group_size, torch.float32, mins)
    hit = getattr(qweight, _CACHE_ATTR, None)
    if hit is not None and hit[0] == key and hit[1]() is scales and (
            (mins is None and hit[2] is None) or (mins is not None and hit[2] is not None and hit[2]() is mins)):
        return hit[3]
    w = dequantize_weight(qweight, scales, weight_bits, group_size, torch.float32, mins)
    setattr(qweight, _CACHE_ATTR, (key, weakref.ref(scales), None if mins is None else weakref.ref(mins), w))
    return w


def anda_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None,
                          mantissa_bits: int, weight_bits: int, group_size: int, *,
                          mins: Tensor | None = None, cache: bool = False) -> Tensor:
    """Pure-torch Anda FP-INT linear (FP32 math), the numerical reference of the kernels.

    ``mins`` is keyword-only here (the positional order predates asymmetric weights);
    ``cache=True`` (what the op does) reuses :func:`cached_dequantized_weight`."""
    xq = anda_format.fake_quantize(x, mantissa_bits, dtype=torch.float32)
    if cache:
        w = cached_dequantized_weight(qweight, scales, mins, weight_bits, group_size)
    else:
        w = dequantize_weight(qweight, scales, weight_bits, group_size, torch.float32, mins)
    out = xq @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def _check(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, bias: Tensor | None,
           weight_bits: int, group_size: int, kernel: str):
    if kernel not in KERNELS:
        raise ValueError(f"llmaccel::anda_linear: kernel={kernel!r} not in {KERNELS}")
    if weight_bits not in (4, 8):
        raise ValueError(f"llmaccel::anda_linear: weight_bits={weight_bits} not in (4, 8)")
    k = qweight.shape[1] * (2 if weight_bits == 4 else 1)
    if x.shape[-1] != k or group_size < 1 or k % group_size or scales.dim() != 2 \
            or tuple(scales.shape) != (qweight.shape[0], k // group_size):
        raise ValueError(f"llmaccel::anda_linear: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)} and group_size={group_size} do not fit")
    want_q = torch.uint8 if (weight_bits == 4 or mins is not None) else torch.int8
    if qweight.dtype != want_q:
        form = "symmetric" if mins is None else "asymmetric"
        raise ValueError(f"llmaccel::anda_linear: {form} INT{weight_bits} weights are {want_q}, "
                         f"got qweight {qweight.dtype}")
    if mins is not None and (mins.shape != scales.shape or mins.dtype != scales.dtype):
        raise ValueError(f"llmaccel::anda_linear: mins {mins.dtype}{tuple(mins.shape)} must match "
                         f"scales {scales.dtype}{tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (qweight.shape[0],):
        raise ValueError(f"llmaccel::anda_linear: bias {tuple(bias.shape)} is not [N={qweight.shape[0]}]")


@torch.library.custom_op("llmaccel::anda_linear", mutates_args=())
def anda_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, bias: Tensor | None,
                mantissa_bits: int, weight_bits: int, group_size: int, kernel: str) -> Tensor:
    _check(x, qweight, scales, mins, bias, weight_bits, group_size, kernel)
    if kernel == "reference" or group_size % anda_format.GROUP:
        # the kernels need weight groups that are whole 64-groups; others take the reference path
        return anda_linear_reference(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size,
                                     mins=mins, cache=True)
    if mins is None:
        return anda_matmul(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size)
    # asymmetric groups: the launcher's ``mins`` keyword (engineer A's kernels)
    return anda_matmul(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size, mins=mins)


@anda_linear.register_fake
def _(x, qweight, scales, mins, bias, mantissa_bits, weight_bits, group_size, kernel):
    _check(x, qweight, scales, mins, bias, weight_bits, group_size, kernel)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
