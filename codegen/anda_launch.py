"""Launchers for the generated Anda kernels (:mod:`llm_compile.codegen.anda_kernels`).

:func:`plan` picks the kernel specs for a problem shape (GEMV for few rows, compress + GEMM
otherwise); :func:`anda_compress` and :func:`anda_matmul` allocate outputs and launch. CPU tensors run
the kernels under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
CUDA tensors run them compiled.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.codegen.anda_format import GROUP, check_mantissa_bits
from llm_compile.codegen.anda_kernels import AndaKernelSpec, interpreter_active, load_kernel, q_dtype_name

GEMV_MAX_ROWS = 4
"""Up to this many rows (decode batch) the GEMV kernel is used."""

__all__ = ["plan", "anda_compress", "anda_matmul", "GEMV_MAX_ROWS"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan(rows: int, mantissa_bits: int, weight_bits: int, w_group_size: int, mode: str = "auto",
         dot: str = "auto", block_m: int | None = None, block_n: int | None = None) -> list[AndaKernelSpec]:
    """Kernel specs, in launch order, for an ``[rows, K] x [N, K]^T`` Anda matmul."""
    if mode not in ("auto", "gemv", "gemm"):
        raise ValueError(f"mode {mode!r} not in ('auto', 'gemv', 'gemm')")
    if mode == "gemv" or (mode == "auto" and rows <= GEMV_MAX_ROWS):
        return [AndaKernelSpec("gemv", mantissa_bits, weight_bits, w_group_size, 1, block_n or 64)]
    bm = block_m or min(64, max(16, _next_pow2(rows)))
    bn = block_n or 64
    return [AndaKernelSpec("compress", mantissa_bits, block_m=bm),
            AndaKernelSpec("gemm", mantissa_bits, weight_bits, w_group_size, bm, bn, dot)]


def _load(spec: AndaKernelSpec, x: Tensor):
    if not x.is_cuda and not interpreter_active():
        raise RuntimeError(
            "Anda Triton kernels on CPU tensors run under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported, or use anda kernel='reference'")
    return load_kernel(spec)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.dtype == torch.bfloat16 and not x2.is_cuda:
        x2 = x2.float()           # the interpreter has no bf16 arithmetic; fp16 cast is identical
    return x2


def anda_compress(x: Tensor, mantissa_bits: int, block_m: int = 16) -> tuple[Tensor, Tensor]:
    """Kernel version of :func:`anda_format.quantize`: ``(q [..., Kpad], field uint8 [..., G])``.

    Non-finite groups get field 31 instead of raising.
    """
    check_mantissa_bits(mantissa_bits)
    x2 = _as_rows(x)
    r, k = x2.shape
    g = -(-k // GROUP)
    q = torch.empty(r, g * GROUP, dtype=getattr(torch, q_dtype_name(mantissa_bits)), device=x.device)
    e = torch.empty(r, g, dtype=torch.uint8, device=x.device)
    spec = AndaKernelSpec("compress", mantissa_bits, block_m=block_m)
    if r and g:
        fn = _load(spec, x)
        fn[(triton_cdiv(r, block_m), g)](x2, q, e, r, k, x2.stride(0), q.stride(0), e.stride(0),
                                          BLOCK_M=block_m)
    return q.reshape(*x.shape[:-1], g * GROUP), e.reshape(*x.shape[:-1], g)


def anda_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, mantissa_bits: int,
                weight_bits: int, group_size: int, mode: str = "auto", dot: str = "auto",
                block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """``anda(x) @ dequant(qweight, scales)^T + bias`` with the generated kernels; ``[..., N]`` in x.dtype."""
    check_mantissa_bits(mantissa_bits)
    x2 = _as_rows(x)
    r, k = x2.shape
    n = qweight.shape[0]
    k_w = qweight.shape[1] * (2 if weight_bits == 4 else 1)
    if k_w != k or scales.shape != (n, k // group_size):
        raise ValueError(f"anda_matmul: x K={k}, qweight {tuple(qweight.shape)} (INT{weight_bits}), "
                         f"scales {tuple(scales.shape)}, group {group_size} do not fit")
    qweight, scales = qweight.contiguous(), scales.contiguous()
    out_dtype = torch.float32 if (x.dtype == torch.bfloat16 and not x.is_cuda) else x.dtype
    out = torch.empty(r, n, dtype=out_dtype, device=x.device)
    g = -(-k // GROUP)
    specs = plan(r, mantissa_bits, weight_bits, group_size, mode, dot, block_m, block_n)
    b = bias if bias is not None else scales       # dummy pointer when HAS_BIAS=False
    if r == 0 or n == 0:
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    if specs[0].kind == "gemv":
        s = specs[0]
        _load(s, x)[(r, triton_cdiv(n, s.block_n))](
            x2, qweight, scales, b, out, r, n, k, g, x2.stride(0), qweight.stride(0), scales.stride(0),
            out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=s.block_n)
    else:
        cs, gs = specs
        q, e = anda_compress(x2, mantissa_bits, cs.block_m)
        _load(gs, x)[(triton_cdiv(r, gs.block_m), triton_cdiv(n, gs.block_n))](
            q, e, qweight, scales, b, out, r, n, k, g, q.stride(0), e.stride(0), qweight.stride(0),
            scales.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=gs.block_m,
            BLOCK_N=gs.block_n)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
