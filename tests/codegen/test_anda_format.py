"""Anda format: bit-exact against independent pure-Python formulas, packing layout, edge cases."""
import math

import pytest
import torch

from llm_compile.codegen import anda_format as af


def _py_anda(values, m_bits):
    """Independent reference on Python floats (already FP16 values): math.frexp, no torch."""
    out = []
    for g0 in range(0, len(values), 64):
        grp = values[g0:g0 + 64]
        exps = [math.frexp(abs(v))[1] - 1 for v in grp if v != 0.0]   # floor(log2|v|)
        e = max(max(exps) if exps else -14, -14)                       # fp16 subnormals: -14
        for v in grp:
            m = math.floor(abs(v) * 2.0 ** (m_bits - 1 - e))
            assert m < 2 ** m_bits
            out.append(math.copysign(m * 2.0 ** (e - m_bits + 1), v))
    return out


def _py_mx_int_floor(values, elem_bits, block=64):
    """microxcaling-style MX int quantization, round=floor: shared exp = floor(log2(amax)),
    scale by 2**(elem_bits-2), floor the magnitude, clamp to max_norm (written from the MX recipe)."""
    out = []
    for g0 in range(0, len(values), block):
        grp = values[g0:g0 + block]
        amax = max(abs(v) for v in grp)
        shared = math.floor(math.log2(amax)) if amax > 0 else 0
        max_norm = (2 ** (elem_bits - 1) - 1) / 2 ** (elem_bits - 2)
        for v in grp:
            a = v / 2.0 ** shared * 2.0 ** (elem_bits - 2)
            a = math.copysign(math.floor(abs(a)), a) / 2.0 ** (elem_bits - 2)
            a = max(-max_norm, min(max_norm, a))
            out.append(a * 2.0 ** shared)
    return out


def _fp16_list(x):
    return x.to(torch.float16).to(torch.float64).flatten().tolist()


@pytest.mark.parametrize("m_bits", [1, 2, 3, 5, 7, 8, 11, 12, 16])
def test_bit_exact_vs_python_frexp(m_bits):
    g = torch.Generator().manual_seed(m_bits)
    # wide dynamic range per group, incl. values that become fp16 subnormals or zero
    x = torch.randn(3, 128, generator=g) * torch.exp2(torch.randint(-20, 12, (3, 128), generator=g).float())
    got = af.fake_quantize(x, m_bits).flatten().tolist()
    for row in range(3):
        ref = _py_anda(_fp16_list(x[row]), m_bits)
        assert got[row * 128:(row + 1) * 128] == ref


@pytest.mark.parametrize("m_bits", [1, 4, 7, 8, 15])
def test_equals_mx_int_floor_block64(m_bits):
    g = torch.Generator().manual_seed(100 + m_bits)
    x = torch.randn(2, 192, generator=g) * 3.0
    vals = _fp16_list(x)
    assert af.fake_quantize(x, m_bits).flatten().tolist() == _py_mx_int_floor(vals, m_bits + 1)


def test_hand_worked_example_and_planes():
    x = torch.zeros(64)
    x[0], x[1], x[2] = 1.0, 0.75, -0.3
    a = af.pack(x, 3)
    # F = 15 (1.0 = 2^0), E = 0; m = floor(|x| * 2^2) = 4, 3, 1
    assert a.exponent.tolist() == [15]
    assert a.sign.tolist() == [0b100]
    assert a.mantissa.tolist() == [[0b001, 0b010, 0b110]]      # bit2, bit1, bit0 planes
    assert af.unpack(a)[:4].tolist() == [1.0, 0.75, -0.25, 0.0]

    y = torch.tensor([6.0, 5.9, 0.2, -0.4])          # max 6 = 1.5 * 2^2 -> F = 17, E = 2
    a = af.pack(y, 4)                                # m = floor(|x| * 2^(4-1-2)) = 12, 11, 0, 0
    assert a.exponent.tolist() == [17]
    assert af.unpack(a).tolist() == [6.0, 5.5, 0.0, -0.0]
    q, f = af.quantize(y, 4)
    assert q[:4].tolist() == [12, 11, 0, 0] and f.tolist() == [17]
    assert a.storage_bits() == 64 * 5 + 5


def test_bit63_and_negative_words():
    x = torch.ones(64)
    x[63] = -1.0
    a = af.pack(x, 1)
    assert a.sign.item() == -(2 ** 63)
    assert a.mantissa.item() == -1                      # all 64 bits set
    assert torch.equal(af.unpack(a), x)


def test_zeros_negative_zero_and_flush():
    x = torch.tensor([0.0, -0.0, -1e-4, 1.0])
    out = af.fake_quantize(x, 4)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert torch.signbit(out).tolist() == [False, True, True, False]
    assert torch.equal(torch.signbit(af.unpack(af.pack(x, 4))), torch.signbit(out))
    z = af.pack(torch.zeros(2, 64), 5)
    assert z.exponent.tolist() == [[0], [0]] and z.mantissa.abs().sum() == 0
    assert torch.equal(af.unpack(z), torch.zeros(2, 64))


def test_fp16_subnormals():
    t = 2.0 ** -24
    x = torch.tensor([16 * t, 3 * t, -t])             # all fp16 subnormals: F = 0, E = -14
    a = af.pack(x, 8)
    assert a.exponent.tolist() == [0]
    # m = floor(|x| * 2^(8-1+14)) = 16*2^-3 = 2, 3/8 -> 0, 1/8 -> 0
    assert af.unpack(a).tolist() == [16 * t, 0.0, -0.0]
    assert af.fake_quantize(x, 11).tolist() == [16 * t, 3 * t, -t]   # M=11 holds fp16 exactly
    mixed = torch.tensor([2.0 ** -14, 5 * t])           # smallest normal sets F = 1, same E = -14
    assert af.pack(mixed, 11).exponent.tolist() == [1]
    assert af.fake_quantize(mixed, 11).tolist() == [2.0 ** -14, 5 * t]


def test_fp16_exact_roundtrip_at_m11_and_cast_first():
    x16 = (torch.randn(4, 64) * 100).to(torch.float16)
    grp_max_exp = x16.float().abs().amax(-1, keepdim=True)
    # M = 11 + (E - e_x) would be needed for small values; the group max itself is always exact
    out = af.fake_quantize(x16, 11)
    idx = x16.float().abs().argmax(-1, keepdim=True)
    assert torch.equal(out.gather(-1, idx), x16.gather(-1, idx))
    assert out.dtype == torch.float16 and (out.float().abs() <= grp_max_exp).all()
    # fp32 input is cast to fp16 first (round to nearest): 1 + 2^-12 -> 1.0, 1 + 3*2^-12 -> 1+2^-10
    y = torch.tensor([1 + 2.0 ** -12, 1 + 3 * 2.0 ** -12], dtype=torch.float32)
    assert af.fake_quantize(y, 16).tolist() == [1.0, 1 + 2.0 ** -10]


@pytest.mark.parametrize("k", [1, 63, 65, 130])
def test_k_not_multiple_of_64(k):
    x = torch.randn(2, 3, k)
    a = af.pack(x, 6)
    assert a.shape == (2, 3, k) and a.exponent.shape == (2, 3, -(-k // 64))
    assert a.mantissa.shape == (2, 3, -(-k // 64), 6)
    y = af.unpack(a)
    assert y.shape == x.shape and torch.equal(y, af.fake_quantize(x, 6))
    q, f = af.quantize(x, 6)
    assert q.shape[-1] % 64 == 0 and (q[..., k:] == 0).all()
    assert torch.equal(af.dequantize(q, f, 6, k=k), y)


@pytest.mark.parametrize("m_bits", [1, 3, 9, 16])
def test_roundtrip_idempotent_and_error_bound(m_bits):
    x = torch.randn(5, 256)
    y = af.fake_quantize(x, m_bits)
    assert torch.equal(af.fake_quantize(y, m_bits), y)             # quantized values are fixed points
    assert torch.equal(af.unpack(af.pack(y, m_bits)), y)
    # truncation: |x16 - x_hat| < 2^(E-M+1) per group, and |x_hat| <= |x16| with the same sign
    x16 = x.to(torch.float16).float()
    e = af.shared_exponent(af.pack(x, m_bits).exponent).float()
    bound = torch.exp2(e - m_bits + 1).repeat_interleave(64, dim=-1)
    assert ((x16 - y).abs() < bound).all()
    assert (y.abs() <= x16.abs()).all() and ((y * x16) >= 0).all()


def test_dtypes_and_bytes():
    x = torch.randn(2, 64)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = af.unpack(af.pack(x.to(dt), 7), dtype=dt)
        assert out.dtype == dt
    assert af.bytes_per_value(7) == 1.0 + 5 / 512


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_raise(bad):
    x = torch.ones(70)
    x[66] = bad
    with pytest.raises(ValueError):
        af.pack(x, 4)
    with pytest.raises(ValueError):
        af.quantize(x, 4)
    with pytest.raises(ValueError):
        af.fake_quantize(torch.cat([x, torch.ones(58)]), 4)     # fast path (K multiple of 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_fp16_range_saturates_with_one_warning(dtype):
    """Finite |x| > 65504 (7e4, 1e5, -3e38) saturate to +-65504 in every entry point (they used to
    raise here and give NaN rows in the kernels); the warning is shown once per process."""
    x = torch.randn(3, 128)
    x[0, 5], x[1, 70], x[2, 1] = 7e4, 1e5, -3e38
    x = x.to(dtype)
    sat = x.float().clamp(-65504, 65504)
    af.warn_saturated.cache_clear()
    with pytest.warns(RuntimeWarning, match="saturated"):
        q, e = af.quantize(x, 7)
    q_sat, e_sat = af.quantize(sat, 7)
    assert torch.equal(q, q_sat) and torch.equal(e, e_sat) and int(e.max()) == 30
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # one-time: no second warning
        fq = af.fake_quantize(x, 7, dtype=torch.float32)
        assert torch.isfinite(fq).all()
        fq11 = af.fake_quantize(x, 11, dtype=torch.float32)         # 11 bits hold 65504 exactly
        assert float(fq11[1, 70]) == 65504.0 and float(fq11[2, 1]) == -65504.0
        assert torch.equal(fq, af.fake_quantize(sat, 7, dtype=torch.float32))
        assert torch.equal(af.unpack(af.pack(x[:, :100], 7)), af.fake_quantize(sat[:, :100], 7,
                                                                                 dtype=torch.float32))


@pytest.mark.parametrize("m_bits", [0, 17, 2.0, True])
def test_bad_mantissa_bits(m_bits):
    with pytest.raises(ValueError):
        af.pack(torch.ones(64), m_bits)


@pytest.mark.parametrize("m_bits", [1, 2, 4, 7, 8, 11, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_fake_quantize_bit_identical_to_slow_path(m_bits, dtype):
    from llm_compile.codegen.anda_format import _fake_quantize_slow, fake_quantize

    g = torch.Generator().manual_seed(m_bits)
    x = torch.randn(5, 200, generator=g) * torch.logspace(-9, 3, 200)
    x[0, :70] = 0.0
    x[1, 3] = -0.0
    x[2, :64] = 1e-6  # fp16 subnormal group
    x = x.to(dtype)
    fast, slow = fake_quantize(x, m_bits), _fake_quantize_slow(x, m_bits)
    assert fast.dtype == slow.dtype
    assert torch.equal(fast.view(torch.int16 if fast.element_size() == 2 else torch.int32),
                       slow.view(torch.int16 if slow.element_size() == 2 else torch.int32))
