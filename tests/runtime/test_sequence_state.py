"""Per-sequence state (in-place KV, SWA scores) belongs to the cache object passed to the forward.

The first tests reproduce the silent wrong answers of issue 12 (they failed before the state
moved into the cache): a second input between two decode steps, two models sharing a module, HF
StaticCache. Then every supported cache and generation mode against eager HF (dense, kv_store)
or against SWA without the store, and the errors for caches edited outside the model.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import model_zoo
from llm_compile import LLMAccelCache
from llm_compile.runtime.swa.op import SequenceStateError

STORE = {"inner": "eager", "kv_store": True}
SWA = {"inner": "eager", "swa": {"sparsity": 0.5, "bucket": 4, "kernel": "torch"}}  # kv_store on by default
SWA_ALONE = {**SWA, "kv_store": False}


def _compiled(options, seed=0, layers=2):
    m = model_zoo.build("llama", layers=layers, seed=seed)
    m.forward = torch.compile(m.forward, backend="llmaccel", options=options)
    return m


def _ids(n=10, batch=1, seed=0):
    return torch.randint(0, model_zoo.VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, cache, steps=5, between=None):
    """Prefill + ``steps`` greedy decode steps by hand; ``between()`` runs after the prefill."""
    out = model(ids, past_key_values=cache, use_cache=True)
    if between is not None:
        between()
    toks = []
    for _ in range(steps):
        t = out.logits[:, -1:].argmax(-1)
        toks.append(t)
        out = model(t, past_key_values=cache, use_cache=True)
    return torch.cat(toks, 1)


@pytest.mark.parametrize("options", [STORE, SWA], ids=["kv_store", "swa+store"])
def test_other_input_between_decode_steps_does_not_change_the_sequence(options):
    """Failure 1: scoring another 10-token text between A's steps made A continue on its KV."""
    model, ref = _compiled(options), _compiled(options)
    a, other = _ids(seed=0), _ids(seed=1)
    with torch.no_grad():
        want = _greedy(ref, a, DynamicCache())
        got = _greedy(model, a, DynamicCache(), between=lambda: model(other))
    assert torch.equal(got, want)
    if options is STORE:
        assert torch.equal(want, _greedy(model_zoo.build("llama"), a, DynamicCache()))


INDUCTOR_SWA = {"swa": {"sparsity": 0.5, "bucket": 4, "kernel": "torch"}, "kv_store": False}


@pytest.mark.parametrize("options", [STORE, SWA, SWA_ALONE,
                                     pytest.param(INDUCTOR_SWA, marks=pytest.mark.slow)],  # -m slow
                         ids=["kv_store", "swa+store", "swa", "swa-inductor"])
def test_two_caches_of_one_model_interleaved_step_by_step(options):
    """Each cache carries its own state, also through Inductor (the op receives the very tensor
    the cache holds, and the tensor it returns is the one the cache stores)."""
    model, ref = _compiled(options), _compiled(options)
    a, b = _ids(seed=0), _ids(seed=1)
    with torch.no_grad():
        want_a, want_b = _greedy(ref, a, DynamicCache(), 6), _greedy(ref, b, DynamicCache(), 6)
        ca, cb = DynamicCache(), DynamicCache()
        oa, ob = model(a, past_key_values=ca), model(b, past_key_values=cb)
        ta, tb = [], []
        for _ in range(6):
            ta.append(oa.logits[:, -1:].argmax(-1))
            tb.append(ob.logits[:, -1:].argmax(-1))
            oa = model(ta[-1], past_key_values=ca)
            ob = model(tb[-1], past_key_values=cb)
    assert torch.equal(torch.cat(ta, 1), want_a) and torch.equal(torch.cat(tb, 1), want_b)


def test_two_models_sharing_a_module_do_not_collide():
    """Failure 2: the old store was keyed by the first parameter (here: the shared embedding)."""
    m1, m2 = model_zoo.build("llama", seed=0), model_zoo.build("llama", seed=1)
    m2.model.embed_tokens = m1.model.embed_tokens
    r1, r2 = model_zoo.build("llama", seed=0), model_zoo.build("llama", seed=1)
    r2.model.embed_tokens = r1.model.embed_tokens
    for m in (m1, m2):
        m.forward = torch.compile(m.forward, backend="llmaccel", options=STORE)
    ids = _ids(seed=3)
    with torch.no_grad():
        c1, c2, d1, d2 = DynamicCache(), DynamicCache(), DynamicCache(), DynamicCache()
        o1, o2 = m1(ids, past_key_values=c1), m2(ids, past_key_values=c2)
        e1, e2 = r1(ids, past_key_values=d1), r2(ids, past_key_values=d2)
        for _ in range(4):
            t1, t2 = e1.logits[:, -1:].argmax(-1), e2.logits[:, -1:].argmax(-1)
            o1, o2 = m1(t1, past_key_values=c1), m2(t2, past_key_values=c2)
            e1, e2 = r1(t1, past_key_values=d1), r2(t2, past_key_values=d2)
            torch.testing.assert_close(o1.logits, e1.logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(o2.logits, e2.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [STORE, {"inner": "eager", "canonicalize": True}], ids=["kv_store", "canonical"])
@pytest.mark.parametrize("how", ["cache_implementation", "StaticCache"])
def test_static_cache_greedy_equals_eager(options, how):
    """Failure 3: with HF's StaticCache the decode graph was taken for a prefill (|dlogit| 0.67)."""
    model, ref = _compiled(options), model_zoo.build("llama")
    ids = _ids()
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        if how == "StaticCache":
            got = model.generate(ids, past_key_values=StaticCache(config=model.config, max_cache_len=32), **kw)
            want = ref.generate(ids, past_key_values=StaticCache(config=ref.config, max_cache_len=32), **kw)
        else:
            got = model.generate(ids, cache_implementation="static", **kw)
            want = ref.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got, want)


def test_static_cache_logits_and_structure():
    from helpers import pass_record, record_compiles

    model, ref = _compiled(STORE), model_zoo.build("llama")
    ids = _ids()
    with torch.no_grad(), record_compiles() as rec:
        c, d = StaticCache(config=model.config, max_cache_len=24), StaticCache(config=ref.config, max_cache_len=24)
        o, e = model(ids, past_key_values=c), ref(ids, past_key_values=d)
        for _ in range(3):
            t = e.logits[:, -1:].argmax(-1)
            o, e = model(t, past_key_values=c), ref(t, past_key_values=d)
            torch.testing.assert_close(o.logits, e.logits, rtol=1e-4, atol=1e-4)
    for r in rec:
        canon = pass_record(r, "canonicalize_attention")
        assert canon["stats"]["sites"] == 2 and all(m["static_cache"] for m in canon["matched"])
        store = pass_record(r, "local_kv_store")
        assert not store["changed"] and "StaticCache" in store["skipped"][0]["reason"]


def test_static_cache_with_swa_equals_swa_with_dynamic_cache():
    """SWA over a StaticCache reads the filled rows only and keeps its state on the cache: its
    tokens are those of SWA over a DynamicCache (no per-step 'no prefill state' restart)."""
    ids = _ids(n=24)
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = _compiled(SWA_ALONE).generate(ids, **kw)
        torch._dynamo.reset()
        got = _compiled(SWA).generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got, want)


def _gen_pair(options, **kw):
    ids = kw.pop("ids", _ids())
    cache = kw.pop("cache", None)
    with torch.no_grad():
        want = model_zoo.build("llama").generate(ids, **kw)
        model = _compiled(options)
        got = model.generate(ids, past_key_values=cache() if cache else None, **kw)
    return got, want


@pytest.mark.parametrize("cache", [None, LLMAccelCache], ids=["DynamicCache", "LLMAccelCache"])
def test_greedy_and_sampling_equal_eager(cache):
    got, want = _gen_pair(STORE, cache=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    torch.manual_seed(7)
    ids = _ids()
    with torch.no_grad():
        want = model_zoo.build("llama").generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
        torch.manual_seed(7)
        got = _compiled(STORE).generate(ids, past_key_values=cache() if cache else None,
                                        max_new_tokens=6, do_sample=True, top_k=20)
    assert torch.equal(got, want)


def test_beam_search_with_llmaccel_cache_equals_eager():
    got, want = _gen_pair(STORE, cache=LLMAccelCache, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(got, want)


def test_beam_search_swa_store_equals_swa_alone():
    """Beam search reorders the SWA scores with the KV: SWA over the in-place store gives the
    tokens SWA over the model's own (reordered) KV gives."""
    ids = _ids(n=24)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        want = _compiled(SWA_ALONE).generate(ids, past_key_values=LLMAccelCache(), **kw)
        torch._dynamo.reset()
        got = _compiled(SWA).generate(ids, past_key_values=LLMAccelCache(), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("options", [STORE, SWA_ALONE], ids=["kv_store", "swa"])
def test_beam_search_on_a_plain_dynamic_cache_is_an_error_naming_llmaccel_cache(options):
    model = _compiled(options)
    with torch.no_grad(), pytest.raises(Exception, match="LLMAccelCache"):
        model.generate(_ids(n=24), max_new_tokens=4, num_beams=2, do_sample=False)


def test_assisted_decoding_crop_equals_eager():
    ids = _ids()
    with torch.no_grad():
        want = model_zoo.build("llama").generate(ids, max_new_tokens=8, do_sample=False)
        model, draft = _compiled(STORE), model_zoo.build("llama", layers=1, seed=5)
        got = model.generate(ids, past_key_values=LLMAccelCache(), assistant_model=draft,
                             max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_crop_on_plain_dynamic_cache_is_an_error():
    model = _compiled(STORE)
    with torch.no_grad():
        cache = DynamicCache()
        out = model(_ids(), past_key_values=cache)
        t = out.logits[:, -1:].argmax(-1)
        model(t, past_key_values=cache)
        cache.crop(-2)
        with pytest.raises(SequenceStateError, match="LLMAccelCache"):
            model(t, past_key_values=cache)


def test_crop_then_continue_equals_eager_with_llmaccel_cache():
    """Crop by hand (2 tokens) then decode on: the logits are eager HF's after the same crop,
    for the store and for SWA's state (which must cover exactly the kept tokens)."""
    ref, model = model_zoo.build("llama"), _compiled(STORE)
    ids = _ids()
    with torch.no_grad():
        c, d = LLMAccelCache(), DynamicCache()
        model(ids, past_key_values=c), ref(ids, past_key_values=d)
        for t in (5, 6, 7):
            tok = torch.tensor([[t]])
            model(tok, past_key_values=c), ref(tok, past_key_values=d)
        c.crop(-2), d.crop(-2)
        assert c.get_seq_length() == d.get_seq_length() == 11
        tok = torch.tensor([[9]])
        torch.testing.assert_close(model(tok, past_key_values=c).logits, ref(tok, past_key_values=d).logits,
                                   rtol=1e-4, atol=1e-4)
    swa_model = _compiled(SWA)
    with torch.no_grad():
        c = LLMAccelCache()
        swa_model(_ids(n=24), past_key_values=c)
        for t in (5, 6, 7):
            swa_model(torch.tensor([[t]]), past_key_values=c)
        c.crop(-2)
        kv = c.layers[0].keys.llmaccel_kv
        assert kv.length == 25 and kv.state.n == 25
        swa_model(torch.tensor([[9]]), past_key_values=c)   # decodes on without a state error


def test_left_padded_batch_and_two_prompts_in_a_row():
    ids = _ids(batch=2, n=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    got, want = _gen_pair(STORE, ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    model, ref = _compiled(STORE), model_zoo.build("llama")
    with torch.no_grad():
        for seed in (1, 2):
            p = _ids(seed=seed, n=7 + seed)
            assert torch.equal(model.generate(p, max_new_tokens=4, do_sample=False),
                               ref.generate(p, max_new_tokens=4, do_sample=False))


def test_use_cache_false_equals_eager():
    got, want = _gen_pair(STORE, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(got, want)


def test_state_dies_with_the_cache():
    import gc
    import weakref

    model = _compiled(STORE)
    with torch.no_grad():
        cache = DynamicCache()
        model(_ids(), past_key_values=cache)
        ref = weakref.ref(cache.layers[0].keys.llmaccel_kv)
    del cache
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("options", [{"canonicalize": True}, pytest.param({"kv_store": True}, marks=pytest.mark.slow)],
                         ids=["canonical", "kv_store"])
def test_static_cache_decode_writes_in_place_under_inductor(options):
    """A decode step over a StaticCache writes its row in place: the compiled code allocates no
    buffer of ``max_cache_len`` rows. Before, ``static_attention`` also took the key buffer as it
    was *before* the write, so Inductor could not re-inplace the write and copied the whole
    buffer every step (a 16k-token cache: ~80 ms per layer and step on CPU)."""
    from torch._inductor.utils import run_and_get_code

    max_len = 88  # a length no other tensor of the model has
    model, ref = _compiled(options), model_zoo.build("llama")
    ids = _ids()
    with torch.no_grad():
        c, d = StaticCache(config=model.config, max_cache_len=max_len), StaticCache(config=ref.config, max_cache_len=max_len)
        o, e = model(ids, past_key_values=c), ref(ids, past_key_values=d)
        codes = []
        for _ in range(3):
            t = e.logits[:, -1:].argmax(-1)
            (o, *_), code = run_and_get_code(lambda: (model(t, past_key_values=c),))
            e = ref(t, past_key_values=d)
            codes += code
            torch.testing.assert_close(o.logits, e.logits, rtol=1e-4, atol=1e-4)
    assert codes, "the decode step compiled nothing"
    hkv, hd = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    big = [ln.strip() for code in codes for ln in code.splitlines()
           if "empty_strided" in ln and f"(1, {hkv}, {max_len}, {hd})" in ln]
    assert not big, f"decode allocates whole StaticCache buffers: {big}"
