"""Sparse window attention's CPU kernels (``swa_cpu.c``, ``swa_scores.c``), built on first use.

* :func:`sketch_logits`: the key sketch's logits (``recall``). The torch path of
  :meth:`~llm_compile.runtime.swa.sketch.KeySketch.logits` widens every code to float32 before a
  matmul, which on a CPU costs more than the dense ``q K^T`` it replaces (issue 15: 26 ms against
  14 ms at 8k tokens, batch 4). The C kernel reads the packed codes directly (2 bits per value) and
  sums them against the int8 weights in registers: with AVX-512 VNNI (checked at run time,
  :func:`sketch_vnni`) 64 products per instruction, else in float tiles (the same integer sums).
* :func:`sparse_attend`: attention over the kept rows of a float32 cache, read in place with the
  next rows prefetched; replaces a gather (``index_select``: a scattered read, a write and a
  re-read) and two small matmuls, for every policy.
* :func:`query_select`: a query-aware step's pick (``quest``, ``recall``) from the scorer's logits:
  softmax per head, sum per group, the query's top tokens, the history's top tokens among the rest,
  in position order; in torch ~15 ops per site and step over ``[B, Hq, n]`` float buffers that no
  longer fit in L2 at 8k tokens (two ``topk``, a softmax, a sort, masks, pads, a ``cat``).
* :func:`score_sub`, :func:`score_add`, :func:`select_top`: the windowed score bookkeeping of a
  decode step (:class:`~llm_compile.runtime.swa.state.SWAState`: a ring row leaving the window, the
  step's weights entering it, the top-scored tokens in position order). In torch these are ~30 small
  ops per site and step (``topk``, ``sort``, ``scatter_add_``, casts, copies: ~1.2 ms at 8k tokens,
  batch 4, a quarter of an ``alisa`` site's step); here they are three calls.

It is compiled with the C compiler Inductor uses (``$CC``, else ``cc``/``gcc``), with AVX2/FMA/F16C
(and AVX-512 F/BW/VL/DQ) when ``torch.backends.cpu.get_cpu_capability()`` reports them and OpenMP when the compiler has it,
into ``$LLMACCEL_CACHE_DIR`` (default ``~/.cache/llm_compile``) under a name keyed by the source,
the flags and the compiler, and loaded with :mod:`ctypes`. Where no compiler works, the torch path
runs instead, after one warning that says why. ``LLMACCEL_NATIVE=0`` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(f) for f in ("swa_cpu.c", "swa_scores.c")]


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMACCEL_CACHE_DIR", Path.home() / ".cache" / "llm_compile")) / "native"


def _flag_sets() -> list[list[str]]:
    """Flags to try, best first: SIMD only where this CPU has it (the library is keyed by them)."""
    cap = torch.backends.cpu.get_cpu_capability()
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]  # the sketch's 16-token tiles
    simds = {"AVX512": [avx512, avx2, []], "AVX2": [avx2, []]}.get(cap, [[]])
    base = ["-O3", "-shared", "-fPIC", "-std=gnu99"]
    return [base + simd + omp for simd in simds for omp in (["-fopenmp"], ["-fopenmp-simd"])] + [base]


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    src = b"".join(f.read_bytes() for f in _SOURCES)
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(src + " ".join([cc, *flags]).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"swa_cpu_{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                res = subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", str(out), "-lm"], capture_output=True,
                                     text=True, timeout=120)
                if res.returncode:
                    errors.append(f"{' '.join(flags)}: {res.stderr.strip()[-300:]}")
                    continue
                os.replace(out, lib)   # atomic: concurrent builders (test workers) agree
        try:
            return ctypes.CDLL(str(lib))
        except OSError as e:
            errors.append(f"{lib}: {e}")
    raise RuntimeError("could not build swa_cpu.c + swa_scores.c: " + " | ".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (torch path) if it is turned off or cannot be built."""
    if os.environ.get("LLMACCEL_NATIVE", "1") == "0":
        return None
    try:
        lib = _build()
    except Exception as e:  # noqa: BLE001 - any build failure falls back, loudly
        log.warning("llmaccel: the CPU SWA kernels (key sketch, sparse attend) are unavailable (%s); "
                    "the torch path runs instead (correct, slower)", e)
        return None
    return _declare(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The kernels' ctypes signatures."""
    L, P = ctypes.c_long, ctypes.c_void_p
    lib.sketch_logits.argtypes = [P, P, P, P, P, L, L, L, L, L, L, L, L, L, ctypes.c_float, ctypes.c_int]
    lib.sketch_logits.restype = None
    lib.sketch_set_vnni.argtypes = [ctypes.c_int]
    lib.sketch_set_vnni.restype = None
    lib.sketch_vnni_in_use.argtypes = []
    lib.sketch_vnni_in_use.restype = ctypes.c_int
    lib.sparse_attend.argtypes = [P, P, P, P, P, P, P, L, L, L, L, L, L, L, L, L, L, L, L,
                                  ctypes.c_float, ctypes.c_int]
    lib.sparse_attend.restype = None
    lib.score_sub.argtypes = [P, L, P, P, L, L]
    lib.score_sub.restype = None
    lib.score_add.argtypes = [P, L, P, L, P, L, L, L, L, L, P, P, L]
    lib.score_add.restype = None
    lib.select_top.argtypes = [P, L, L, L, L, L, L, L, P, ctypes.c_int]
    lib.select_top.restype = ctypes.c_int
    lib.query_select.argtypes = [P, L, L, L, L, L, L, P, L, L, L, L, L, L, L, P, ctypes.c_int]
    lib.query_select.restype = ctypes.c_int
    return lib


def sketch_vnni(use: bool | None = None) -> bool:
    """Whether :func:`sketch_logits` sums with AVX-512 VNNI (the CPU has it and the library was
    built with AVX-512); ``use=False`` turns it off for this process (the float tiles then give
    the same numbers: tests compare them), ``True`` back on where available."""
    lib = library()
    if lib is None:
        return False
    if use is not None:
        lib.sketch_set_vnni(-1 if use else 0)
    return bool(lib.sketch_vnni_in_use())


def sketch_logits(packed: Tensor, step: Tensor, mn: Tensor, q: Tensor, nb: int, bits: int,
                  scale: float) -> Tensor:
    """``scale * q . k~`` [B, Hq, nb * block] float32 from the first ``nb`` blocks of ``packed``
    [B, H, NBc, D, PB] uint8 with ``step``/``mn`` [B, H, NBc, D] float16; ``q`` [B, Hq, D]."""
    lib = library()
    assert lib is not None, "sketch_logits: call library() first"
    B, H, NBc, D, PB = packed.shape
    Hq = q.shape[1]
    if not (packed.is_contiguous() and step.is_contiguous() and mn.is_contiguous()
            and packed.dtype == torch.uint8 and step.dtype == mn.dtype == torch.float16
            and step.shape == mn.shape == (B, H, NBc, D) and q.shape == (B, Hq, D) and Hq % H == 0
            and 0 <= nb <= NBc and 8 % bits == 0 and not packed.is_cuda):
        raise ValueError(f"sketch_logits: bad inputs {tuple(packed.shape)} {packed.dtype}, "
                         f"{tuple(step.shape)} {step.dtype}, q {tuple(q.shape)}, nb={nb}, bits={bits}")
    qf = q.float().contiguous()
    blk = PB * (8 // bits)
    out = torch.empty(B, Hq, nb * blk, dtype=torch.float32)
    if nb:
        lib.sketch_logits(packed.data_ptr(), step.data_ptr(), mn.data_ptr(), qf.data_ptr(),
                          out.data_ptr(), B, H, Hq // H, D, NBc, PB, bits, nb, nb * blk,
                          float(scale), torch.get_num_threads())
    return out


def sparse_attend(q: Tensor, kf: Tensor, vf: Tensor, idx: Tensor, bias: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor] | None:
    """Attention of ``q`` [B, Hq, D] over the rows ``idx`` [B, 1|Hkv, P] (int64, positions) of the
    caches ``kf``/``vf`` [B, Hkv, n, D|Dv], read in place, with ``bias`` [B, 1|Hq, P] (or None)
    added to the logits. Returns out [B, Hq, Dv] (dtype of q) and the weights [B, Hq, P] float32
    (a row whose slots are all masked: zeros), like
    :func:`~llm_compile.runtime.swa.attend.gather_attend_torch`; None where the kernel does not
    apply (no kernel, not float32 on CPU, rows not contiguous): the caller takes the torch path."""
    lib = library()
    if lib is None or kf.is_cuda or kf.dtype != torch.float32 or vf.dtype != torch.float32:
        return None
    B, Hq, D = q.shape
    H, Dv, P = kf.shape[1], vf.shape[-1], idx.shape[-1]
    if not (kf.stride(-1) == 1 and kf.stride(2) == D and vf.stride(-1) == 1 and vf.stride(2) == Dv):
        return None
    if Hq % H or idx.shape[:1] != (B,) or idx.shape[1] not in (1, H) or (
            bias is not None and (bias.shape[0] != B or bias.shape[1] not in (1, Hq) or bias.shape[2] != P)):
        raise ValueError(f"sparse_attend: q {tuple(q.shape)}, k {tuple(kf.shape)}, idx {tuple(idx.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    qf = q.float().contiguous()
    ix = idx.to(torch.int64).contiguous()
    bs = None if bias is None else bias.float().contiguous()
    out = torch.empty(B, Hq, Dv, dtype=torch.float32)
    w = torch.empty(B, Hq, P, dtype=torch.float32)
    if P:
        lib.sparse_attend(qf.data_ptr(), kf.data_ptr(), vf.data_ptr(), ix.data_ptr(),
                          None if bs is None else bs.data_ptr(), out.data_ptr(), w.data_ptr(),
                          B, H, Hq // H, D, Dv, P, ix.shape[1], 1 if bs is None else bs.shape[1],
                          kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1), float(scale),
                          torch.get_num_threads())
    else:
        out.zero_()
    return out.to(q.dtype), w


def _rows(x: Tensor) -> int | None:
    """Row stride of ``x`` [B, G, n] viewed as [B*G, n] rows (None if it cannot be)."""
    B, G, _ = x.shape
    if x.stride(-1) != 1 or (G > 1 and B > 1 and x.stride(0) != G * x.stride(1)):
        return None
    return x.stride(1) if G > 1 else x.stride(0)


def score_sub(buf: Tensor, idx: Tensor, w: Tensor) -> bool:
    """``buf[b, g, idx[b, g, t]] -= w[b, g, t]`` (a ring row leaving the score window): ``buf``
    [B, G, cap] int64, ``idx`` [B, G, T] int32, ``w`` [B, G, T] int64. False where the kernel does
    not apply (the caller runs torch)."""
    lib, ld = library(), _rows(buf)
    if (lib is None or buf.is_cuda or ld is None or buf.dtype != torch.int64 or idx.dtype != torch.int32
            or w.dtype != torch.int64 or not (idx.is_contiguous() and w.is_contiguous())):
        return False
    B, G, T = idx.shape
    lib.score_sub(buf.data_ptr(), ld, idx.data_ptr(), w.data_ptr(), B * G, T)
    return True


def score_add(buf: Tensor, w: Tensor, idx: Tensor, T: int, ring_idx: Tensor | None,
              ring_w: Tensor | None) -> bool:
    """The first ``T`` slots of a step enter the scores ``buf`` [B, G, cap] int64: per group, the
    sum of the weights ``w`` [B, G*grp, P] of its query heads, each quantised to fixed point
    (exactly :func:`~llm_compile.runtime.swa.state.quantize_weights`), added at ``idx`` [B, G, >=T]
    and written to the ring row ``ring_idx`` [B, G, W] int32 / ``ring_w`` int64 (slots from ``T``
    zeroed; None: no ring). False where the kernel does not apply."""
    lib, ld = library(), _rows(buf)
    B, G = buf.shape[:2]
    if (lib is None or buf.is_cuda or ld is None or buf.dtype != torch.int64 or w.dtype != torch.float32
            or idx.dtype != torch.int64 or not (w.is_contiguous() and idx.is_contiguous())
            or w.shape[0] != B or w.shape[1] % G or idx.shape[:2] != (B, G) or idx.shape[2] < T
            or w.shape[2] < T):
        return False
    if ring_idx is None:
        ring_idx = torch.empty(B, G, T, dtype=torch.int32)
        ring_w = torch.empty(B, G, T, dtype=torch.int64)
    if not (ring_idx.is_contiguous() and ring_w.is_contiguous() and ring_idx.shape[2] >= T):
        return False
    lib.score_add(buf.data_ptr(), ld, w.data_ptr(), w.shape[2], idx.data_ptr(), idx.shape[2],
                  B, G, w.shape[1] // G, T, ring_idx.data_ptr(), ring_w.data_ptr(), ring_idx.shape[2])
    return True


def select_top(score: Tensor, n: int, sinks: int, recent: int, glob: int, padded: int) -> Tensor | None:
    """Kept tokens [B, G, padded] int64 from ``score`` [B, G, >=n] int64: sinks, the ``glob``
    best-scored tokens of ``[sinks, n - recent)`` in position order (ties at the threshold: the
    earliest), the last ``recent``, padding 0. None where the kernel does not apply."""
    lib, ld = library(), _rows(score)
    if lib is None or score.is_cuda or ld is None or score.dtype != torch.int64:
        return None
    B, G = score.shape[:2]
    if not (0 <= glob <= n - sinks - recent and sinks + glob + recent <= padded):
        raise ValueError(f"select_top: n={n}, sinks={sinks}, recent={recent}, global={glob}, padded={padded}")
    out = torch.empty(B, G, padded, dtype=torch.int64)
    if lib.select_top(score.data_ptr(), ld, B * G, n, sinks, recent, glob, padded, out.data_ptr(),
                      torch.get_num_threads()):
        raise MemoryError("select_top: no memory for the selection scratch")
    return out


def query_select(logits: Tensor, unit: int, hist: Tensor | None, n: int, sinks: int, recent: int,
                 nq: int, nglob: int, padded: int, groups: int) -> Tensor | None:
    """Kept tokens [B, G, padded] int64 of a query-aware step from the scorer's ``logits``
    [B, Hq, units] float32 (token ``t`` scored by unit ``t // unit``; none past ``units``: 0):
    sinks; among ``[sinks, n - recent)`` the ``nq`` tokens with the largest softmax weight summed
    over the group's heads, then the ``nglob`` largest of ``hist`` [B, G, >=n] int64 among the
    rest; the last ``recent``; in position order, padding 0; ties at a threshold go to the earliest
    positions. None where the kernel does not apply (the caller runs torch)."""
    lib = library()
    if lib is None or logits.is_cuda or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        return None
    B, Hq, units = logits.shape
    ldh = 0
    if nglob:
        ldh = _rows(hist) if hist is not None and not hist.is_cuda and hist.dtype == torch.int64 else None
        if ldh is None:
            return None
    if (Hq % groups or unit < 1 or logits.stride(0) != Hq * logits.stride(1)
            or not (0 <= nq and 0 <= nglob and nq + nglob <= n - sinks - recent and sinks + recent <= n
                    and sinks + nq + nglob + recent <= padded)
            or (hist is not None and nglob and hist.shape[:2] != (B, groups))):
        raise ValueError(f"query_select: logits {tuple(logits.shape)}, unit={unit}, groups={groups}, n={n}, "
                         f"sinks={sinks}, recent={recent}, query={nq}, global={nglob}, padded={padded}")
    out = torch.empty(B, groups, padded, dtype=torch.int64)
    if lib.query_select(logits.data_ptr(), logits.stride(1), B, Hq, units, unit, groups,
                        hist.data_ptr() if nglob else None, ldh, n, sinks, recent, nq, nglob, padded,
                        out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("query_select: no memory for the selection scratch")
    return out
