"""Generated Anda Triton kernels vs the torch reference (CPU: Triton interpreter).

``TRITON_INTERPRET`` must be set before triton is first imported (its standard library is decorated
at import), hence the setdefault at the top of this module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from llm_compile.codegen import anda_format as af
from llm_compile.codegen.anda_kernels import AndaKernelSpec, default_dot, kernel_path, kernel_source
from llm_compile.codegen.anda_launch import anda_compress, anda_matmul, plan
from llm_compile.ops.anda import anda_linear_reference
from llm_compile.quantize import quantize_tensor


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLMACCEL_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "anda_kernels"))


def _problem(r, k, n, bits, gs, seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(r, k, generator=g) * torch.exp2(torch.randint(-6, 6, (r, k), generator=g).float()))
    w = torch.randn(n, k, generator=g)
    qw, s = quantize_tensor(w, bits, gs)
    b = torch.randn(n, generator=g) if bias else None
    return x.to(dtype), qw, s, b


@pytest.mark.parametrize("m_bits", [1, 4, 7, 8, 12, 15, 16])
def test_compress_bit_exact(m_bits):
    x = torch.randn(19, 150) * 10
    x[3, :64] = 0.0
    x[4, 70] = -0.0
    x[5, :] = x[5, :] * 1e-6                       # fp16 subnormal groups
    q, e = anda_compress(x, m_bits)
    q_ref, e_ref = af.quantize(x, m_bits)
    assert q.dtype == (torch.int8 if m_bits <= 7 else torch.int16 if m_bits <= 14 else torch.int32)
    assert torch.equal(q.to(torch.int32), q_ref) and torch.equal(e, e_ref)


def test_compress_marks_non_finite_groups():
    x = torch.ones(2, 128)
    x[1, 100] = float("inf")
    _, e = anda_compress(x, 4)
    assert e.tolist() == [[15, 15], [15, 31]]


@pytest.mark.parametrize("m_bits,dot", [(3, "i8"), (7, "i8"), (8, "i8x2"), (14, "i8x2"), (16, "f32"),
                                        (5, "f32")])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_vs_reference(m_bits, dot, bits):
    x, qw, s, b = _problem(20, 256, 80, bits, 128, seed=m_bits)
    ref = anda_linear_reference(x, qw, s, b, m_bits, bits, 128)
    out = anda_matmul(x, qw, s, b, m_bits, bits, 128, mode="gemm", dot=dot)
    assert out.shape == (20, 80)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m_bits", [2, 7, 11, 16])
@pytest.mark.parametrize("bits,gs", [(4, 64), (8, 128)])
def test_gemv_vs_reference(m_bits, bits, gs):
    x, qw, s, b = _problem(3, 192 if gs == 64 else 256, 72, bits, gs, seed=10 + m_bits)
    ref = anda_linear_reference(x, qw, s, b, m_bits, bits, gs)
    out = anda_matmul(x, qw, s, b, m_bits, bits, gs, mode="gemv")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


def test_leading_dims_fp16_no_bias_and_auto_plan():
    x, qw, s, _ = _problem(6, 128, 32, 4, 128, seed=3, bias=False)
    x3 = x.reshape(2, 3, 128).to(torch.float16)
    ref = anda_linear_reference(x3, qw, s, None, 6, 4, 128)
    out = anda_matmul(x3, qw, s, None, 6, 4, 128)
    assert out.dtype == torch.float16 and out.shape == (2, 3, 32)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert [p.kind for p in plan(6, 6, 4, 128)] == ["compress", "gemm"]
    assert [p.kind for p in plan(1, 6, 4, 128)] == ["gemv"]


def test_not_just_fp32_matmul():
    """The kernels really quantize: with M=1 they differ from an fp32 matmul, like the reference."""
    x, qw, s, b = _problem(16, 128, 32, 8, 128, seed=5)
    full = x @ (qw.float().reshape(32, 1, 128) * s.unsqueeze(-1)).reshape(32, 128).t() + b
    out = anda_matmul(x, qw, s, b, 1, 8, 128, mode="gemm")
    assert not torch.allclose(out, full, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, anda_linear_reference(x, qw, s, b, 1, 8, 128), rtol=2e-5, atol=1e-4)


def test_nan_rows_propagate():
    x, qw, s, b = _problem(5, 128, 16, 4, 128)
    x[2, 7] = float("nan")
    for mode in ("gemv", "gemm"):
        out = anda_matmul(x, qw, s, b, 7, 4, 128, mode=mode)
        assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()


@pytest.mark.parametrize("mode", ["gemv", "gemm"])
def test_out_of_fp16_range_activations_saturate(mode):
    """7e4 and 1e5 used to become NaN rows (FP16 overflow); now they saturate to 65504 like the
    reference on the saturated input, with a one-time warning on CPU."""
    rows = 3 if mode == "gemv" else 20
    x, qw, s, b = _problem(rows, 128, 48, 4, 64, seed=9)
    x[0, 3], x[1, 100], x[2, 64] = 7e4, 1e5, -1e5
    af.warn_saturated.cache_clear()
    with pytest.warns(RuntimeWarning, match="saturated"):
        out = anda_matmul(x, qw, s, b, 7, 4, 64, mode=mode)
    ref = anda_linear_reference(x.clamp(-65504, 65504), qw, s, b, 7, 4, 64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    q, e = anda_compress(x, 7)
    q_ref, e_ref = af.quantize(x.clamp(-65504, 65504), 7)
    assert torch.equal(q.to(torch.int32), q_ref) and torch.equal(e, e_ref)


def test_cache_file_is_verified_before_it_runs(tmp_path, monkeypatch):
    """A cached kernel file whose content does not hash to the digest in its name (here: an
    appended line) is not executed but rewritten; the cache is user-only."""
    import stat

    from llm_compile.codegen import anda_kernels as ak

    monkeypatch.setenv("LLMACCEL_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ak, "_LOADED", {})
    spec = AndaKernelSpec("gemv", weight_bits=8, block_n=32)
    path = kernel_path(spec)
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    marker = tmp_path / "pwned"
    with open(path, "w") as f:
        f.write(kernel_source(spec) + f"\nopen({str(marker)!r}, 'w').close()\n")
    fn = ak.load_kernel(spec)
    assert not marker.exists(), "the tampered cache file was executed"
    assert open(path).read() == kernel_source(spec)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    x, qw, s, b = _problem(2, 64, 32, 8, 64)
    torch.testing.assert_close(anda_matmul(x, qw, s, b, 7, 8, 64, block_n=32),
                               anda_linear_reference(x, qw, s, b, 7, 8, 64), rtol=2e-5, atol=1e-4)
    assert fn is ak.load_kernel(spec)
    os.chmod(tmp_path / "cache", 0o777)             # a loose cache dir of ours is tightened
    ak.cache_dir()
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700


def test_source_is_specialised_and_cached():
    spec = AndaKernelSpec("gemm", "i8", 4, 16, 64)
    src = kernel_source(spec)
    assert spec.name == spec.kernel_name == "anda_gemm_i8_w4_bm16_bn64" and f"def {spec.name}(" in src
    assert "out_dtype=tl.int32" in src and "& 0xF" in src
    assert "libdevice" not in src and "inline_asm" not in src
    src8 = kernel_source(AndaKernelSpec("gemm", "i8x2", 8, 32, 32))
    assert "mag >> 7" in src8 and "& 0xF" not in src8
    compile(src, spec.name, "exec")
    # M and the weight group are runtime scalars: one kernel for every M of a dot flavour
    assert plan(16, 3, 4, 128)[1] == plan(16, 7, 4, 64)[1] == spec
    assert plan(16, 7, 4, 64)[1].name == "anda_gemm_m7_w4_g64_bm16_bn64_i8"       # dump label
    assert kernel_source(plan(16, 3, 4, 128)[1]) == src
    assert plan(1, 2, 4, 64) == plan(3, 16, 4, 256) == [AndaKernelSpec("gemv", weight_bits=4)]
    x, qw, s, b = _problem(16, 128, 64, 4, 128)
    anda_matmul(x, qw, s, b, 7, 4, 128, mode="gemm")
    assert os.path.exists(kernel_path(spec))
    assert open(kernel_path(spec)).read() == src
    assert default_dot(7) == "i8" and default_dot(8) == "i8x2" and default_dot(15) == "f32"


@pytest.mark.parametrize("kw", [dict(kind="gemm", dot="i4"), dict(kind="gemm", block_m=8),
                                dict(kind="gemv", weight_bits=2), dict(kind="fused")])
def test_bad_specs(kw):
    with pytest.raises(ValueError):
        AndaKernelSpec(**kw)


@pytest.mark.parametrize("args", [(16, 8, 4, 64, "gemm", "i8"), (16, 15, 4, 64, "gemm", "i8x2"),
                                  (1, 7, 4, 96, "auto", "auto"), (1, 7, 4, 0, "auto", "auto"),
                                  (1, 17, 4, 64, "auto", "auto")])
def test_bad_plans(args):
    with pytest.raises(ValueError):
        plan(*args)


def _weights(n, k, bits, gs, asym, seed):
    """Random weights in the storage format and their dequantization, written here from the
    formulas of the format (independent of llm_compile.quantize): symmetric INT4 nibble q+8 /
    INT8 int8 q, W = q*s; asymmetric unsigned u (INT4 nibble without offset, INT8 uint8),
    W = u*s + min."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(n, k // gs, generator=g) * 0.1 + 0.01
    if asym:
        u = torch.randint(0, 2 ** bits, (n, k), generator=g)
        mins = -torch.rand(n, k // gs, generator=g) * 2 ** (bits - 1) * scales
        w = u.float() * scales.repeat_interleave(gs, 1) + mins.repeat_interleave(gs, 1)
        stored = u if bits == 8 else u[:, 0::2] | (u[:, 1::2] << 4)
        return stored.to(torch.uint8), scales, mins, w
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=g)
    w = q.float() * scales.repeat_interleave(gs, 1)
    stored = q.to(torch.int8) if bits == 8 else ((q[:, 0::2] + 8) | ((q[:, 1::2] + 8) << 4)).to(torch.uint8)
    return stored, scales, None, w


@pytest.mark.parametrize("mode,rows", [("gemv", 3), ("gemm", 20)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("bits,gs", [(4, 64), (4, 128), (8, 64), (8, 128)])
def test_sym_and_asym_weights_vs_torch_formula(mode, rows, asym, bits, gs):
    """out = fake_quantize(x) @ W^T + b with W from the formula above, fp32; every (bits, group,
    symmetric/asymmetric) pair, GEMV and GEMM (M=7: int8 dot; M=11 in GEMM: two int8 dots)."""
    k, n = 256, 40
    qw, s, mins, w = _weights(n, k, bits, gs, asym, seed=bits * 1000 + gs + asym)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=g) * 3
    b = torch.randn(n, generator=g)
    for m_bits in (7, 11):
        ref = af.fake_quantize(x, m_bits, dtype=torch.float32) @ w.t() + b
        out = anda_matmul(x, qw, s, b, m_bits, bits, gs, mode=mode, mins=mins)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if asym:     # the min term matters: dropping it gives another answer
        off = anda_matmul(x, qw, s, b, 7, bits, gs, mode=mode, mins=torch.zeros_like(mins))
        assert not torch.allclose(off, af.fake_quantize(x, 7) @ w.t() + b, rtol=1e-2, atol=1e-2)


def test_asym_arguments_are_checked():
    qw, s, mins, _ = _weights(8, 128, 8, 64, True, seed=0)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="stored as torch.int8"):
        anda_matmul(x, qw, s, None, 7, 8, 64)                       # uint8 weights without mins
    with pytest.raises(ValueError, match="must match scales"):
        anda_matmul(x, qw, s, None, 7, 8, 64, mins=mins[:, :1])
    with pytest.raises(ValueError, match="multiple of 64"):
        anda_matmul(x, qw, s.repeat_interleave(2, 1), None, 7, 8, 32, mins=mins.repeat_interleave(2, 1))
    assert plan(1, 7, 8, 64, asym=True)[0].name == "anda_gemv_m7_w8_asym_g64_bn64"
