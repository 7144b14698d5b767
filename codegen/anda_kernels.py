"""Generator of readable Triton kernels for Anda activations x INT4/INT8 weights.

Each :class:`AndaKernelSpec` (kernel kind, storage type of the Anda mantissas, dot flavour, weight
bits, tile sizes) becomes one small Python module of Triton source. :func:`kernel_source` returns
the text (the debug dump saves it); :func:`load_kernel` writes it to the cache directory
(``$LLMACCEL_KERNEL_CACHE`` or ``~/.cache/llm_compile/anda_kernels``), keyed by the spec and a hash
of the text, and imports it from there.

Kernels (all compute exactly the Anda conversion of :mod:`llm_compile.codegen.anda_format`):

* ``compress``: float ``x [R, K]`` -> signed mantissas ``q [R, Kpad]`` (``int8`` / ``int16`` /
  ``int32``, see :func:`q_dtype_name`) and exponent fields ``uint8 [R, G]``. Finite values beyond
  the FP16 range saturate to +-65504 (as in the reference); groups holding inf/NaN get field 31 and
  make the output row NaN (the reference raises; kernels cannot).
* ``gemm``: ``out[r, n] = sum_g 2^(E[r,g]-M+1) * s[n, g*64 // gs] * sum_{k in g} q[r,k]*w[n,k]``
  (+ bias), one 64-group per K step, FP32 accumulation. The per-group integer dot is
  ``i8``: one int8 ``tl.dot`` (M <= 7, sign + 7 bits fit int8; tensor cores on GPU);
  ``i8x2``: M <= 14, ``|q| = hi*128 + lo`` and two int8 dots (exact); ``f32``: an fp32 ``tl.dot``
  with ``input_precision="ieee"`` (any M; exact while partial sums stay below 2^24).
* ``gemv``: few rows (decode). One program per (row, N block); the activation is converted inline
  (no compress launch) and the integer dot is an exact int32 multiply + ``tl.sum``.

The mantissa width ``M`` and the weight group size are *runtime* scalars of the kernels (they only
enter shift amounts and one index division per K step, so specialising on them buys nothing and
would multiply the number of GPU compilations); what changes the code is specialised: the
mantissa storage type and dot flavour (from ``M``, :func:`default_dot`), weight bits, tiles, bias.
Every constant a kernel reads is a ``tl.constexpr`` parameter or a literal: the Triton compiler
(unlike the interpreter) rejects plain Python globals. ``tests/codegen/test_aot_compile.py``
compiles every spec :func:`~llm_compile.codegen.anda_launch.plan` can produce for sm_80 and sm_90.

Weights (see ``llm_compile.quantize``): INT4 ``uint8 [N, K/2]``, low nibble = even k (the kernel
reads byte ``k // 2`` and shifts by ``4 * (k % 2)``); INT8 ``[N, K]``. Symmetric (``asym=False``):
INT4 nibble ``u = q + 8``, INT8 ``int8 q``, ``W = q * scale``. Asymmetric (``asym=True``, a ``mins``
tensor shaped like ``scales``): unsigned ``u`` (INT4 nibble 0..15 without offset, INT8 ``uint8``),
``W = u * scale + min``. The kernels always multiply signed ``w = u - off`` (off = 8 / 128, so
the int8 dots apply) and add ``(min + off*scale) * sum(q)`` once per 64-group. Interpreter-safe: no bf16
arithmetic, no inline asm, no libdevice; tiles are powers of two and ``tl.dot`` dims are >= 16.
CPU tensors need triton imported with ``TRITON_INTERPRET=1`` (see :func:`interpreter_active`).
"""
from __future__ import annotations

import os
import textwrap
import threading
from dataclasses import dataclass, field, fields

from llm_compile.codegen.source_cache import import_source, private_dir, source_path

GROUP = 64
KINDS = ("compress", "gemm", "gemv")
DOTS = ("i8", "i8x2", "f32")
Q_DTYPES = ("int8", "int16", "int32")
_DOT_OF_Q = {"int8": "i8", "int16": "i8x2", "int32": "f32"}
_Q_OF_DOT = {v: k for k, v in _DOT_OF_Q.items()}
_MAX_M_OF_DOT = {"i8": 7, "i8x2": 14, "f32": 16}

__all__ = ["AndaKernelSpec", "kernel_source", "load_kernel", "kernel_path", "cache_dir", "default_dot",
           "q_dtype_name", "dot_fits", "interpreter_active", "GROUP", "DOTS"]


def default_dot(mantissa_bits: int) -> str:
    """Integer-exact dot flavour for ``M``: ``i8`` (M<=7), ``i8x2`` (M<=14), else ``f32``."""
    return "i8" if mantissa_bits <= 7 else "i8x2" if mantissa_bits <= 14 else "f32"


def dot_fits(dot: str, mantissa_bits: int) -> bool:
    """Whether the ``dot`` flavour holds ``M``-bit mantissas exactly."""
    if dot not in DOTS:
        raise ValueError(f"dot {dot!r} not in {DOTS}")
    return mantissa_bits <= _MAX_M_OF_DOT[dot]


def q_dtype_name(dot: str) -> str:
    """Storage dtype of the signed mantissas ``q`` that ``compress`` writes for a ``dot`` flavour."""
    return _Q_OF_DOT[dot]


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class AndaKernelSpec:
    """What the generated source of one kernel depends on (fields a kind ignores are normalised)."""

    kind: str
    """``compress``, ``gemm`` or ``gemv``."""
    dot: str = "i8"
    """``compress``: the mantissa storage it writes (``q_dtype_name(dot)``); ``gemm``: the integer
    dot flavour, ``i8`` / ``i8x2`` / ``f32`` (reads ``q_dtype_name(dot)``); ignored by ``gemv``."""
    weight_bits: int = 4
    """4 or 8 (ignored by ``compress``)."""
    block_m: int = 16
    """Rows per program (``compress``/``gemm``; ``gemv`` uses 1)."""
    block_n: int = 64
    """Output columns per program (``gemm``/``gemv``)."""
    asym: bool = False
    """Asymmetric weights (``gemm``/``gemv``): unsigned integers ``u`` with a scale and a minimum
    per group, ``W = u * scale + min``; the kernel adds ``min * sum(x_hat)`` per group."""
    mantissa_bits: int | None = field(default=None, compare=False)
    """Informational (the kernel takes M at run time): the M this spec was planned for, shown in
    :attr:`name`; specs that differ only here are equal and share one kernel."""
    w_group_size: int | None = field(default=None, compare=False)
    """Informational, like ``mantissa_bits``: the weight group size it was planned for."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kernel kind {self.kind!r} not in {KINDS}")
        if self.dot not in DOTS:
            raise ValueError(f"dot {self.dot!r} not in {DOTS}")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits={self.weight_bits} not in (4, 8)")
        if not (_pow2(self.block_m) and _pow2(self.block_n)):
            raise ValueError("block sizes must be powers of two")
        if self.kind == "gemm" and (self.block_m < 16 or self.block_n < 16):
            raise ValueError("tl.dot needs block_m, block_n >= 16")
        ignored = {"compress": dict(weight_bits=4, block_n=64, asym=False), "gemv": dict(dot="i8", block_m=1),
                   "gemm": {}}[self.kind]
        for name, value in ignored.items():          # one spec (and one compile) per distinct kernel
            object.__setattr__(self, name, value)

    @property
    def q_dtype(self) -> str:
        return q_dtype_name(self.dot)

    @property
    def kernel_name(self) -> str:
        """Name of the generated kernel function (and cache file): what the source depends on."""
        if self.kind == "compress":
            return f"anda_compress_{self.q_dtype}_bm{self.block_m}"
        w = f"w{self.weight_bits}" + ("_asym" if self.asym else "")
        if self.kind == "gemv":
            return f"anda_gemv_{w}_bn{self.block_n}"
        return f"anda_gemm_{self.dot}_{w}_bm{self.block_m}_bn{self.block_n}"

    @property
    def name(self) -> str:
        """``kernel_name``, or for a planned spec a label with its M and weight group (dump file
        names), e.g. ``anda_gemm_m7_w4_g64_bm16_bn64_i8`` for kernel ``anda_gemm_i8_w4_bm16_bn64``."""
        m, gs = self.mantissa_bits, self.w_group_size
        if m is None:
            return self.kernel_name
        if self.kind == "compress":
            return f"anda_compress_m{m}_bm{self.block_m}"
        tail = f"_w{self.weight_bits}" + ("_asym" if self.asym else "") + (f"_g{gs}" if gs else "")
        if self.kind == "gemv":
            return f"anda_gemv_m{m}{tail}_bn{self.block_n}"
        return f"anda_gemm_m{m}{tail}_bm{self.block_m}_bn{self.block_n}_{self.dot}"

    def structural(self) -> dict:
        """The fields the generated source depends on."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}


_HEADER = '''\
"""Generated by llm_compile.codegen.anda_kernels -- {name}.

{summary}
Runtime scalars: M = Anda mantissa bits (hidden bit included){w_group}.
"""
import triton
import triton.language as tl
'''

_CONVERT = '''

@triton.jit
def anda_convert(x, M):
    """Anda conversion of a [rows, 64] tile: returns (q int32 = sign*m, field int32 [rows]).

    x16 = fp16(x) with finite |x| > 65504 saturated to +-65504 (inf/NaN kept: field 31, NaN output);
    F = max 5-bit exponent field of the row's group; E = max(F, 1) - 15;
    m = floor(|x16| * 2^(M-1-E)) (float->int truncation, exact); sign = fp16 sign bit.
    """
    x32 = x.to(tl.float32)
    big = (tl.abs(x32) > 65504.0) & (tl.abs(x32) < float("inf"))
    x16 = tl.where(big, tl.where(x32 < 0, -65504.0, 65504.0), x32).to(tl.float16)
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
def anda_scale(field, M):
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
    if spec.weight_bits == 8 and spec.asym:
        return (f"w = tl.load(w_ptr + {nn_} * stride_wn + {kk}, mask={mask}, other=128).to(tl.int32) - 128"
                f"   # uint8 u = w + 128")
    if spec.weight_bits == 8:
        return f"w = tl.load(w_ptr + {nn_} * stride_wn + {kk}, mask={mask}, other=0).to(tl.int32)"
    return (f"byte = tl.load(w_ptr + {nn_} * stride_wn + {kk} // 2, mask={mask}, other=0x88).to(tl.int32)\n"
            f"w = ((byte >> (({kk} % 2) * 4)) & 0xF) - 8          # INT4: low nibble = even k, u = w + 8")


_COMPRESS = '''

@triton.jit(do_not_specialize=["M"])
def {name}(x_ptr, q_ptr, e_ptr, R, K, M, stride_xr, stride_qr, stride_er,
           BLOCK_M: tl.constexpr):
    """Grid (cdiv(R, BLOCK_M), G): one [BLOCK_M, 64] group tile per program."""
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = g * 64 + tl.arange(0, 64)
    rmask = rows < R
    x = tl.load(x_ptr + rows[:, None] * stride_xr + ks[None, :],
                mask=rmask[:, None] & (ks[None, :] < K), other=0.0)    # zero padding past K
    q, field = anda_convert(x, M)
    tl.store(q_ptr + rows[:, None] * stride_qr + ks[None, :], q.to(tl.{qt}), mask=rmask[:, None])
    tl.store(e_ptr + rows * stride_er + g, field.to(tl.uint8), mask=rmask)
'''

_GEMM = '''

@triton.jit(do_not_specialize=["M", "W_GROUP"])
def {name}(q_ptr, e_ptr, w_ptr, s_ptr, mn_ptr, b_ptr, out_ptr, R, N, K, G, M, W_GROUP,
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
        a_scale = anda_scale(tl.load(e_ptr + rows * stride_er + g, mask=rmask, other=0).to(tl.int32), M)
{weight}
        w_scale = tl.load(s_ptr + ns * stride_sn + (g * 64) // W_GROUP, mask=nmask, other=0.0).to(tl.float32)
{dot}
{accumulate}
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

@triton.jit(do_not_specialize=["M", "W_GROUP"])
def {name}(x_ptr, w_ptr, s_ptr, mn_ptr, b_ptr, out_ptr, R, N, K, G, M, W_GROUP,
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
        q, field = anda_convert(x, M)
        a_scale = anda_scale(field, M)                                                      # [1]
{weight}
        part = tl.sum(w * q, axis=1).to(tl.float32)                # exact int32 dot, [BLOCK_N]
        w_scale = tl.load(s_ptr + ns * stride_sn + (g * 64) // W_GROUP, mask=nmask, other=0.0).to(tl.float32)
{accumulate}
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_or + ns, acc.to(out_ptr.dtype.element_ty), mask=nmask)
'''


_MIN = ("w_min = tl.load(mn_ptr + ns * stride_sn + (g * 64) // W_GROUP, mask=nmask, other=0.0).to(tl.float32)"
        " + {off}.0 * w_scale   # W = (w + {off}) * s + min")


def _accumulate(spec: AndaKernelSpec) -> str:
    """Adds a 64-group's contribution; asymmetric: ``s * sum(q*w) + (min + off*s) * sum(q)``."""
    if not spec.asym:
        return ("acc += part * a_scale[:, None] * w_scale[None, :]" if spec.kind == "gemm"
                else "acc += part * a_scale * w_scale")
    off = 8 if spec.weight_bits == 4 else 128
    if spec.kind == "gemm":
        return (_MIN.format(off=off) + "\n"
                "xsum = tl.sum(qa, axis=1).to(tl.float32)               # sum of the group's q, exact\n"
                "acc += (part * w_scale[None, :] + xsum[:, None] * w_min[None, :]) * a_scale[:, None]")
    return (_MIN.format(off=off) + "\n"
            "xsum = tl.sum(q, axis=1).to(tl.float32)                # [1], exact\n"
            "acc += (part * w_scale + xsum * w_min) * a_scale")


def _indent(src: str, n: int = 8) -> str:
    return textwrap.indent(src, " " * n)


def kernel_source(spec: AndaKernelSpec) -> str:
    """Readable Triton source of the module for ``spec`` (kernel function named ``spec.kernel_name``)."""
    w_group = ", W_GROUP = weight scale group along K (a multiple of 64)"
    if spec.kind == "compress":
        summary = f"Anda compressor: float -> (q {spec.q_dtype}, exponent uint8), BLOCK_M={spec.block_m}."
        body = _CONVERT + _COMPRESS.format(name=spec.kernel_name, qt=spec.q_dtype)
        w_group = ""
    elif spec.kind == "gemm":
        summary = (f"Anda x {'asymmetric ' if spec.asym else ''}INT{spec.weight_bits} GEMM, tiles {spec.block_m}x{spec.block_n}x64, "
                   f"dot={spec.dot} (mantissas stored as {spec.q_dtype}).")
        body = _SCALE + _GEMM.format(name=spec.kernel_name, weight=_indent(_weight_tile(spec, "rows")),
                                     dot=_indent(_DOTS[spec.dot]), accumulate=_indent(_accumulate(spec)))
    else:
        summary = f"Anda x {'asymmetric ' if spec.asym else ''}INT{spec.weight_bits} GEMV (inline conversion), BLOCK_N={spec.block_n}."
        body = _CONVERT + _SCALE + _GEMV.format(name=spec.kernel_name, weight=_indent(_weight_tile(spec, "cols")),
                                                accumulate=_indent(_accumulate(spec)))
    return _HEADER.format(name=spec.kernel_name, summary=summary, w_group=w_group) + body


def cache_dir() -> str:
    """The kernel cache directory, user-only (see :mod:`llm_compile.codegen.source_cache`)."""
    return private_dir(os.environ.get("LLMACCEL_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm_compile", "anda_kernels"), "Anda kernel cache",
        "LLMACCEL_KERNEL_CACHE")


_LOCK = threading.Lock()
_LOADED: dict[AndaKernelSpec, object] = {}


def interpreter_active() -> bool:
    """Whether triton was imported in interpreter mode (``TRITON_INTERPRET=1`` *before* importing
    triton: its standard library, e.g. ``tl.sum``, is decorated then). Needed for CPU tensors."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def kernel_path(spec: AndaKernelSpec) -> str:
    return source_path(cache_dir(), spec.kernel_name, kernel_source(spec))


def load_kernel(spec: AndaKernelSpec):
    """The ``@triton.jit`` kernel for ``spec``: source saved in the cache dir and imported from
    the verified text (a cached file whose content does not match its name is rewritten, never run)."""
    fn = _LOADED.get(spec)
    if fn is not None:
        return fn
    with _LOCK:
        if spec not in _LOADED:
            mod = import_source(cache_dir(), spec.kernel_name, kernel_source(spec), "llmaccel_anda_kernels")
            _LOADED[spec] = getattr(mod, spec.kernel_name)
        return _LOADED[spec]
