"""Ahead-of-time compilation of Triton kernels for a GPU target, on a machine without a GPU.

The Triton interpreter (how the kernels run on CPU) accepts things the compiler rejects: plain
Python globals read inside a kernel, ``tl.dot`` tiles below 16 or operand dtypes the tensor cores
lack, type changes of loop-carried values. Compiling for ``GPUTarget("cuda", 80 | 90, 32)`` runs
the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas to cubin) without a device.

Run as ``python -m llm_compile.codegen.aot_check < jobs.json`` in a process where triton was
imported with ``TRITON_INTERPRET`` unset or 0 (an interpreted ``@triton.jit`` cannot be compiled).
``jobs.json`` is a list of jobs::

    {"label": "...", "cc": 80,
     "anda": {AndaKernelSpec fields} | "module": "dotted.module" | "path": "/file.py",
     "fn": "kernel function name (not needed for anda)",
     "signature": {"arg": "*fp16" | "i32" | ...}, "constexprs": {"BLOCK_M": 16, ...},
     "aligned": false}

``aligned`` adds the 16-divisibility attributes the JIT gives aligned pointers and integers that
are multiples of 16 (what a real launch on typical shapes compiles). One JSON line per job goes to
stdout as it finishes: ``{"label", "ok", "error", "seconds"}``; the exit status is 0 when every
job compiled.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time

__all__ = ["compile_job", "main"]


def _kernel(job: dict):
    if "anda" in job:
        from llm_compile.codegen.anda_kernels import AndaKernelSpec, load_kernel

        spec = AndaKernelSpec(**job["anda"])
        return load_kernel(spec)
    if "module" in job:
        mod = importlib.import_module(job["module"])
    else:
        name = f"llmaccel_aot_check_{abs(hash(job['path']))}"
        mspec = importlib.util.spec_from_file_location(name, job["path"])
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        mspec.loader.exec_module(mod)
    return getattr(mod, job["fn"])


def compile_job(job: dict):
    """Compile one job for its target; returns the ``CompiledKernel`` (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(job)
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("triton runs in interpreter mode here: set TRITON_INTERPRET=0 before importing it")
    sig = dict(job["signature"])
    const = dict(job.get("constexprs", {}))
    missing = [n for n in fn.arg_names if n not in sig and n not in const]
    if missing:
        raise ValueError(f"{job.get('label')}: no type given for arguments {missing}")
    for n in const:
        sig.setdefault(n, "constexpr")
    sig = {n: sig[n] for n in fn.arg_names}                 # kernel argument order
    attrs = None
    if job.get("aligned"):
        dns = set(getattr(fn, "do_not_specialize", ()) or ())
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if (sig[n].startswith("*") or sig[n] == "i32") and n not in dns and i not in dns}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", int(job["cc"]), 32))


def main() -> int:
    jobs = json.load(sys.stdin)
    failed = 0
    for job in jobs:
        t0 = time.perf_counter()
        try:
            compile_job(job)
            res = dict(label=job["label"], ok=True, error=None)
        except Exception as e:  # noqa: BLE001 -- every failure is reported, the loop goes on
            failed += 1
            res = dict(label=job["label"], ok=False, error=f"{type(e).__name__}: {e}"[-2000:])
        res["seconds"] = round(time.perf_counter() - t0, 3)
        print(json.dumps(res), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
