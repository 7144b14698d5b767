"""Anda FP-INT kernels vs baselines, one run, table + JSON.

Compares, per shape ``[rows, K] x [N, K]^T``: fp16 (GPU) / fp32 (CPU) matmul, dequantize + matmul,
``aten._weight_int4pack_mm`` (where the build has it), and the generated Anda kernels (INT4 and INT8
weights, one or more mantissa widths). Every Anda result is checked against the torch reference
(``kernel="reference"``) and the error is reported next to its time.

GPU: rows in 1, 2, 4, 8, 16 (decode) and 128, 512, 2048 (prefill); N, K in {4096, 8192}.
CPU: small shapes through the Triton interpreter, for correctness only (times mean nothing).

    python benchmarks/bench_anda.py [--mantissa 4 7 12] [--out bench_anda.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede the first triton import

from llm_compile.codegen.anda_launch import anda_matmul  # noqa: E402
from llm_compile.ops.anda import anda_linear_reference  # noqa: E402
from llm_compile.quantize import dequantize_weight, quantize_tensor, unpack_int4  # noqa: E402


def _timer(fn, cuda: bool, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def _int4pack_fn(w_int: torch.Tensor, scales: torch.Tensor, gs: int, x: torch.Tensor):
    """``aten._weight_int4pack_mm`` closure (uint4 = q + 8, zero point 0), or a reason string."""
    n, k = w_int.shape
    sz = torch.stack([scales.t().contiguous(), torch.zeros_like(scales.t())], dim=-1).to(x.dtype)
    u = (w_int.to(torch.int32) + 8)
    try:
        if x.is_cuda:
            packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(x, wp, gs, sz)  # noqa: E731
        else:
            wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, wp, gs, sz)  # noqa: E731
        fn()
        return fn
    except Exception as e:  # not in this build / device / dtype
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def bench_shape(rows, n, k, gs, m_list, cuda, reps):
    dev = "cuda" if cuda else "cpu"
    dt = torch.float16 if cuda else torch.float32
    g = torch.Generator().manual_seed(rows * 7 + n + k)
    x = torch.randn(rows, k, generator=g).to(dev, dt)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dev)
    res = {"rows": rows, "N": n, "K": k, "group": gs, "times_ms": {}, "errors": {}}
    wd = w.to(dt)
    res["times_ms"][f"{str(dt)[6:]}_matmul"] = _timer(lambda: x @ wd.t(), cuda, reps)
    for bits in (4, 8):
        qw, s = quantize_tensor(w, bits, gs)
        res["times_ms"][f"dequant_w{bits}+matmul"] = _timer(
            lambda: x @ dequantize_weight(qw, s, bits, gs, dt).t(), cuda, reps)
        for m in m_list:
            ref = anda_linear_reference(x, qw, s, None, m, bits, gs).float()
            out = anda_matmul(x, qw, s, None, m, bits, gs).float()
            res["errors"][f"anda_m{m}_w{bits}"] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            res["times_ms"][f"anda_m{m}_w{bits}"] = _timer(
                lambda: anda_matmul(x, qw, s, None, m, bits, gs), cuda, reps)
    qw4, s4 = quantize_tensor(w, 4, gs)
    fn = _int4pack_fn(unpack_int4(qw4), s4, gs, x)
    if callable(fn):
        want = (x.float() @ dequantize_weight(qw4, s4, 4, gs).t())
        res["errors"]["aten_int4pack_mm_vs_dequant"] = float((fn().float() - want).abs().max()
                                                             / want.abs().max().clamp_min(1e-12))
        res["times_ms"]["aten_int4pack_mm"] = _timer(fn, cuda, reps)
    else:
        res["times_ms"]["aten_int4pack_mm"] = None
        res["int4pack_note"] = fn
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mantissa", type=int, nargs="+", default=[4, 7, 12])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--out", default="bench_anda.json")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        rows_list = [1, 4, 16, 512] if a.quick else [1, 2, 4, 8, 16, 128, 512, 2048]
        nk = [(4096, 4096)] if a.quick else [(4096, 4096), (4096, 8192), (8192, 4096), (8192, 8192)]
        reps = 0
    else:
        rows_list, nk, reps = [1, 3, 24], [(128, 256)], 3
    results = []
    for n, k in nk:
        for rows in rows_list:
            r = bench_shape(rows, n, k, a.group, a.mantissa, cuda, reps)
            results.append(r)
            worst = max(v for name, v in r["errors"].items() if name.startswith("anda"))
            cols = "  ".join(f"{name}={t:.3f}" if t is not None else f"{name}=n/a"
                             for name, t in r["times_ms"].items())
            print(f"rows={rows:5d} N={n:5d} K={k:5d} | {cols} | max rel err vs reference {worst:.2e}",
                  flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "note": "" if cuda else "CPU: Triton interpreter, times are not performance numbers"}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {a.out}")
    bad = [r for r in results if max(v for k, v in r["errors"].items() if k.startswith("anda")) > 1e-3]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
