"""Triton SWA decode kernel (interpreted on CPU) against the torch gather + softmax path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (no GPU here)

import pytest  # noqa: E402
import torch  # noqa: E402

from llm_compile.codegen.swa_kernels import swa_decode_attention  # noqa: E402
from llm_compile.config import SWAConfig  # noqa: E402
from llm_compile.runtime import swa  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1 set before triton was imported")


def _case(B, Hq, Hkv, N, T, D, G, dtype, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    if noncontig:  # HF layout: [B, N, H, D] transposed to [B, H, N, D]
        k = torch.randn(B, N, Hkv, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, N, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(N, generator=g)[:T] for _ in range(B * G)]).view(B, G, T)
    bias = torch.zeros(B, 1, T)
    bias[..., T - 5:] = float("-inf")  # padding slots
    return [t.to(dev) for t in (q, k, v, idx, bias)]


@pytest.mark.parametrize("B,Hq,Hkv,N,T,D,G,dtype,splits", [
    (2, 4, 2, 90, 40, 16, 1, torch.float32, 3),       # GQA, one token set per layer, 3 splits
    (1, 6, 2, 70, 37, 24, 2, torch.float16, 1),       # per-KV-head sets, D not a power of 2
    (2, 3, 3, 50, 20, 32, 3, torch.float32, None),    # MHA, default split count
])
def test_kernel_matches_torch(B, Hq, Hkv, N, T, D, G, dtype, splits):
    q, k, v, idx, bias = _case(B, Hq, Hkv, N, T, D, G, dtype, noncontig=G == 1)
    out, w = swa_decode_attention(q, k, v, idx, bias, 0.3, num_splits=splits, block_t=16)
    ref_out, ref_w = swa.gather_attend_torch(q, k, v, idx, bias, 0.3)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert out.dtype == dtype and w.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    assert float(w[..., T - 5:].abs().max()) == 0.0  # padding slots get no weight
    torch.testing.assert_close(w.sum(-1), torch.ones(B, Hq, device=w.device))


def test_per_head_bias_and_fully_masked_row():
    q, k, v, idx, _ = _case(1, 4, 2, 40, 16, 16, 1, torch.float32, seed=1)
    bias = torch.zeros(1, 4, 16, device=q.device)
    bias[0, 1, :] = float("-inf")  # head 1 sees nothing
    bias[0, 2, ::2] = float("-inf")
    out, w = swa_decode_attention(q, k, v, idx, bias, 0.5, num_splits=2, block_t=16)
    ref_out, ref_w = swa.gather_attend_torch(q, k, v, idx, bias, 0.5)
    assert torch.isfinite(out).all() and float(w[0, 1].abs().sum()) == 0.0
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_swa_step_triton_equals_torch(selection):
    """Whole decode steps (selection, kernel, score update) agree between the two kernels."""
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, L, D = 2, 4, 2, 40, 16
    q, k, v = torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), \
        torch.randn(B, Hkv, L, D, generator=g)
    states = {}
    for kern in ("torch", "triton"):
        cfg = SWAConfig(sparsity=0.7, bucket=16, selection=selection, kernel=kern)
        st = states[kern] = swa.new_state(B, Hkv, "cpu", cfg)
        swa.swa_step(st, q, k, v, 0.25, cfg, is_causal=True)
    kk, vv = k, v
    for _ in range(3):
        kk = torch.cat([kk, torch.randn(B, Hkv, 1, D, generator=g)], 2)
        vv = torch.cat([vv, torch.randn(B, Hkv, 1, D, generator=g)], 2)
        qd = torch.randn(B, Hq, 1, D, generator=g)
        outs = {}
        for kern, st in states.items():
            cfg = SWAConfig(sparsity=0.7, bucket=16, selection=selection, kernel=kern)
            outs[kern] = swa.swa_step(st, qd, kk, vv, 0.25, cfg)
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-5, rtol=1e-5)
        assert torch.equal(states["triton"].last_indices, states["torch"].last_indices)
        assert (states["triton"].score - states["torch"].score).abs().max() < 2 ** 36 * 1e-5


# Ahead-of-time compilation for sm_80/sm_90 over the kernels' constexpr space: test_aot_compile.py
