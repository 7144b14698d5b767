"""The C kernels built without SIMD (a CPU without AVX2, or a compiler that refuses the flags) and
with AVX2 only (no AVX-512) compute what the default build computes: the scalar and AVX2 paths of
swa_cpu.c / swa_scores.c are not otherwise run on a machine with AVX-512."""
import pytest
import torch

from llm_compile.config import SWAConfig
from llm_compile.runtime.swa import native
from llm_compile.runtime.swa.state import compute_budget

BASE = ["-O3", "-shared", "-fPIC", "-std=gnu99"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]


def _build_with(monkeypatch, tmp_path, flags):
    monkeypatch.setenv("LLMACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_flag_sets", lambda: [flags])
    return native._declare(native._build())


def _run_all(lib, monkeypatch):
    """Every kernel on fixed inputs, through the Python wrappers, with ``lib`` as the library."""
    monkeypatch.setattr(native, "library", lambda: lib)
    g = torch.Generator().manual_seed(0)
    B, H, G, D, blk, bits = 2, 3, 3, 64, 64, 2
    nb = 5
    PB = blk * bits // 8
    packed = torch.randint(0, 256, (B, H, nb + 1, D, PB), dtype=torch.uint8, generator=g)
    step = (torch.rand(B, H, nb + 1, D, generator=g) * 0.1).half()
    mn = (-torch.rand(B, H, nb + 1, D, generator=g)).half()
    q = torch.randn(B, H * G, D, generator=g)
    logits = native.sketch_logits(packed, step, mn, q, nb, bits, 0.125)
    n = nb * blk + 40
    b = compute_budget(n, SWAConfig(sparsity=0.8, policy="recall"), D, D, 4)
    hist = torch.randint(0, 1 << 40, (B, 1, n), generator=g)
    picks = native.query_select(logits, 1, hist, n, b.sinks, b.recent, b.query, b.global_, b.padded, 1)
    k = torch.randn(B, H, n, D, generator=g)
    v = torch.randn(B, H, n, D, generator=g)
    out, w = native.sparse_attend(q, k, v, picks, None, 0.125)
    return logits, picks, out, w


@pytest.mark.parametrize("simd", ["none", "avx2"])
def test_builds_agree(monkeypatch, tmp_path, simd):
    assert native.library() is not None   # the machine has a C compiler (CI does)
    if simd == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    want = _run_all(native.library(), monkeypatch)
    monkeypatch.undo()
    lib = _build_with(monkeypatch, tmp_path, BASE + (AVX2 if simd == "avx2" else []))
    got = _run_all(lib, monkeypatch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)     # sketch logits
    assert torch.equal(got[1], want[1])                                    # the picks
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)     # attention output
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-7)     # its weights
