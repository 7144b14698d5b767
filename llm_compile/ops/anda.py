"""``llmaccel::anda_linear``: Anda activations x INT4/INT8 group-quantized weights.

Contract::

    anda_linear(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size, kernel) -> out
      x         [..., K] float (fp32/fp16/bf16)
      qweight   INT4: uint8 [N, K/2] (two per byte, low nibble = even k, offset 8); INT8: int8 [N, K]
      scales    [N, K/group_size] float (symmetric group scales, see llm_compile.quantize)
      bias      [N] or None
      out       [..., N] in x.dtype
      = anda(x, M) @ (q * scale)^T + bias, with anda() the exact conversion of
        llm_compile.codegen.anda_format (groups of 64 along K, shared FP16 exponent, M-bit mantissas)

``kernel``: ``"triton"`` (generated kernels: GEMV for <= 4 rows, compress + GEMM otherwise;
interpreted for CPU tensors, compiled for CUDA) or ``"reference"`` (pure torch: fake-quantize x,
dequantize W, FP32 matmul). The reference raises ``ValueError`` on inf/NaN activations; the kernels
cannot raise and return NaN in the affected rows instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.codegen import anda_format
from llm_compile.codegen.anda_launch import anda_matmul
from llm_compile.quantize import dequantize_weight

KERNELS = ("triton", "reference")

__all__ = ["anda_linear", "anda_linear_reference", "KERNELS"]


def anda_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None,
                          mantissa_bits: int, weight_bits: int, group_size: int) -> Tensor:
    """Pure-torch Anda FP-INT linear (FP32 math), the numerical reference of the kernels."""
    xq = anda_format.fake_quantize(x, mantissa_bits, dtype=torch.float32)
    w = dequantize_weight(qweight, scales, weight_bits, group_size, torch.float32)
    out = xq @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def _check(x: Tensor, qweight: Tensor, scales: Tensor, weight_bits: int, group_size: int, kernel: str):
    if kernel not in KERNELS:
        raise ValueError(f"llmaccel::anda_linear: kernel={kernel!r} not in {KERNELS}")
    if weight_bits not in (4, 8):
        raise ValueError(f"llmaccel::anda_linear: weight_bits={weight_bits} not in (4, 8)")
    k = qweight.shape[1] * (2 if weight_bits == 4 else 1)
    if x.shape[-1] != k or k % group_size or scales.shape[-1] != k // group_size:
        raise ValueError(f"llmaccel::anda_linear: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)} and group_size={group_size} do not fit")


@torch.library.custom_op("llmaccel::anda_linear", mutates_args=())
def anda_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, mantissa_bits: int,
                weight_bits: int, group_size: int, kernel: str) -> Tensor:
    _check(x, qweight, scales, weight_bits, group_size, kernel)
    if kernel == "reference" or group_size % anda_format.GROUP:
        # the kernels need weight groups that are whole 64-groups; others take the reference path
        return anda_linear_reference(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size)
    return anda_matmul(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size)


@anda_linear.register_fake
def _(x, qweight, scales, bias, mantissa_bits, weight_bits, group_size, kernel):
    _check(x, qweight, scales, weight_bits, group_size, kernel)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
