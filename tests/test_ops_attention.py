"""The canonical ``llmaccel::attention`` op: SDPA numerics, GQA, cache, layout, fake kernel."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import llm_compile.ops  # noqa: F401

att = torch.ops.llmaccel.attention


def _ref(q, k, v, mask=None, causal=False, scale=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefill_causal_gqa(dtype, tol):
    q, k, v = torch.randn(2, 6, 7, 16, dtype=dtype), torch.randn(2, 2, 7, 16, dtype=dtype), torch.randn(2, 2, 7, 16, dtype=dtype)
    out = att(q, k, v, None, None, None, 0.25, True, 0)
    torch.testing.assert_close(out, _ref(q, k, v, causal=True, scale=0.25), rtol=tol, atol=tol)
    assert out.dtype == dtype


def test_decode_with_cache_and_k_all_agree():
    q = torch.randn(3, 4, 1, 8)
    pk, pv, k, v = torch.randn(3, 2, 9, 8), torch.randn(3, 2, 9, 8), torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    ka, va = torch.cat([pk, k], -2), torch.cat([pv, v], -2)
    a = att(q, k, v, pk, pv, None, 0.3, False, 1)
    b = att(q, k, v, pk, pv, None, 0.3, False, 1, ka, va)
    torch.testing.assert_close(a, _ref(q, ka, va, scale=0.3))
    torch.testing.assert_close(a, b)


def test_bool_and_additive_masks():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    m = torch.tensor([[True, False, True, True]]).expand(4, 4)[None, None]
    torch.testing.assert_close(att(q, k, v, None, None, m, 0.5, False, 0), _ref(q, k, v, m, scale=0.5))
    fm = torch.zeros(1, 1, 4, 4).masked_fill(~m, float("-inf"))
    torch.testing.assert_close(att(q, k, v, None, None, fm, 0.5, False, 0), _ref(q, k, v, fm, scale=0.5))


def test_fake_matches_real_layout_and_bad_heads_error():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 16)
    real = att(q, k, v, None, None, None, 0.1, False, 0)
    with FakeTensorMode() as mode:
        fake = att(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), None, None, None, 0.1, False, 0)
    assert fake.shape == real.shape == (2, 4, 3, 16) and fake.stride() == real.stride()
    assert real.transpose(1, 2).is_contiguous()  # B, L, H, D memory order, like flash attention
    with pytest.raises(ValueError, match="not a multiple"):
        att(torch.randn(1, 3, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), None, None, None, 1.0, False, 0)
