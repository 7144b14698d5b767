"""``swa.min_context``: below it decode steps run dense (exact), above it sparse, with the scores at
the switch equal to those of keeping every step's weights."""
import pytest
import torch

from llm_compile.config import OptionsError, SWAConfig, parse_options
from llm_compile.ops.attention import dense_attention
from llm_compile.runtime import swa

B, HQ, HKV, D = 2, 4, 2, 16


def _run(cfg, n0=24, steps=40, seed=0, monkeypatch=None):
    """Prefill n0 tokens, then ``steps`` decode steps; returns outputs, dense references, states."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, n0 + steps, D, generator=g)
    v = torch.randn(B, HKV, n0 + steps, D, generator=g)
    q0 = torch.randn(B, HQ, n0, D, generator=g)
    qs = torch.randn(steps, B, HQ, 1, D, generator=g)
    st = swa.new_state(B, HKV, "cpu", cfg)
    swa.swa_step(st, q0, k[:, :, :n0], v[:, :, :n0], D ** -0.5, cfg, is_causal=True)
    outs, refs, scores = [], [], {}
    for i in range(steps):
        n = n0 + i + 1
        outs.append(swa.swa_step(st, qs[i], k[:, :, :n], v[:, :, :n], D ** -0.5, cfg))
        refs.append(dense_attention(qs[i], k[:, :, :n], v[:, :, :n], None, D ** -0.5, False))
        scores[n] = st.score.clone()
    return outs, refs, scores


def test_below_min_context_is_dense_and_exact_above_it_sparse():
    cfg = SWAConfig(sparsity=0.8, bucket=1, min_context=48)
    outs, refs, _ = _run(cfg)
    for i, (o, r) in enumerate(zip(outs, refs)):
        n = 24 + i + 1
        if n < 48:
            assert torch.equal(o, r), n  # bit-identical to dense attention
    assert any(not torch.allclose(o, r, atol=1e-6) for o, r in zip(outs[30:], refs[30:]))  # sparse after


def test_without_min_context_short_steps_are_sparse():
    outs, refs, _ = _run(SWAConfig(sparsity=0.8, bucket=1, min_context=0))
    assert not torch.allclose(outs[5], refs[5], atol=1e-6)


def test_scores_at_the_switch_equal_keeping_every_step(monkeypatch):
    """Dense steps long before min_context skip the score update (the speed of the short-context
    path); the ALISA window at the switch still sees exactly the weights it would have."""
    cfg = SWAConfig(sparsity=0.8, bucket=1, min_context=56)
    _, _, fast = _run(cfg)
    monkeypatch.setattr(swa.step, "_scores_wanted", lambda n, c: True)
    outs_ref, _, ref = _run(cfg)
    for n in range(56, 24 + 40 + 1):
        torch.testing.assert_close(fast[n], ref[n], rtol=0, atol=0, msg=f"scores differ at n={n}")


def test_min_context_option_is_checked():
    assert parse_options({"swa": {"min_context": 0}}).swa.min_context == 0
    assert parse_options({"swa": {"min_context": 1024}}).swa.min_context == 1024
    for bad in (-1, 1.5, True, "512"):
        with pytest.raises(OptionsError, match="min_context"):
            parse_options({"swa": {"min_context": bad}})


@pytest.mark.slow  # the same path runs in tests/test_context_dispatch.py (the SWA graph's in-op rule)
def test_model_below_min_context_generates_exactly_dense():
    """End to end: a generation that stays below min_context gives the dense model's tokens
    (with sparsity 0.8 and min_context 0 it would not: checked on the same prompt)."""
    from model_zoo import build

    m = build("llama", "sdpa", layers=2)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with torch.no_grad():
        ref = m.generate(ids, **gen)
        outs = {}
        for mc in (0, 4096):
            torch._dynamo.reset()
            m.forward = torch.compile(m.__class__.forward.__get__(m), backend="llmaccel",
                                      options={"inner": "eager", "swa": {"sparsity": 0.8, "min_context": mc,
                                                                         "bucket": 1}})
            outs[mc] = m.generate(ids, **gen)
    assert torch.equal(outs[4096], ref)
    assert not torch.equal(outs[0], ref)
