"""Every Triton kernel the launchers can pick compiles ahead of time for sm_80 and sm_90 (no GPU).

The interpreter (how the kernels run in the other tests) accepts code the Triton compiler rejects
(plain globals read in a kernel, illegal ``tl.dot`` tiles). Here the full pipeline to cubin runs in
a subprocess with ``TRITON_INTERPRET=0`` (this process imported triton in interpreter mode), via
``python -m llm_compile.codegen.aot_check``.

Coverage: the Anda kernel specs are collected from ``plan()`` itself over every mantissa width
1..16, INT4/INT8, symmetric/asymmetric weights, weight groups 64..512, decode and prefill row
counts, every dot flavour that fits; every spec is compiled for both targets. The launch-time dimensions (activation dtype
fp16/bf16/fp32, scale dtype, bias or not, 16-aligned pointers/sizes or not) are combined so that
every pair of values (with each other and with every spec field and target) is compiled at least
once. ``LLMACCEL_AOT_TRITON_PATH=<dir>`` puts another Triton install first on the subprocess's path
(e.g. a ``pip install --no-deps --target .venv36 triton==3.6.0``) to check that version.
"""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llm_compile.codegen.anda_kernels import DOTS, dot_fits
from llm_compile.codegen.anda_launch import GEMV_MAX_ROWS, launch_signature, plan

TARGETS = (80, 90)
ROWS = (1, 2, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 8, 16, 17, 32, 33, 64, 4096)   # decode .. prefill
GROUPS = (64, 128, 256, 512)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _env(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               LLMACCEL_KERNEL_CACHE=str(tmp_path / "kernels"))
    extra = os.environ.get("LLMACCEL_AOT_TRITON_PATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(extra), env.get("PYTHONPATH", "")])
    return env


def _run_jobs(jobs, tmp_path, timeout=1500):
    """Compile ``jobs`` in fresh processes (two, one per core); returns ``{label: result}``
    (a crashed compiler process is reported as a failure of the job it died in)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import triton; from triton.backends import backends; "
         "print(triton.__version__, 'nvidia' in backends)"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    version, has_nvidia = (probe.stdout.split() + ["?", "False"])[:2]
    if probe.returncode or has_nvidia != "True":
        pytest.skip(f"the installed Triton ({version}) has no NVIDIA backend: cannot compile for "
                    f"sm_80/sm_90 here ({probe.stderr.strip()[-300:]})")
    nproc = max(1, min(2, os.cpu_count() or 1, len(jobs)))     # compiles are CPU bound: one per core
    parts = [jobs[i::nproc] for i in range(nproc)]
    procs = []
    for i, part in enumerate(parts):      # files, not pipes: no process waits on another's pipe
        (tmp_path / f"jobs{i}.json").write_text(json.dumps(part))
        with open(tmp_path / f"jobs{i}.json") as fin, open(tmp_path / f"out{i}", "w") as fout, \
                open(tmp_path / f"err{i}", "w") as ferr:
            procs.append(subprocess.Popen([sys.executable, "-m", "llm_compile.codegen.aot_check"],
                                          stdin=fin, stdout=fout, stderr=ferr, env=_env(tmp_path)))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {}
    for i, (p, part) in enumerate(zip(procs, parts)):
        for line in (tmp_path / f"out{i}").read_text().splitlines():
            if line.startswith("{"):
                res = json.loads(line)
                results[res["label"]] = res
        missing = [j["label"] for j in part if j["label"] not in results]
        if missing:   # e.g. an LLVM abort kills the process: name the job it died in
            err = (tmp_path / f"err{i}").read_text()
            results[missing[0]] = dict(ok=False, error=f"compiler process died (rc {p.returncode}): {err[-2000:]}")
    done = len(results)
    print(f"triton {version}: {done} compiles, {sum(x.get('seconds', 0) for x in results.values()):.0f} s")
    return results


def _failures(results):
    return {k: v["error"] for k, v in results.items() if not v["ok"]}


def _cover(rows, dims):
    """Assign one launch-time combination (values of ``dims``) to each structural row, greedily,
    then add rows until every pair of values (signature x signature, structural x signature) that
    the product allows has been compiled together at least once."""
    choices = [dict(zip(dims, c)) for c in itertools.product(*dims.values())]

    def pairs(row, ch):
        items = [(k, str(v)) for k, v in row.items()] + [(k, str(v)) for k, v in ch.items()]
        return {(a, b) for a, b in itertools.combinations(items, 2) if a[0] in dims or b[0] in dims}

    needed = set().union(*(pairs(r, c) for r in rows for c in choices))
    covered, out = set(), []
    for i, r in enumerate(rows):
        best = max(choices, key=lambda c: len(pairs(r, c) - covered))
        out.append((i, best))
        covered |= pairs(r, best)
    while needed - covered:
        i, c = max(itertools.product(range(len(rows)), choices), key=lambda ic: len(pairs(rows[ic[0]], ic[1]) - covered))
        out.append((i, c))
        covered |= pairs(rows[i], c)
    return out


def anda_specs():
    """Every kernel spec ``plan()`` returns over the launchers' parameter space."""
    specs = set()
    for m, bits, gs, rows, asym in itertools.product(range(1, 17), (4, 8), GROUPS, ROWS, (False, True)):
        for dot in ("auto", *(d for d in DOTS if dot_fits(d, m))):
            for mode in ("auto", "gemv", "gemm"):
                specs.update(plan(rows, m, bits, gs, mode=mode, dot=dot, asym=asym))
    return sorted(specs, key=lambda s: s.kernel_name)


def anda_jobs():
    jobs = []
    for kind in ("compress", "gemv", "gemm"):
        rows = [(s, cc) for s in anda_specs() if s.kind == kind for cc in TARGETS]
        dims = dict(x=X_DTYPES, aligned=(False, True))
        if kind != "compress":
            dims.update(scale=SCALE_DTYPES, bias=(False, True))
        for i, ch in _cover([dict(cc=cc, **s.structural()) for s, cc in rows], dims):
            spec, cc = rows[i]
            sig, const = launch_signature(spec, ch["x"], ch.get("scale", torch.float32),
                                          ch["x"] if ch.get("bias") else None)
            label = f"{spec.kernel_name} sm_{cc} x={str(ch['x'])[6:]}" + "".join(
                f" {k}={str(v).replace('torch.', '')}" for k, v in ch.items() if k != "x")
            jobs.append(dict(label=label, cc=cc, anda=spec.structural(), signature=sig, constexprs=const,
                             aligned=ch["aligned"]))
    return jobs


def test_plan_space_is_what_the_test_compiles():
    """The spec set is small because M and the weight group are runtime scalars; it still holds
    every (kind, dot, weight bits, block) that plan() picks."""
    specs = anda_specs()
    kinds = {k: [s for s in specs if s.kind == k] for k in ("compress", "gemv", "gemm")}
    assert {s.dot for s in kinds["gemm"]} == set(DOTS) and {s.block_m for s in kinds["gemm"]} == {16, 32, 64}
    assert {(s.weight_bits, s.asym) for s in kinds["gemv"]} == {(4, False), (4, True), (8, False), (8, True)}
    assert len(kinds["gemm"]) == 3 * 2 * 2 * 3 and len(kinds["compress"]) == 3 * 3 and len(kinds["gemv"]) == 4


def test_anda_kernels_compile_for_sm80_and_sm90(tmp_path):
    jobs = anda_jobs()
    assert {j["cc"] for j in jobs} == set(TARGETS)
    results = _run_jobs(jobs, tmp_path)
    assert len(results) == len(jobs)
    bad = _failures(results)
    assert not bad, f"{len(bad)}/{len(jobs)} kernels do not compile:\n" + "\n".join(
        f"{k}: {v[-600:]}" for k, v in list(bad.items())[:8])


def _swa_partial(cc, dtype, d, per_head, block_g, block_t, aligned=False):
    dt = "*" + dtype
    sig = dict(Q=dt, K=dt, V=dt, IDX="*i64", BIAS="*fp32", scale="fp32", **_SWA_FP)
    bd = max(16, 1 << (d - 1).bit_length())
    const = dict(D=d, DV=d, PER_HEAD_IDX=per_head, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=bd, BLOCK_DV=bd)
    return dict(label=f"swa_partial sm_{cc} {dtype} {const} aligned={aligned}", cc=cc, fn="_swa_partial_kernel",
                signature=sig, constexprs=const, aligned=aligned)


def _swa_finish(cc, dtype, dv, block_g, block_t, block_s):
    const = dict(DV=dv, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_DV=max(16, 1 << (dv - 1).bit_length()),
                 BLOCK_S=block_s)
    return dict(label=f"swa_finish sm_{cc} {dtype} {const}", cc=cc, fn="_swa_finish_kernel",
                signature=dict(OUT="*" + dtype, **_SWA_FP), constexprs=const)


_SWA_FP = dict(MP="*fp32", LP="*fp32", ACC="*fp32", W="*fp32")


def _swa_jobs():
    """What ``swa_decode_attention`` passes: BLOCK_T 16/32/64 (by T), BLOCK_G = pow2(query heads per
    KV head) >= 16, head dims 64/80/128, BLOCK_S = pow2(splits) >= 2. Pairwise as for Anda, plus the
    large edge tiles once per target (they are the slow compiles): BLOCK_G 128 (MQA), BLOCK_S 512."""
    part_rows = [dict(cc=cc, BLOCK_T=bt) for cc in TARGETS for bt in (16, 32, 64)]
    dims = dict(dtype=("fp16", "bf16", "fp32"), D=(64, 80, 128), PER_HEAD_IDX=(False, True),
                BLOCK_G=(16, 32), aligned=(False, True))
    jobs = [_swa_partial(part_rows[i]["cc"], ch["dtype"], ch["D"], ch["PER_HEAD_IDX"], ch["BLOCK_G"],
                         part_rows[i]["BLOCK_T"], ch["aligned"]) for i, ch in _cover(part_rows, dims)]
    fin_rows = [dict(cc=cc, BLOCK_S=bs) for cc in TARGETS for bs in (2, 64)]
    dims = dict(dtype=("fp16", "bf16", "fp32"), BLOCK_T=(16, 32, 64), BLOCK_G=(16, 32), DV=(64, 80, 128))
    jobs += [_swa_finish(fin_rows[i]["cc"], ch["dtype"], ch["DV"], ch["BLOCK_G"], ch["BLOCK_T"],
                         fin_rows[i]["BLOCK_S"]) for i, ch in _cover(fin_rows, dims)]
    for cc in TARGETS:
        jobs += [_swa_partial(cc, "fp16", 128, False, 128, 64), _swa_finish(cc, "bf16", 128, 16, 64, 512)]
    for j in jobs:
        j["module"] = "llm_compile.codegen.swa_kernels"
    return jobs


def _page_bound(cc, dtype, d, block_g, block_p, aligned=False):
    dt = "*" + dtype
    const = dict(D=d, BLOCK_G=block_g, BLOCK_P=block_p, BLOCK_D=max(16, 1 << (d - 1).bit_length()))
    return dict(label=f"swa_page_bound sm_{cc} {dtype} {const} aligned={aligned}", cc=cc,
                fn="_page_bound_kernel", module="llm_compile.codegen.swa_page_kernels",
                signature=dict(Q=dt, KMIN=dt, KMAX=dt, OUT="*fp32", scale="fp32"), constexprs=const,
                aligned=aligned)


def _page_jobs():
    """What ``swa_page_bounds`` passes (issue 15): BLOCK_P 16/32/64 (by pages), BLOCK_G =
    pow2(query heads per KV head) >= 16, head dims 64/80/128; pairwise, plus MQA (BLOCK_G 128)."""
    rows = [dict(cc=cc, BLOCK_P=bp) for cc in TARGETS for bp in (16, 32, 64)]
    dims = dict(dtype=("fp16", "bf16", "fp32"), D=(64, 80, 128), BLOCK_G=(16, 32), aligned=(False, True))
    jobs = [_page_bound(rows[i]["cc"], ch["dtype"], ch["D"], ch["BLOCK_G"], rows[i]["BLOCK_P"],
                        ch["aligned"]) for i, ch in _cover(rows, dims)]
    return jobs + [_page_bound(cc, "fp16", 128, 128, 64) for cc in TARGETS]


def _sketch_logit(cc, dtype, d, bits, block_g, block_pb, aligned=False):
    const = dict(D=d, BITS=bits, PER=8 // bits, BLOCK_G=block_g, BLOCK_PB=block_pb,
                 BLOCK_D=max(16, 1 << (d - 1).bit_length()))
    return dict(label=f"swa_sketch_logit sm_{cc} {dtype} {const} aligned={aligned}", cc=cc,
                fn="_sketch_logit_kernel", module="llm_compile.codegen.swa_sketch_kernels",
                signature=dict(Q="*" + dtype, PACKED="*u8", STEP="*fp16", MN="*fp16", OUT="*fp32",
                               scale="fp32"), constexprs=const, aligned=aligned)


def _sketch_jobs():
    """What ``swa_sketch_logits`` passes (issue 15): every bit width (PER = 8 // bits fields per
    byte), BLOCK_PB = pow2(bytes per channel) >= 16, BLOCK_G = pow2(query heads per KV head) >= 16,
    head dims 64/80/128; pairwise, plus MQA (BLOCK_G 128)."""
    rows = [dict(cc=cc, BITS=bits) for cc in TARGETS for bits in (1, 2, 4, 8)]
    dims = dict(dtype=("fp16", "bf16", "fp32"), D=(64, 80, 128), BLOCK_G=(16, 32), BLOCK_PB=(16, 32),
                aligned=(False, True))
    jobs = [_sketch_logit(rows[i]["cc"], ch["dtype"], ch["D"], rows[i]["BITS"], ch["BLOCK_G"],
                          ch["BLOCK_PB"], ch["aligned"]) for i, ch in _cover(rows, dims)]
    return jobs + [_sketch_logit(cc, "fp16", 128, 2, 128, 16) for cc in TARGETS]


def _fill_ints(job):
    """SWA kernels: every argument not typed above is an int32 scalar (sizes, strides)."""
    import ast
    import importlib
    import inspect

    fn = getattr(importlib.import_module(job["module"]), job["fn"])
    src = inspect.getsource(fn.fn if hasattr(fn, "fn") else fn)
    args = [a.arg for a in ast.parse(textwrap.dedent(src)).body[0].args.args]
    for a in args:
        if a not in job["signature"] and a not in job["constexprs"]:
            job["signature"][a] = "i32"
    return job


def test_swa_kernels_compile_for_sm80_and_sm90(tmp_path):
    jobs = [_fill_ints(j) for j in _swa_jobs()]
    results = _run_jobs(jobs, tmp_path)
    bad = _failures(results)
    assert not bad, f"{len(bad)}/{len(jobs)} SWA kernels do not compile:\n" + "\n".join(
        f"{k}: {v[-600:]}" for k, v in list(bad.items())[:8])


def test_swa_query_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Page-bound (quest) and sketch-logit (recall) kernels, in one pair of compiler processes."""
    jobs = [_fill_ints(j) for j in _page_jobs() + _sketch_jobs()]
    results = _run_jobs(jobs, tmp_path)
    bad = _failures(results)
    assert not bad, f"{len(bad)}/{len(jobs)} page-bound / sketch-logit kernels do not compile:\n" + "\n".join(
        f"{k}: {v[-600:]}" for k, v in list(bad.items())[:8])


_BROKEN = '''
import triton
import triton.language as tl

SCALE = 3              # a plain global: the interpreter reads it, the compiler refuses


@triton.jit
def broken_global(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)

'''


def test_the_check_catches_what_the_interpreter_accepts(tmp_path):
    """The same harness fails on a kernel reading a non-constexpr global (which runs fine in the
    interpreter, as the old generated Anda kernels did) -- so a green run above means something."""
    path = tmp_path / "broken_kernels.py"
    path.write_text(_BROKEN)
    import importlib.util

    from llm_compile.codegen.anda_kernels import interpreter_active
    if interpreter_active():    # the interpreter runs the broken kernel without complaint
        spec = importlib.util.spec_from_file_location("broken_kernels_interp", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        x = torch.ones(16)
        mod.broken_global[(1,)](x, BLOCK=16)
        assert x.tolist() == [3.0] * 16
    jobs = [dict(label=f"broken_global sm_{cc}", cc=cc, path=str(path), fn="broken_global",
                 signature={"x_ptr": "*fp32"}, constexprs={"BLOCK": 16}) for cc in TARGETS]
    results = _run_jobs(jobs, tmp_path)
    assert set(_failures(results)) == {j["label"] for j in jobs}
    assert "global variable SCALE" in results["broken_global sm_80"]["error"]
