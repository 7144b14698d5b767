"""A phantom cache (offloaded KV) must never be read as if it held keys/values.

* the local attention ops (``llmaccel::attention``, ``llmaccel::swa_attention``) raise on one;
* the offload pass is all or nothing and never silently local: a site it cannot cut, or any other
  reader of a phantom input, fails the compilation (:class:`OffloadError`, not rolled back);
* end to end: a cache filled under offload, passed to a model compiled without offload, raises.
"""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import llm_compile.ops.offload  # noqa: F401  (registers llmaccel::offload_attention, kv_phantom)
import llm_compile.runtime.swa  # noqa: F401  (registers the llmaccel::swa_attention implementation)
from llm_compile.config import SWAConfig, parse_options
from llm_compile.ops.attention import dense_attention
from llm_compile.ops.offload import is_phantom
from llm_compile.passes.attention_offload import OffloadError
from llm_compile.passes.base import PassContext
from llm_compile.passes.manager import run_pipeline
from llm_compile.ops.swa import swa_config_json


OPTIONS = {"offload": {"workers": 1, "timeout_s": 30}, "inner": "eager"}
ATT = torch.ops.llmaccel.attention.default
OFF = torch.ops.llmaccel.offload_attention.default


pytestmark = pytest.mark.usefixtures("offload_pools_shut_down")


def _phantom(b, h, n, d):
    return torch.ops.llmaccel.kv_phantom(None, torch.randn(b, h, n, d))


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g),
            torch.randn(1, 2, 1, 8, generator=g))


def test_local_attention_ops_refuse_a_phantom_cache():
    q, kn, vn = _qkv()
    pk, pv = _phantom(1, 2, 5, 8), _phantom(1, 2, 5, 8)
    assert is_phantom(pk)
    with pytest.raises(RuntimeError, match="phantom key cache of shape \\(1, 2, 5, 8\\)"):
        torch.ops.llmaccel.attention(q, kn, vn, pk, pv, None, 0.5, False, 0)
    # even when the graph's own cat (which materialises zeros) is handed over as k_all/v_all
    ka, va = torch.cat([pk, kn], -2), torch.cat([pv, vn], -2)
    with pytest.raises(RuntimeError, match="phantom"):
        torch.ops.llmaccel.attention(q, kn, vn, pk, pv, None, 0.5, False, 0, ka, va)
    h = swa_config_json(SWAConfig(sparsity=0.5, bucket=1))
    with pytest.raises(RuntimeError, match="phantom"):
        torch.ops.llmaccel.swa_attention(q, kn, vn, pk, pv, None, 0.5, False, 0, h)
    # a real cache (and a broadcast but non-phantom one) still works
    rk, rv = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = torch.ops.llmaccel.attention(q, kn, vn, rk, rv, None, 0.5, False, 0)
    ref = dense_attention(q, torch.cat([rk, kn], -2), torch.cat([rv, vn], -2), None, 0.5, False)
    torch.testing.assert_close(out, ref)
    torch.ops.llmaccel.attention(q, kn, vn, rk[:, :1].expand(1, 2, 5, 8), rv, None, 0.5, False, 0)


def _decode_leaky(q, k_new, v_new, past_k, past_v):
    """One site whose cache append also feeds a reduction: it cannot be cut."""
    k = torch.cat([past_k, k_new], -2)
    v = torch.cat([past_v, v_new], -2)
    out = ATT(q, k_new, v_new, past_k, past_v, None, 0.5, False, 0, k, v)
    return out, k, v, k.sum()


def _decode_ok(q, k_new, v_new, past_k, past_v):
    k = torch.cat([past_k, k_new], -2)
    v = torch.cat([past_v, v_new], -2)
    return ATT(q, k_new, v_new, past_k, past_v, None, 0.5, False, 1, k, v), k, v


def _decode_two_sites(q, k_new, v_new, past_k, past_v):
    a, k, v, s = _decode_leaky(q, k_new, v_new, past_k, past_v)
    b, k2, v2 = _decode_ok(q, k_new + 1, v_new + 1, past_k, past_v)  # its own cache append
    return a + b, k, v, k2, v2, s


def _decode_reads_phantom(q, k_new, v_new, past_k, past_v):
    out, k, v = _decode_ok(q, k_new, v_new, past_k, past_v)
    return out, k, v, past_k * 2  # something besides attention reads the cache's values


def _trace(fn, phantom_inputs: bool):
    q, kn, vn = _qkv()
    pk, pv = (_phantom(1, 2, 5, 8), _phantom(1, 2, 5, 8)) if phantom_inputs else \
        (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    return make_fx(fn, tracing_mode="fake")(q, kn, vn, pk, pv), (q, kn, vn, pk, pv)


def _offload_record(gm):
    records = run_pipeline(gm, parse_options(OPTIONS), PassContext("g", []))
    return next(r for r in records if r["pass"] == "attention_offload")


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_site_that_cannot_be_cut_fails_the_compilation():
    for phantom_inputs in (True, False):  # decode with phantoms, or a first (local-cache) graph
        gm, args = _trace(_decode_two_sites, phantom_inputs=phantom_inputs)
        with pytest.raises(OffloadError, match=r"offload was requested \(the KV cache placed in attention "
                                               r"workers\).*1 of 2 attention site\(s\) cannot be offloaded"):
            _offload_record(gm)
    with pytest.raises(OffloadError, match="cache is a phantom"):
        _offload_record(_trace(_decode_two_sites, phantom_inputs=True)[0])


def test_a_phantom_reaching_local_attention_raises():
    gm, args = _trace(_decode_two_sites, phantom_inputs=True)  # never compiled with offload
    with pytest.raises(RuntimeError, match="phantom key cache"):  # not zeros, an error
        gm(*args)


def test_another_reader_of_a_phantom_input_fails_the_compilation():
    gm, _ = _trace(_decode_reads_phantom, phantom_inputs=True)
    with pytest.raises(OffloadError, match="reads phantom input"):
        _offload_record(gm)
    gm2, args = _trace(_decode_ok, phantom_inputs=False)  # same site, nothing else reads: offloaded
    rec2 = _offload_record(gm2)
    assert rec2["changed"] and "error" not in rec2 and _targets(gm2).count(OFF) == 1


def test_offloaded_cache_given_to_a_local_model_raises():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    model.forward = torch.compile(model.forward, backend="llmaccel", options=OPTIONS)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert all(is_phantom(layer.keys) for layer in cache.layers)
    torch._dynamo.reset()
    del model.forward  # back to the plain method, then compiled without offload
    model.forward = torch.compile(model.forward, backend="llmaccel", options={"inner": "eager"})
    nxt = out.logits[:, -1:].argmax(-1)
    with torch.no_grad(), pytest.raises(Exception, match="phantom (key|KV) cache"):
        model(nxt, past_key_values=cache, use_cache=True)


def test_workers_that_cannot_start_fail_the_compilation_not_silently_local(monkeypatch):
    """A pool that cannot start (here: a rendezvous timeout) is a compile error naming the reason;
    the model must not run with its KV kept local."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_compile.runtime.offload import shared

    def no_workers(self):
        raise RuntimeError("llmaccel offload: starting attention workers failed: attention worker "
                           "start-up timed out after 300s")

    monkeypatch.setattr(shared.SharedPool, "_start", no_workers)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"offload": {"workers": 3, "timeout_s": 7}, "inner": "eager"})
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(Exception, match=r"offload was requested .*start-up timed out"):
        model(ids, use_cache=True)
