"""Triton page-bound kernel (interpreted on CPU) against the torch page summaries (issue 15), and
the query-aware policies' decode step on the Triton path against the torch path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (no GPU here)

import pytest  # noqa: E402
import torch  # noqa: E402

from llm_compile.codegen.swa_page_kernels import swa_page_bounds  # noqa: E402
from llm_compile.codegen.swa_sketch_kernels import swa_sketch_logits  # noqa: E402
from llm_compile.config import SWAConfig  # noqa: E402
from llm_compile.runtime import swa  # noqa: E402
from llm_compile.runtime.swa.pages import PageSummary  # noqa: E402
from llm_compile.runtime.swa.sketch import KeySketch  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1 set before triton was imported")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,Hq,Hkv,N,P,D,dtype", [
    (2, 4, 2, 90, 16, 16, torch.float32),     # GQA, partial last page
    (1, 6, 2, 1100, 16, 24, torch.float16),   # > 64 pages (two page blocks), D not a power of 2
    (2, 3, 3, 33, 4, 32, torch.float32),      # MHA
])
def test_kernel_matches_torch_bounds(B, Hq, Hkv, N, P, D, dtype):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEV)
    q = torch.randn(B, Hq, D, generator=g).to(dtype).to(DEV)
    s = PageSummary(P)
    s.update(k)
    want = s.bounds(q, 0.3)
    got = swa_page_bounds(q, s.kmin, s.kmax, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,block,B,Hq,Hkv,D,dtype", [
    (2, 64, 2, 9, 3, 64, torch.float32),    # SmolLM2's heads, the default sketch
    (1, 128, 1, 4, 1, 24, torch.float16),   # MQA, D not a power of 2
    (4, 16, 2, 2, 2, 16, torch.float32),    # MHA, 8 bytes per channel (padded to 16)
    (8, 16, 1, 8, 2, 32, torch.bfloat16),   # one code per byte
])
def test_sketch_kernel_matches_the_torch_logits(bits, block, B, Hq, Hkv, D, dtype):
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(B, Hkv, 3 * block + 3, D, generator=g)
    s = KeySketch(bits, block)
    s.update(k[:, :, :block].to(dtype).to(DEV))
    s.update(k.to(dtype).to(DEV))                   # grown: capacity > blocks used
    q = torch.randn(B, Hq, D, generator=g).to(dtype).to(DEV)
    packed, step, mn, nb = s.parts()
    got = swa_sketch_logits(packed, step, mn, q, nb, bits, 0.3)
    torch.testing.assert_close(got, s.logits_torch(q, 0.3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("policy,scorer", [("quest", "pages"), ("recall", "pages"), ("recall", "sketch")])
@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_triton_decode_path_picks_the_same_tokens(policy, scorer, selection):
    """The same decode steps through kernel="triton" (page-bound or sketch-logit kernel + fused
    attend kernels) and kernel="torch" (the CPU kernel for the sketch): same tokens kept at every
    step, same outputs."""
    B, Hq, Hkv, L, D = 2, 4, 2, 260, 16
    outs, picks = {}, {}
    for kernel in ("torch", "triton"):
        cfg = SWAConfig(sparsity=0.8, policy=policy, selection=selection, bucket=16, kernel=kernel,
                        scorer=scorer)
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, h, L, D, generator=g).to(DEV) for h in (Hq, Hkv, Hkv))
        st = swa.new_state(B, Hkv, DEV, cfg)
        swa.swa_step(st, q, k, v, 0.25, cfg, is_causal=True)
        outs[kernel], picks[kernel] = [], []
        for _ in range(4):
            k = torch.cat([k, torch.randn(B, Hkv, 1, D, generator=g).to(DEV)], 2)
            v = torch.cat([v, torch.randn(B, Hkv, 1, D, generator=g).to(DEV)], 2)
            qd = torch.randn(B, Hq, 1, D, generator=g).to(DEV)
            outs[kernel].append(swa.swa_step(st, qd, k, v, 0.25, cfg))
            picks[kernel].append(st.last_indices.clone())
        assert st.last_budget.summary > 0
    for a, b in zip(picks["torch"], picks["triton"]):
        assert torch.equal(a, b)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
