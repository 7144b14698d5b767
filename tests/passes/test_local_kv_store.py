"""local_kv_store pass + in-process KV store: structure (sites rewritten, cache appends gone,
phantoms returned), numerics against eager HF, in-place growth, no recompiles, isolation, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import op_delta, pass_record, record_compiles
from llm_compile.config import OptionsError, parse_options
from llm_compile.ops.offload import is_phantom
from llm_compile.runtime.kv.buffer import SiteKV
from llm_compile.runtime.swa.op import SequenceStateError

STORED = "llmaccel.stored_attention.default"


def _llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kvs(cache):
    """The SiteKV of each layer: it hangs on the phantom K tensor the cache holds."""
    return [layer.keys.llmaccel_kv for layer in cache.layers]


def _compiled(model, **opts):
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"kv_store": opts.pop("kv_store", True), "inner": "eager", **opts})
    return model


def _ids(batch=2, n=9, seed=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_site_kv_appends_in_place_and_grows():
    kv = SiteKV(2, 3, 4, 5, torch.float32, torch.device("cpu"), None, None, reserve=2, growth=1.5)
    k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 5)
    kv.append(k[:, :, :4], v[:, :, :4])
    assert kv.capacity == 6 and kv.grown == 0
    buf = kv.k
    kv.append(k[:, :, 4:5], v[:, :, 4:5])
    assert kv.k is buf and kv.length == 5          # written into the free slot, no reallocation
    kv.append(k[:, :, 5:7], v[:, :, 5:7])          # 7 > 6: grows to max(7, 9, 22) once
    assert kv.grown == 1 and kv.capacity == 22
    assert torch.equal(kv.keys(), k) and torch.equal(kv.values(), v)
    assert kv.keys().data_ptr() == kv.k.data_ptr()  # a view of the buffer
    with pytest.raises(RuntimeError, match="do not fit the cache"):
        kv.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 5))
    assert kv.length == 7                           # a refused append changes nothing


def test_pass_structure_and_kv_in_the_store_equals_hf_cache():
    """Prefill + decode graphs: every site becomes stored_attention, the decode graph's cache
    appends (``cat``) are gone, the model's cache holds phantoms, and the store holds exactly
    the keys/values eager HF keeps in its DynamicCache."""
    ref_model, model = _llama(), _compiled(_llama())
    ids = _ids()
    with torch.no_grad():
        ref_cache = DynamicCache()
        ref0 = ref_model(ids, past_key_values=ref_cache, use_cache=True).logits
        cache = DynamicCache()
        with record_compiles() as rec:
            out0 = model(ids, past_key_values=cache, use_cache=True).logits
            tok = out0[:, -1:].argmax(-1)
            outs, refs = [], []
            for _ in range(3):
                outs.append(model(tok, past_key_values=cache, use_cache=True).logits)
                refs.append(ref_model(tok, past_key_values=ref_cache, use_cache=True).logits)
                tok = outs[-1][:, -1:].argmax(-1)
    torch.testing.assert_close(out0, ref0, rtol=1e-5, atol=1e-5)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert 2 <= len(rec) <= 3
    for r in rec:
        p = pass_record(r, "local_kv_store")
        assert p["changed"] and sorted(m["site"] for m in p["matched"]) == [0, 1]
        assert all(m["cache_outputs_phantomized"] == 2 for m in p["matched"])
        assert op_delta(r, "local_kv_store", STORED) == 2   # its phantoms are its own outputs
        assert op_delta(r, "local_kv_store", "llmaccel.kv_phantom.default") == 0
    decode = [r for r in rec if all(m["decode"] for m in pass_record(r, "local_kv_store")["matched"])]
    assert decode and op_delta(decode[0], "local_kv_store", "aten.cat.default") == -4  # 2 layers x (k, v)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        assert is_phantom(layer.keys) and is_phantom(layer.values) and layer.keys.shape == (2, 2, 12, 16)
        assert layer.keys.llmaccel_kv is layer.values.llmaccel_kv
    for site, (kv, ref_layer) in enumerate(zip(_kvs(cache), ref_cache.layers)):
        assert kv.site == site
        torch.testing.assert_close(kv.keys(), ref_layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv.values(), ref_layer.values, rtol=1e-5, atol=1e-5)
    per_site = 2 * 2 * 12 * 16 * 2 * 4  # batch * KV heads * tokens * D * (k, v) * fp32
    assert sum(kv.nbytes() for kv in _kvs(cache)) == 2 * per_site


def test_generate_matches_eager_and_buffers_grow_without_recompiling():
    """64 decode steps with 8 reserved slots: the buffers grow several times in place, the
    tokens equal eager HF's, and at most 4 graphs are compiled."""
    ref_model, model = _llama(), _compiled(_llama(), kv_store={"reserve_tokens": 8, "growth": 1.25})
    ids = _ids(n=40)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    with torch.no_grad():
        ref = ref_model.generate(ids, **gen)
        with record_compiles() as rec:
            res = model.generate(ids, **gen, return_dict_in_generate=True)
    assert torch.equal(res.sequences, ref)
    assert 1 <= len(rec) <= 4, f"{len(rec)} graphs for 64 decode steps"
    kvs = _kvs(res.past_key_values)
    assert len(kvs) == 2 and all(kv.length == 40 + 63 and kv.grown >= 2 for kv in kvs)


def test_left_padded_batch_matches_eager():
    ref_model, model = _llama(), _compiled(_llama())
    ids = _ids(n=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0                                  # the first sequence is 5 tokens shorter
    gen = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **gen), ref_model.generate(ids, **gen))


def test_swa_with_store_selects_the_same_tokens_as_swa_with_hf_cache():
    """SWA keeps its token scores next to the KV in the store; its decode equals SWA over HF's
    cache (same budgets, same selections, same tokens)."""
    ids = _ids(n=60)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    swa_opts = {"sparsity": 0.6}
    with torch.no_grad():
        plain = _compiled(_llama(), kv_store=None, swa=swa_opts).generate(ids, **gen)
        torch._dynamo.reset()
        with record_compiles() as rec:
            res = _compiled(_llama(), swa=swa_opts).generate(ids, **gen, return_dict_in_generate=True)
        stored = res.sequences
        dense = _llama().generate(ids, **gen)
    assert torch.equal(stored, plain)
    assert not torch.equal(stored, dense)            # sparsity 0.6 does change the continuation
    assert all(m["form"] == "swa" for r in rec for m in pass_record(r, "local_kv_store")["matched"])
    st = _kvs(res.past_key_values)[0].state
    assert st.steps == 23 and not st.last_budget.dense and st.last_budget.n == 60 + 23


def test_two_model_instances_keep_separate_kv():
    a, b = _compiled(_llama(seed=0)), _compiled(_llama(seed=1))
    ra, rb = _llama(seed=0), _llama(seed=1)
    ia, ib = _ids(seed=2), _ids(seed=3)
    with torch.no_grad():
        ca, cb, rca, rcb = DynamicCache(), DynamicCache(), DynamicCache(), DynamicCache()
        ta = a(ia, past_key_values=ca, use_cache=True).logits[:, -1:].argmax(-1)
        tb = b(ib, past_key_values=cb, use_cache=True).logits[:, -1:].argmax(-1)
        ra(ia, past_key_values=rca, use_cache=True)
        rb(ib, past_key_values=rcb, use_cache=True)
        for _ in range(3):  # interleaved decode steps
            la = a(ta, past_key_values=ca, use_cache=True).logits
            lb = b(tb, past_key_values=cb, use_cache=True).logits
            torch.testing.assert_close(la, ra(ta, past_key_values=rca, use_cache=True).logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lb, rb(tb, past_key_values=rcb, use_cache=True).logits, rtol=1e-5, atol=1e-5)
            ta, tb = la[:, -1:].argmax(-1), lb[:, -1:].argmax(-1)
    assert all(x.llmaccel_kv is not y.llmaccel_kv for x, y in zip(*[[layer.keys for layer in c.layers]
                                                                    for c in (ca, cb)]))


def test_cache_changed_outside_the_model_is_an_error():
    ref_model, model = _llama(), _compiled(_llama())
    ids = _ids()
    with torch.no_grad():
        cache = DynamicCache()
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        model(tok, past_key_values=cache, use_cache=True)
        cache.crop(-2)                               # a plain DynamicCache slices the phantoms
        with pytest.raises(SequenceStateError, match="carries no stored KV.*LLMAccelCache"):
            model(tok, past_key_values=cache, use_cache=True)
        real = DynamicCache()                        # filled by a model without kv_store
        ref_model(ids, past_key_values=real, use_cache=True)
        with pytest.raises(RuntimeError, match="got a real KV cache"):
            model(tok, past_key_values=real, use_cache=True)


def test_decode_with_a_cache_from_nowhere_is_an_error():
    """A phantom that carries no KV (made outside the compiled model) is refused."""
    ph = torch.zeros(1).as_strided((1, 2, 5, 8), (0, 0, 0, 0))
    with pytest.raises(SequenceStateError, match="carries no stored KV"):
        torch.ops.llmaccel.stored_attention(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8),
                                            torch.randn(1, 2, 1, 8), ph, ph, None, 0.3, False, 0,
                                            16, 1.5, "")


@pytest.mark.parametrize("opts, match", [
    ({"kv_store": True, "offload": {"workers": 1}}, "drop kv_store"),
    ({"kv_store": {"reserve_tokens": -1}}, "reserve_tokens"),
    ({"kv_store": {"growth": 1.0}}, "growth"),
    ({"kv_store": {"capacity": 10}}, "valid keys"),
    ({"kv_store": True, "canonicalize": False}, "canonicalize=True"),
])
def test_bad_options(opts, match):
    with pytest.raises(OptionsError, match=match):
        parse_options(opts)


def test_on_by_default_with_swa_only():
    assert parse_options({"swa": {"sparsity": 0.8}}).kv_store is not None
    assert parse_options({"swa": {"sparsity": 0.8}, "kv_store": False}).kv_store is None
    assert parse_options({"swa": {"selection": "kv_head"}, "offload": {"workers": 1}}).kv_store is None
    assert parse_options({}).kv_store is None and parse_options({"anda": True}).kv_store is None


def test_triton_swa_kernel_reads_the_store_views():
    """The fused Triton decode kernel (interpreted on CPU) over the store's strided buffer views
    gives the torch path's tokens."""
    ids = _ids(batch=1, n=48)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = _compiled(_llama(), swa={"sparsity": 0.5, "kernel": "torch"}).generate(ids, **gen)
        torch._dynamo.reset()
        out = _compiled(_llama(), swa={"sparsity": 0.5, "kernel": "triton"}).generate(ids, **gen)
    assert torch.equal(out, ref)


def test_forward_without_cache_is_left_alone():
    """``use_cache=False`` (teacher-forced scoring): no site returns a cache, so the pass leaves
    the graph as it is, without an error, and the logits are eager's."""
    ref_model, model = _llama(), _compiled(_llama())
    ids = _ids()
    with torch.no_grad(), record_compiles() as rec:
        out = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref_model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    p = pass_record(rec[0], "local_kv_store")
    assert not p["changed"] and "error" not in p and "nothing to store" in p["skipped"][0]["reason"]


def test_phantom_cache_read_by_an_unrewritten_graph_is_refused():
    """A cache filled under kv_store holds phantoms; a model compiled without canonicalization
    (so nothing can take over its attention) must not attend to their zeros: compiling that
    decode graph fails with an error that says why."""
    model = _compiled(_llama())
    ids = _ids()
    with torch.no_grad():
        cache = DynamicCache()
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        other = _llama()
        other.forward = torch.compile(other.forward, backend="llmaccel",
                                      options={"canonicalize": False, "inner": "eager"})
        with pytest.raises(Exception, match="phantom KV cache"):
            other(tok, past_key_values=cache, use_cache=True)


def test_inductor_compiles_around_the_store():
    """With the default inner compiler (Inductor) the store op stays an opaque call between fused
    kernels; SWA + store greedy tokens equal the eager-inner run's."""
    ids = _ids(n=40)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = _compiled(_llama(), swa={"sparsity": 0.5}).generate(ids, **gen)
        torch._dynamo.reset()
        model = _llama()
        model.forward = torch.compile(model.forward, backend="llmaccel", options={"swa": {"sparsity": 0.5}})
        with record_compiles() as rec:
            out = model.generate(ids, **gen)
    assert torch.equal(out, ref)
    assert all(pass_record(r, "local_kv_store")["changed"] for r in rec)


def test_kv_is_freed_with_the_cache():
    import gc
    import weakref

    model = _compiled(_llama())
    ids = _ids()
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    refs = [weakref.ref(kv) for kv in _kvs(res.past_key_values)]
    assert len(refs) == 2 and all(r() is not None for r in refs)
    del res
    gc.collect()
    assert all(r() is None for r in refs)        # the model is alive; its KV went with the cache
