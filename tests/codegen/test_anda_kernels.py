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
    assert q.dtype == {1: torch.int8, 4: torch.int8, 7: torch.int8}.get(m_bits, q.dtype)
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


def test_source_is_specialised_and_cached():
    spec = AndaKernelSpec("gemm", 7, 4, 128, 16, 64)
    src = kernel_source(spec)
    assert spec.name == "anda_gemm_m7_w4_g128_bm16_bn64_i8" and f"def {spec.name}(" in src
    assert "M_BITS = 7" in src and "W_GROUP = 128" in src and "out_dtype=tl.int32" in src
    assert "& 0xF" in src and "libdevice" not in src and "inline_asm" not in src
    src8 = kernel_source(AndaKernelSpec("gemm", 12, 8, 256, 32, 32))
    assert "mag >> 7" in src8 and "& 0xF" not in src8 and "W_GROUP = 256" in src8
    compile(src, spec.name, "exec")
    x, qw, s, b = _problem(16, 128, 64, 4, 128)
    anda_matmul(x, qw, s, b, 7, 4, 128, mode="gemm")
    assert os.path.exists(kernel_path(spec))
    assert open(kernel_path(spec)).read() == src
    assert default_dot(7) == "i8" and default_dot(8) == "i8x2" and default_dot(15) == "f32"


@pytest.mark.parametrize("kw", [dict(kind="gemm", mantissa_bits=8, dot="i8"),
                                dict(kind="gemm", mantissa_bits=4, block_m=8),
                                dict(kind="gemv", mantissa_bits=4, w_group_size=96),
                                dict(kind="fused", mantissa_bits=4)])
def test_bad_specs(kw):
    with pytest.raises(ValueError):
        AndaKernelSpec(**kw)
