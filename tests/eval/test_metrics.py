"""Metrics on the real model: plausible numbers, exact streaming == teacher forcing, llmaccel with
every pass off == eager."""
import math

import pytest
import torch

from llm_compile.eval import data, metrics, passkey
from llm_compile.eval.model import compile_model, eager_forward, is_compiled, uncompile_model


@pytest.fixture(scope="module")
def ids(smollm2):
    return data.load_tokens(smollm2[1], "evaluation", 256)


def test_perplexity_plausible(smollm2, ids):
    model, _ = smollm2
    r = metrics.perplexity(model, ids, context=128, stride=64, progress=False, return_nll=True)
    assert r["n_scored"] == 255 and r["windows"] == 3
    assert torch.isfinite(r["nll_per_token"]).all()
    # SmolLM2-135M on the Gospel of Luke (short context): about 15-20
    assert 8.0 < r["ppl"] < 40.0, r["ppl"]
    disjoint = metrics.perplexity(model, ids, context=128, stride=128, progress=False)
    assert disjoint["n_scored"] == 255 and disjoint["windows"] == 2
    assert r["ppl"] < disjoint["ppl"] * 1.05  # more left context never hurts much


def test_streaming_equals_teacher_forced(smollm2, ids):
    model, _ = smollm2
    x = ids[:, :48]
    tf = metrics.perplexity(model, x, context=48, stride=48, progress=False, return_nll=True)
    st = metrics.streaming_perplexity(model, x, progress=False, return_nll=True)
    assert st["n_scored"] == 47 and st["first_scored"] == 1
    torch.testing.assert_close(st["nll_per_token"], tf["nll_per_token"], atol=2e-4, rtol=1e-4)
    assert math.isclose(st["ppl"], tf["ppl"], rel_tol=1e-4)
    pre = metrics.streaming_perplexity(model, x, prefill=16, progress=False, return_nll=True,
                                       segment=8)
    assert pre["n_scored"] == 32 and len(pre["by_segment"]) == 4
    torch.testing.assert_close(pre["nll_per_token"], tf["nll_per_token"][15:], atol=2e-4, rtol=1e-4)


def test_greedy_matches_hf_generate(smollm2, ids):
    model, _ = smollm2
    prompt = ids[:, :24]
    ours = metrics.greedy_generate(model, prompt, 6)
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                        do_sample=False)[0, 24:]
    assert ours.tolist() == hf.tolist()
    tail = metrics.greedy_generate(model, prompt, 6, decode_tail=4)
    assert tail.tolist() == ours.tolist()


def test_agreement_of_eager_with_itself(smollm2):
    model, tok = smollm2
    prompts = data.prompt_windows(tok, "evaluation", n=2, prompt_tokens=16)
    r = metrics.agreement(model, prompts, max_new_tokens=4, progress=False)
    assert r["agreement"] == 1.0 and r["exact"] == 1.0 and r["n"] == 2


def test_passkey_short(smollm2):
    model, tok = smollm2
    ids, pos = passkey.passkey_prompt(tok, 300, 0.5, 12345)
    assert 270 <= ids.shape[1] <= 300
    assert tok.decode(ids[0, pos:pos + 12]).startswith("The pass key is 12345")
    r = passkey.passkey_retrieval(model, tok, lengths=(256,), depths=(0.0, 0.5), progress=False)
    assert [g["depth"] for g in r["grid"]] == [0.0, 0.5]
    assert r["accuracy"] >= 0.5, r["grid"]  # the model retrieves short-context keys
    assert passkey.parse_answer(" 71432. Remember") == "71432"


def test_compile_helpers(smollm2):
    model, _ = smollm2
    compile_model(model, {"inner": "eager"}, backend="eager")  # dev backend: options dropped
    try:
        assert is_compiled(model)
        assert eager_forward(model).__func__ is type(model).forward
    finally:
        uncompile_model(model)
    assert not is_compiled(model)


@pytest.mark.slow  # ~5 min on 2 cores (CI budget); tests/test_backend.py checks passes-off = eager on tiny models
def test_llmaccel_passes_off_matches_eager(smollm2, ids):
    """Prefill (8 tokens) + decode (7 steps) through llmaccel with no pass on, vs eager."""
    pytest.importorskip("llm_compile.backend")
    model, _ = smollm2
    x = ids[:, :16]
    ref = metrics.streaming_perplexity(model, x, prefill=8, progress=False, return_nll=True)
    compile_model(model, {"inner": "eager", "canonicalize": True})
    try:
        got = metrics.streaming_perplexity(model, x, prefill=8, progress=False, return_nll=True)
    finally:
        uncompile_model(model)
    torch.testing.assert_close(got["nll_per_token"], ref["nll_per_token"], atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_llmaccel_inductor_passes_off_matches_eager(smollm2):
    """All four metrics, llmaccel with its defaults (Inductor) and no pass, vs eager (minutes)."""
    pytest.importorskip("llm_compile.backend")
    from llm_compile.eval.runner import EvalSettings, run_configs

    model, tok = smollm2
    s = EvalSettings(tokens=256, context=128, stride=64, stream_tokens=24, prefill=8,
                     passkey_lengths=(256,), passkey_depths=(0.5,), agree_n=2, agree_tokens=6,
                     agree_prompt=16, progress=False)
    eager, acc = run_configs(model, tok, [("eager", None), ("llmaccel", {})], s)
    assert acc["error"] is None, acc.get("traceback")
    assert math.isclose(acc["row"]["ppl"], eager["row"]["ppl"], rel_tol=1e-4)
    assert math.isclose(acc["row"]["stream_ppl"], eager["row"]["stream_ppl"], rel_tol=1e-4)
    assert acc["row"]["passkey"] == eager["row"]["passkey"]
    assert acc["row"]["agree"] == 1.0


def test_summary_of_a_broken_model_is_inf_not_an_error():
    """A model whose mean NLL passes float range (e.g. Anda at a too-small mantissa) gets ppl inf."""
    out = metrics._summary(torch.full((4,), 800.0), 1.0)
    assert out["ppl"] == float("inf") and out["nll"] == 800.0
    assert metrics._segments(torch.full((4,), 800.0), 0, 2)[0]["ppl"] == float("inf")
    assert math.isclose(metrics._summary(torch.full((4,), 2.0), 1.0)["ppl"], math.exp(2.0))
