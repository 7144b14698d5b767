"""``swa.min_context`` with a dense graph below it (issue 17, "never slower than dense"): each
captured graph is compiled dense (stock Inductor) and with SWA; the sequence's length picks one per
call, and the SWA graph adopts the cache the dense graph filled."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import DynamicCache

import model_zoo
from helpers import record_compiles
from llm_compile import LLMAccelCache
from llm_compile.context_dispatch import probe

SWA = {"sparsity": 0.5, "bucket": 4, "kernel": "torch"}


def _model(options, layers=2):
    m = model_zoo.build("llama", layers=layers)
    if options is not None:
        m.forward = torch.compile(m.forward, backend="llmaccel", options=options)
    return m


def _ids(n=10, batch=1, seed=0):
    return torch.randint(0, model_zoo.VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _calls(records: list[dict]) -> Counter:
    """Calls per form (dense / swa) of the compiled graphs ``records`` (from ``record_compiles``)."""
    return sum((r["calls"] for r in records if "calls" in r), start=Counter())


def _teacher_forced(model, tokens, prompt, cache):
    """Logits of every step of ``tokens`` fed one by one after ``prompt`` (same tokens for every model)."""
    out = model(tokens[:, :prompt], past_key_values=cache)
    logits = [out.logits[:, -1]]
    for i in range(prompt, tokens.shape[1]):
        logits.append(model(tokens[:, i: i + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("kv_store", [True, False], ids=["swa+store", "swa"])
def test_below_min_context_equals_eager_and_after_the_switch_equals_in_op_min_context(kv_store, monkeypatch):
    """Steps below min_context run the dense graph (= eager); the switch step attends densely over
    the adopted cache; after it, the streaming policy (no scores) gives exactly what one SWA graph
    with min_context handled inside its ops gives, so the adopted KV is the right KV. (One layer:
    its K/V come from the embeddings only, so the two runs hold the same KV.)"""
    import llm_compile.context_dispatch as cd

    swa = {**SWA, "policy": "streaming", "sink_tokens": 2, "min_context": 16}
    options = {"inner": "eager", "kv_store": kv_store, "swa": swa}
    tokens, prompt, m = _ids(30), 8, 16
    with torch.no_grad():
        eager = _teacher_forced(_model(None, layers=1), tokens, prompt, DynamicCache())
        with record_compiles() as records:
            got = _teacher_forced(_model(options, layers=1), tokens, prompt, DynamicCache())
        calls = _calls(records)
        monkeypatch.setattr(cd, "applies", lambda config: False)  # one graph, min_context inside the ops
        in_op = _teacher_forced(_model(options, layers=1), tokens, prompt, DynamicCache())
    # row j: the call that attended over prompt + j tokens; the switch call is the first with >= m
    switch = m - prompt
    torch.testing.assert_close(got[:, :switch + 1], eager[:, :switch + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, switch + 1:], in_op[:, switch + 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, switch + 1:], eager[:, switch + 1:], atol=1e-3)  # sparse after it
    # under kv_store the cache holds phantoms after the switch: Dynamo guards them into their own
    # graph (no dispatch); without it the cache tensors carry SWA state: the SWA form every call
    assert calls["dense"] == switch and calls["swa"] == (1 if kv_store else tokens.shape[1] - m + 1)


def test_through_inductor_dense_steps_equal_eager_and_the_sequence_continues():
    tokens, prompt, m = _ids(26), 8, 14
    with torch.no_grad():
        eager = _teacher_forced(_model(None), tokens, prompt, DynamicCache())
        got = _teacher_forced(_model({"swa": {**SWA, "min_context": m}}), tokens, prompt, DynamicCache())
    torch.testing.assert_close(got[:, : m - prompt + 1], eager[:, : m - prompt + 1], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()


def test_a_long_prompt_goes_straight_to_the_swa_graph():
    """A prompt at or past min_context never runs dense: same logits as without min_context."""
    tokens = _ids(24)
    with torch.no_grad():
        want = _teacher_forced(_model({"inner": "eager", "swa": SWA}), tokens, 16, DynamicCache())
        got = _teacher_forced(_model({"inner": "eager", "swa": {**SWA, "min_context": 12}}), tokens, 16,
                              DynamicCache())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_crop_below_min_context_after_the_switch_never_reads_the_phantoms_densely():
    """A cache cropped back below min_context (assisted decoding) carries state: the SWA graph (its ops
    are dense and exact below min_context) runs it, never the dense graph (which would read the
    zero-memory phantoms)."""
    swa = {**SWA, "sparsity": 0.3, "min_context": 14}
    tokens = _ids(24)
    with torch.no_grad():
        eager_model = _model(None)
        model = _model({"inner": "eager", "swa": swa})
        cache = LLMAccelCache()
        _teacher_forced(model, tokens[:, :20], 8, cache)
        cache.crop(-10)  # 10 tokens left, below min_context
        got = model(tokens[:, 10:12], past_key_values=cache).logits
        ref_cache = DynamicCache()
        eager_model(tokens[:, :10], past_key_values=ref_cache)
        want = eager_model(tokens[:, 10:12], past_key_values=ref_cache).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_beam_search_with_llmaccel_cache_crosses_the_switch():
    """LLMAccelCache keeps the dense mark through beam reordering, so the switch adopts the beams'
    caches; a plain DynamicCache's reorder drops it and the switch step says what to do."""
    ids = _ids(6)
    with torch.no_grad():
        model = _model({"inner": "eager", "swa": {**SWA, "sparsity": 0.2, "min_context": 9}})
        out = model.generate(ids, past_key_values=LLMAccelCache(), num_beams=2, max_new_tokens=8,
                             do_sample=False)
        assert out.shape[1] == 14
        with pytest.raises(Exception, match="LLMAccelCache"):
            model.generate(ids, past_key_values=DynamicCache(), num_beams=2, max_new_tokens=8, do_sample=False)


def test_a_real_cache_from_another_model_is_still_refused_at_the_switch():
    """Only caches the dense graph marked are adopted; a cache filled elsewhere keeps the old error."""
    ids = _ids(12)
    with torch.no_grad():
        cache = DynamicCache()
        _model(None)(ids, past_key_values=cache)  # 12 tokens, filled by an uncompiled model
        model = _model({"inner": "eager", "swa": {**SWA, "min_context": 10}})
        with pytest.raises(Exception, match="real KV cache|carries no SWA state"):
            model(ids[:, :1], past_key_values=cache)


def test_probe_reads_the_context_length_from_the_input_shapes():
    seen, calls = [], []

    def backend(gm, example_inputs):
        p = probe(gm, example_inputs)
        seen.append(p)

        def run(*args):
            calls.append(p.length(args))
            return gm.forward(*args)
        return run

    m = model_zoo.build("llama")
    m.forward = torch.compile(m.forward, backend=backend)
    with torch.no_grad():
        cache = DynamicCache()
        out = m(_ids(10), past_key_values=cache)
        for _ in range(4):
            out = m(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    prefill, first_decode, dynamic = seen[0], seen[1], seen[-1]
    assert prefill.static_length == 10 and prefill.cache_inputs == () and len(prefill.cache_outputs) == 4
    assert first_decode.static_length == 11 and len(first_decode.cache_inputs) == 4
    assert dynamic.static_length is None and len(seen) == 3
    assert calls == [10, 11, 12, 13, 14]  # the dynamic graph reads the lengths from its arguments
