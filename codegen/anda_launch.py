"""Launchers for the generated Anda kernels (:mod:`llm_compile.codegen.anda_kernels`).

:func:`plan` picks the kernel specs for a problem shape (GEMV for few rows, compress + GEMM
otherwise); :func:`anda_compress` and :func:`anda_matmul` allocate outputs and launch. CPU tensors run
the kernels under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
CUDA tensors run them compiled. What each launch passes (pointer dtypes, constexprs) is spelled
out once in :func:`launch_signature`, which the ahead-of-time compile test uses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.codegen.anda_format import FP16_MAX, GROUP, check_mantissa_bits, warn_saturated
from llm_compile.codegen.anda_kernels import AndaKernelSpec, default_dot, dot_fits, interpreter_active, \
    load_kernel, q_dtype_name

GEMV_MAX_ROWS = 4
"""Up to this many rows (decode batch) the GEMV kernel is used."""

__all__ = ["plan", "anda_compress", "anda_matmul", "launch_signature", "GEMV_MAX_ROWS"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_weight_group(w_group_size: int) -> int:
    if isinstance(w_group_size, bool) or not isinstance(w_group_size, int) or w_group_size < GROUP \
            or w_group_size % GROUP:
        raise ValueError(f"the Anda kernels need a weight group size that is a positive multiple of "
                         f"{GROUP}, got {w_group_size!r} (other sizes: anda kernel='reference')")
    return w_group_size


def plan(rows: int, mantissa_bits: int, weight_bits: int, w_group_size: int, mode: str = "auto",
         dot: str = "auto", block_m: int | None = None, block_n: int | None = None,
         asym: bool = False) -> list[AndaKernelSpec]:
    """Kernel specs, in launch order, for an ``[rows, K] x [N, K]^T`` Anda matmul (``asym``:
    asymmetric weights with per-group minimums)."""
    check_mantissa_bits(mantissa_bits)
    check_weight_group(w_group_size)
    if mode not in ("auto", "gemv", "gemm"):
        raise ValueError(f"mode {mode!r} not in ('auto', 'gemv', 'gemm')")
    if mode == "gemv" or (mode == "auto" and rows <= GEMV_MAX_ROWS):
        return [AndaKernelSpec("gemv", weight_bits=weight_bits, block_n=block_n or 64, asym=asym,
                               mantissa_bits=mantissa_bits, w_group_size=w_group_size)]
    dot = default_dot(mantissa_bits) if dot == "auto" else dot
    if not dot_fits(dot, mantissa_bits):
        raise ValueError(f"dot {dot!r} cannot hold {mantissa_bits} mantissa bits exactly")
    bm = block_m or min(64, max(16, _next_pow2(rows)))
    bn = block_n or 64
    return [AndaKernelSpec("compress", dot, block_m=bm, mantissa_bits=mantissa_bits),
            AndaKernelSpec("gemm", dot, weight_bits, bm, bn, asym=asym, mantissa_bits=mantissa_bits,
                           w_group_size=w_group_size)]


_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8",
                torch.int16: "i16", torch.int32: "i32", torch.uint8: "u8"}


def _dev_dtype(x_dtype: torch.dtype, cuda: bool) -> torch.dtype:
    """Activation dtype the kernels see: bf16 becomes fp32 on CPU (the interpreter has no bf16)."""
    return torch.float32 if (x_dtype == torch.bfloat16 and not cuda) else x_dtype


def launch_signature(spec: AndaKernelSpec, x_dtype: torch.dtype, scale_dtype: torch.dtype,
                     bias_dtype: torch.dtype | None, cuda: bool = True) -> tuple[dict, dict]:
    """``(signature, constexprs)`` of the launch of ``spec`` by :func:`anda_matmul` /
    :func:`anda_compress` for these tensor dtypes (``bias_dtype=None``: no bias); the argument
    types are Triton's (``"*fp16"``, ``"i32"``...), as ``triton.compiler.ASTSource`` takes them."""
    xt = _TRITON_TYPE[_dev_dtype(x_dtype, cuda)]
    st = _TRITON_TYPE[scale_dtype]
    if spec.kind == "compress":
        ptrs = dict(x_ptr=xt, q_ptr=_TRITON_TYPE[getattr(torch, spec.q_dtype)], e_ptr="u8")
        names = ["x_ptr", "q_ptr", "e_ptr", "R", "K", "M", "stride_xr", "stride_qr", "stride_er"]
        return {n: "*" + ptrs[n] if n in ptrs else "i32" for n in names}, dict(BLOCK_M=spec.block_m)
    wt = "u8" if spec.weight_bits == 4 or spec.asym else "i8"
    bt = _TRITON_TYPE[bias_dtype] if bias_dtype is not None else st   # no bias: scales as dummy
    const = dict(HAS_BIAS=bias_dtype is not None, BLOCK_N=spec.block_n)
    if spec.kind == "gemv":
        ptrs = dict(x_ptr=xt, w_ptr=wt, s_ptr=st, mn_ptr=st, b_ptr=bt, out_ptr=xt)
        names = ["x_ptr", "w_ptr", "s_ptr", "mn_ptr", "b_ptr", "out_ptr", "R", "N", "K", "G", "M", "W_GROUP",
                 "stride_xr", "stride_wn", "stride_sn", "stride_or"]
    else:
        ptrs = dict(q_ptr=_TRITON_TYPE[getattr(torch, spec.q_dtype)], e_ptr="u8", w_ptr=wt, s_ptr=st,
                    mn_ptr=st, b_ptr=bt, out_ptr=xt)   # symmetric: scales passed as the unused mins
        names = [*ptrs, "R", "N", "K", "G", "M", "W_GROUP", "stride_qr", "stride_er", "stride_wn",
                 "stride_sn", "stride_or"]
        const["BLOCK_M"] = spec.block_m
    return {n: "*" + ptrs[n] if n in ptrs else "i32" for n in names}, const


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
    if not x2.is_cuda and x2.dtype != torch.float16 and x2.numel():
        # finite |x| > 65504 saturate in the kernels; say so once. Only on CPU: on CUDA this check
        # would cost a host sync per call, so there the saturation happens silently (documented).
        a = x2.abs()
        if bool(((a > FP16_MAX) & (a != float("inf"))).any()):
            warn_saturated()
    return x2.to(_dev_dtype(x2.dtype, x2.is_cuda))   # CPU bf16 -> fp32: the fp16 cast is identical


def anda_compress(x: Tensor, mantissa_bits: int, block_m: int = 16, dot: str | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Kernel version of :func:`anda_format.quantize`: ``(q [..., Kpad], field uint8 [..., G])``.

    ``q`` is stored as ``q_dtype_name(dot)`` (default dot: :func:`default_dot`). Non-finite groups
    get field 31 instead of raising.
    """
    check_mantissa_bits(mantissa_bits)
    dot = dot or default_dot(mantissa_bits)
    if not dot_fits(dot, mantissa_bits):
        raise ValueError(f"dot {dot!r} cannot hold {mantissa_bits} mantissa bits exactly")
    x2 = _as_rows(x)
    r, k = x2.shape
    g = -(-k // GROUP)
    q = torch.empty(r, g * GROUP, dtype=getattr(torch, q_dtype_name(dot)), device=x.device)
    e = torch.empty(r, g, dtype=torch.uint8, device=x.device)
    spec = AndaKernelSpec("compress", dot, block_m=block_m)
    if r and g:
        fn = _load(spec, x)
        fn[(triton_cdiv(r, block_m), g)](x2, q, e, r, k, mantissa_bits, x2.stride(0), q.stride(0),
                                          e.stride(0), BLOCK_M=block_m)
    return q.reshape(*x.shape[:-1], g * GROUP), e.reshape(*x.shape[:-1], g)


def anda_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, mantissa_bits: int,
                weight_bits: int, group_size: int, mode: str = "auto", dot: str = "auto",
                block_m: int | None = None, block_n: int | None = None, mins: Tensor | None = None) -> Tensor:
    """``anda(x) @ dequant(qweight, scales[, mins])^T + bias`` with the generated kernels;
    ``[..., N]`` in x.dtype.

    ``mins=None`` (symmetric): INT4 ``uint8 [N, K/2]`` nibbles ``q + 8``, INT8 ``int8 [N, K]``,
    ``W = q * scale``. ``mins`` ``[N, K/group]`` (dtype of ``scales``): unsigned weights, INT4
    ``uint8 [N, K/2]`` nibbles ``u`` in 0..15 (low nibble = even k, no offset), INT8 ``uint8 [N, K]``,
    ``W = u * scale + min``. ``group_size``: a multiple of 64 (others: the reference op).
    """
    check_mantissa_bits(mantissa_bits)
    check_weight_group(group_size)
    if weight_bits not in (4, 8):
        raise ValueError(f"anda_matmul: weight_bits={weight_bits!r} not in (4, 8)")
    want = torch.int8 if (weight_bits == 8 and mins is None) else torch.uint8
    if qweight.dtype != want:
        raise ValueError(f"anda_matmul: {'asymmetric' if mins is not None else 'symmetric'} INT{weight_bits} "
                         f"weights are stored as {want}, got {qweight.dtype}")
    if mins is not None and (mins.shape != scales.shape or mins.dtype != scales.dtype):
        raise ValueError(f"anda_matmul: mins {tuple(mins.shape)} {mins.dtype} must match scales "
                         f"{tuple(scales.shape)} {scales.dtype}")
    x2 = _as_rows(x)
    r, k = x2.shape
    n = qweight.shape[0]
    k_w = qweight.shape[1] * (2 if weight_bits == 4 else 1)
    if k_w != k or scales.shape != (n, k // group_size) or k % group_size:
        raise ValueError(f"anda_matmul: x K={k}, qweight {tuple(qweight.shape)} (INT{weight_bits}), "
                         f"scales {tuple(scales.shape)}, group {group_size} do not fit")
    qweight, scales = qweight.contiguous(), scales.contiguous()
    mn = mins.contiguous() if mins is not None else scales      # unused by symmetric kernels
    out = torch.empty(r, n, dtype=x2.dtype, device=x.device)
    g = -(-k // GROUP)
    specs = plan(r, mantissa_bits, weight_bits, group_size, mode, dot, block_m, block_n, asym=mins is not None)
    b = bias if bias is not None else scales       # dummy pointer when HAS_BIAS=False
    if b.dtype == torch.bfloat16 and not b.is_cuda:
        b = b.float()                               # the interpreter has no bf16
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
            x2, qweight, scales, mn, b, out, r, n, k, g, mantissa_bits, group_size, x2.stride(0),
            qweight.stride(0), scales.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            BLOCK_N=s.block_n)
    else:
        cs, gs = specs
        q, e = anda_compress(x2, mantissa_bits, cs.block_m, cs.dot)
        _load(gs, x)[(triton_cdiv(r, gs.block_m), triton_cdiv(n, gs.block_n))](
            q, e, qweight, scales, mn, b, out, r, n, k, g, mantissa_bits, group_size, q.stride(0),
            e.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            BLOCK_M=gs.block_m, BLOCK_N=gs.block_n)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
