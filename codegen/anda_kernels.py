"""Generator of readable Triton kernels for Anda activations x INT4/INT8 weights.

Each :class:`AndaKernelSpec` (kernel kind, mantissa bits ``M``, weight bits, weight group size,
tile sizes, dot flavour) becomes one small Python module of Triton source. :func:`kernel_source`
returns the text (the debug dump saves it); :func:`load_kernel` writes it to the cache directory
(``$LLMACCEL_KERNEL_CACHE`` or ``~/.cache/llm_compile/anda_kernels``), keyed by the spec and a hash
of the text, and imports it from there.

Kernels (all compute exactly the Anda conversion of :mod:`llm_compile.codegen.anda_format`):

* ``compress``: float ``x [R, K]`` -> signed mantissas ``q [R, Kpad]`` (int8 for M<=7, int16 for
  M<=15, int32 for M=16) and exponent fields ``uint8 [R, G]``. Groups holding inf/NaN (or values
  that overflow FP16) get field 31 and make the GEMM output NaN (kernels cannot raise).
* ``gemm``: ``out[r, n] = sum_g 2^(E[r,g]-M+1) * s[n, g*64 // gs] * sum_{k in g} q[r,k]*w[n,k]``
  (+ bias), one 64-group per K step, FP32 accumulation. The per-group integer dot is
  ``i8``: one int8 ``tl.dot`` (M <= 7, sign + 7 bits fit int8; tensor cores on GPU);
  ``i8x2``: M <= 14, ``|q| = hi*128 + lo`` and two int8 dots (exact); ``f32``: an fp32 ``tl.dot``
  with ``input_precision="ieee"`` (any M; exact while partial sums stay below 2^24).
* ``gemv``: few rows (decode). One program per (row, N block); the activation is converted inline
  (no compress launch) and the integer dot is an exact int32 multiply + ``tl.sum``.

INT4 weights are ``uint8 [N, K/2]``, low nibble = even k, offset 8 (see ``llm_compile.quantize``):
the kernel reads byte ``k // 2`` and shifts by ``4 * (k % 2)``. Interpreter-safe: no bf16
arithmetic, no inline asm, no libdevice; tiles are powers of two and ``tl.dot`` dims are >= 16.
CPU tensors need triton imported with ``TRITON_INTERPRET=1`` (see :func:`interpreter_active`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import textwrap
import threading
from dataclasses import dataclass

GROUP = 64
KINDS = ("compress", "gemm", "gemv")
DOTS = ("i8", "i8x2", "f32")

__all__ = ["AndaKernelSpec", "kernel_source", "load_kernel", "kernel_path", "cache_dir", "default_dot",
           "q_dtype_name", "interpreter_active"]


def default_dot(mantissa_bits: int) -> str:
    """Integer-exact dot flavour for ``M``: ``i8`` (M<=7), ``i8x2`` (M<=14), else ``f32``."""
    return "i8" if mantissa_bits <= 7 else "i8x2" if mantissa_bits <= 14 else "f32"


def q_dtype_name(mantissa_bits: int) -> str:
    """Storage dtype of the signed mantissas ``q`` written by ``compress``."""
    return "int8" if mantissa_bits <= 7 else "int16" if mantissa_bits <= 15 else "int32"


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class AndaKernelSpec:
    kind: str
    """``compress``, ``gemm`` or ``gemv``."""
    mantissa_bits: int
    weight_bits: int = 4
    """4 or 8 (ignored by ``compress``)."""
    w_group_size: int = 128
    """Weight scale group along K; a multiple of 64 (ignored by ``compress``)."""
    block_m: int = 16
    """Rows per program (``compress``/``gemm``; ``gemv`` uses 1)."""
    block_n: int = 64
    """Output columns per program (``gemm``/``gemv``)."""
    dot: str = "auto"
    """``gemm`` only: ``i8``, ``i8x2``, ``f32`` or ``auto`` (:func:`default_dot`)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kernel kind {self.kind!r} not in {KINDS}")
        if not 1 <= self.mantissa_bits <= 16:
            raise ValueError(f"mantissa_bits={self.mantissa_bits} not in 1..16")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits={self.weight_bits} not in (4, 8)")
        if self.w_group_size % GROUP:
            raise ValueError(f"weight group size {self.w_group_size} is not a multiple of {GROUP}")
        if not (_pow2(self.block_m) and _pow2(self.block_n)):
            raise ValueError("block sizes must be powers of two")
        dot = self.resolved_dot
        if dot not in DOTS:
            raise ValueError(f"dot {self.dot!r} not in {DOTS + ('auto',)}")
        if self.kind == "gemm" and (self.block_m < 16 or self.block_n < 16):
            raise ValueError("tl.dot needs block_m, block_n >= 16")
        if dot == "i8" and self.mantissa_bits > 7 or dot == "i8x2" and self.mantissa_bits > 14:
            raise ValueError(f"dot {dot!r} cannot hold {self.mantissa_bits} mantissa bits")

    @property
    def resolved_dot(self) -> str:
        return default_dot(self.mantissa_bits) if self.dot == "auto" else self.dot

    @property
    def name(self) -> str:
        m = self.mantissa_bits
        if self.kind == "compress":
            return f"anda_compress_m{m}_bm{self.block_m}"
        tail = f"_w{self.weight_bits}_g{self.w_group_size}"
        if self.kind == "gemv":
            return f"anda_gemv_m{m}{tail}_bn{self.block_n}"
        return f"anda_gemm_m{m}{tail}_bm{self.block_m}_bn{self.block_n}_{self.resolved_dot}"


_HEADER = '''\
"""Generated by llm_compile.codegen.anda_kernels -- {name}.

{summary}
"""
import triton
import triton.language as tl

M_BITS = {m}          # Anda mantissa bits, hidden bit included
'''

_CONVERT = '''

@triton.jit
def anda_convert(x, M: tl.constexpr):
    """Anda conversion of a [rows, 64] tile: returns (q int32 = sign*m, field int32 [rows]).

    x16 = fp16(x); F = max 5-bit exponent field of the row's group; E = max(F, 1) - 15;
    m = floor(|x16| * 2^(M-1-E)) (float->int truncation, exact); sign = fp16 sign bit.
    """
    x16 = x.to(tl.float16)
    bits = x16.to(tl.int16, bitcast=True).to(tl.int32)
    field = tl.max((bits >> 10) & 0x1F, axis=1)
    e = tl.maximum(field, 1) - 15
    up = ((M - 1 - e + 127) << 23).to(tl.float32, bitcast=True)     # exact 2^(M-1-E)
    ax = tl.abs(x16.to(tl.float32))
    ax = tl.where(ax <= 65504.0, ax, 0.0)        # inf/NaN: field 31 makes the result NaN anyway
    mag = (ax * up[:, None]).to(tl.int32)
    return tl.where(bits < 0, -mag, mag), field
'''

_SCALE = '''

@triton.jit
def anda_scale(field, M: tl.constexpr):
    """2^(E-M+1) for exponent fields (exact, from the bits); NaN for field 31 (inf/NaN input)."""
    e = tl.maximum(field, 1) - 15
    s = ((e - M + 1 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(field == 31, float("nan"), s)
'''


def _weight_tile(spec: AndaKernelSpec, k_dim: str) -> str:
    """Source loading integer weights ``w`` with K along ``k_dim`` ("rows" -> [64, BN], "cols" -> [BN, 64])."""
    if k_dim == "rows":
        kk, nn_, mask = "ks[:, None]", "ns[None, :]", "kmask[:, None] & nmask[None, :]"
    else:
        kk, nn_, mask = "ks[None, :]", "ns[:, None]", "nmask[:, None] & kmask[None, :]"
    if spec.weight_bits == 8:
        return f"w = tl.load(w_ptr + {nn_} * stride_wn + {kk}, mask={mask}, other=0).to(tl.int32)"
    return (f"byte = tl.load(w_ptr + {nn_} * stride_wn + {kk} // 2, mask={mask}, other=0x88).to(tl.int32)\n"
            f"w = ((byte >> (({kk} % 2) * 4)) & 0xF) - 8          # INT4: low nibble = even k, offset 8")


_COMPRESS = '''

@triton.jit
def {name}(x_ptr, q_ptr, e_ptr, R, K, stride_xr, stride_qr, stride_er,
           BLOCK_M: tl.constexpr):
    """Grid (cdiv(R, BLOCK_M), G): one [BLOCK_M, 64] group tile per program."""
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = g * 64 + tl.arange(0, 64)
    rmask = rows < R
    x = tl.load(x_ptr + rows[:, None] * stride_xr + ks[None, :],
                mask=rmask[:, None] & (ks[None, :] < K), other=0.0)    # zero padding past K
    q, field = anda_convert(x, M_BITS)
    tl.store(q_ptr + rows[:, None] * stride_qr + ks[None, :], q.to(tl.{qt}), mask=rmask[:, None])
    tl.store(e_ptr + rows * stride_er + g, field.to(tl.uint8), mask=rmask)
'''

_GEMM = '''

@triton.jit
def {name}(q_ptr, e_ptr, w_ptr, s_ptr, b_ptr, out_ptr, R, N, K, G,
           stride_qr, stride_er, stride_wn, stride_sn, stride_or,
           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(R, BLOCK_M), cdiv(N, BLOCK_N)). out[R, N] = anda(q, e) @ (w * s)^T + bias."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    nmask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, G):
        ks = g * 64 + tl.arange(0, 64)
        kmask = ks < K
        qa = tl.load(q_ptr + rows[:, None] * stride_qr + ks[None, :], mask=rmask[:, None], other=0).to(tl.int32)
        a_scale = anda_scale(tl.load(e_ptr + rows * stride_er + g, mask=rmask, other=0).to(tl.int32), M_BITS)
{weight}
        w_scale = tl.load(s_ptr + ns * stride_sn + (g * 64) // W_GROUP, mask=nmask, other=0.0).to(tl.float32)
{dot}
        acc += part * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_or + ns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])
'''

_DOTS = {
    "i8": "part = tl.dot(qa.to(tl.int8), w.to(tl.int8), out_dtype=tl.int32).to(tl.float32)   # exact",
    "i8x2": (
        "# |q| < 2^14 = hi * 128 + lo: two exact int8 dots\n"
        "mag = tl.abs(qa)\n"
        "hi = tl.where(qa < 0, -(mag >> 7), mag >> 7).to(tl.int8)\n"
        "lo = tl.where(qa < 0, -(mag & 127), mag & 127).to(tl.int8)\n"
        "w8 = w.to(tl.int8)\n"
        "part = (tl.dot(hi, w8, out_dtype=tl.int32) * 128\n"
        "        + tl.dot(lo, w8, out_dtype=tl.int32)).to(tl.float32)"),
    "f32": ("part = tl.dot(qa.to(tl.float32), w.to(tl.float32), input_precision=\"ieee\")"),
}

_GEMV = '''

@triton.jit
def {name}(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, R, N, K, G,
           stride_xr, stride_wn, stride_sn, stride_or,
           HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (R, cdiv(N, BLOCK_N)). Converts the activation row inline, integer dot by multiply+sum."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(0, G):
        ks = g * 64 + tl.arange(0, 64)
        kmask = ks < K
        x = tl.load(x_ptr + row * stride_xr + ks[None, :], mask=kmask[None, :], other=0.0)   # [1, 64]
        q, field = anda_convert(x, M_BITS)
        a_scale = anda_scale(field, M_BITS)                                                 # [1]
{weight}
        part = tl.sum(w * q, axis=1).to(tl.float32)                # exact int32 dot, [BLOCK_N]
        w_scale = tl.load(s_ptr + ns * stride_sn + (g * 64) // W_GROUP, mask=nmask, other=0.0).to(tl.float32)
        acc += part * a_scale * w_scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_or + ns, acc.to(out_ptr.dtype.element_ty), mask=nmask)
'''


def _indent(src: str, n: int = 8) -> str:
    return textwrap.indent(src, " " * n)


def kernel_source(spec: AndaKernelSpec) -> str:
    """Readable Triton source of the module for ``spec`` (kernel function named ``spec.name``)."""
    m = spec.mantissa_bits
    if spec.kind == "compress":
        summary = (f"Anda compressor: float -> (q {q_dtype_name(m)}, exponent uint8), M={m}, "
                   f"BLOCK_M={spec.block_m}.")
        body = _CONVERT + _COMPRESS.format(name=spec.name, qt=q_dtype_name(m))
    else:
        consts = f"W_GROUP = {spec.w_group_size}   # weight scale group along K (INT{spec.weight_bits})\n"
        if spec.kind == "gemm":
            summary = (f"Anda x INT{spec.weight_bits} GEMM, M={m}, weight group {spec.w_group_size}, "
                       f"tiles {spec.block_m}x{spec.block_n}x64, dot={spec.resolved_dot}.")
            body = consts + _SCALE + _GEMM.format(
                name=spec.name, weight=_indent(_weight_tile(spec, "rows")),
                dot=_indent(_DOTS[spec.resolved_dot]))
        else:
            summary = (f"Anda x INT{spec.weight_bits} GEMV (inline conversion), M={m}, weight group "
                       f"{spec.w_group_size}, BLOCK_N={spec.block_n}.")
            body = consts + _CONVERT + _SCALE + _GEMV.format(
                name=spec.name, weight=_indent(_weight_tile(spec, "cols")))
    return _HEADER.format(name=spec.name, summary=summary, m=m) + body


def cache_dir() -> str:
    d = os.environ.get("LLMACCEL_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm_compile", "anda_kernels")
    os.makedirs(d, exist_ok=True)
    return d


_LOCK = threading.Lock()
_LOADED: dict[AndaKernelSpec, object] = {}


def interpreter_active() -> bool:
    """Whether triton was imported in interpreter mode (``TRITON_INTERPRET=1`` *before* importing
    triton: its standard library, e.g. ``tl.sum``, is decorated then). Needed for CPU tensors."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def kernel_path(spec: AndaKernelSpec) -> str:
    src = kernel_source(spec)
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"{spec.name}_{digest}.py")


def load_kernel(spec: AndaKernelSpec):
    """The ``@triton.jit`` kernel for ``spec``: source written to the cache dir and imported."""
    fn = _LOADED.get(spec)
    if fn is not None:
        return fn
    with _LOCK:
        if spec in _LOADED:
            return _LOADED[spec]
        path = kernel_path(spec)
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(kernel_source(spec))
            os.replace(tmp, path)
        mod_name = f"llmaccel_anda_kernels.{os.path.basename(path)[:-3]}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = mod            # triton resolves globals through the module
        mspec.loader.exec_module(mod)
        fn = _LOADED[spec] = getattr(mod, spec.name)
        return fn
