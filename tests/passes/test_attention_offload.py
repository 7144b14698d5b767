"""attention_offload pass: structure on a hand-written graph, greedy generation of a small Llama
against the local model, KV placement (workers hold it, the model's cache holds phantoms)."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import llm_compile.ops.offload  # noqa: F401  (registers llmaccel::offload_attention, kv_phantom)
from llm_compile.config import parse_options
from llm_compile.ops.attention import dense_attention
from llm_compile.ops.offload import is_phantom
from llm_compile.passes import attention_offload
from llm_compile.passes.base import PassContext
from llm_compile.runtime.offload import get_pool
from llm_compile.runtime.offload.sequences import sequence_of, sequence_phantom

OPTIONS = {"offload": {"workers": 2, "timeout_s": 30}, "inner": "eager"}


pytestmark = pytest.mark.usefixtures("offload_pools_shut_down")


def test_kv_phantom_has_the_shape_and_no_memory():
    past = torch.ops.llmaccel.kv_phantom(None, torch.randn(2, 3, 5, 8))
    assert past.shape == (2, 3, 5, 8) and is_phantom(past) and past.untyped_storage().nbytes() == 4
    nxt = torch.ops.llmaccel.kv_phantom(past, torch.randn(2, 3, 1, 8))
    assert nxt.shape == (2, 3, 6, 8) and is_phantom(nxt)
    assert not is_phantom(torch.randn(2, 3, 6, 8))


def _decode_step(q, k_new, v_new, past_k, past_v):
    k = torch.cat([past_k, k_new], -2)
    v = torch.cat([past_v, v_new], -2)
    out = torch.ops.llmaccel.attention(q, k_new, v_new, past_k, past_v, None, 0.5, False, 4, k, v)
    return out * 2, k, v


def test_pass_structure_and_numerics_on_a_decode_graph():
    q, kn, vn = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    pk, pv = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    gm = make_fx(_decode_step, tracing_mode="fake")(q, kn, vn, pk, pv)
    res = attention_offload.run(gm, parse_options(OPTIONS), PassContext("g", []))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert res.changed and res.matched[0]["site"] == 4 and res.matched[0]["cache_outputs_phantomized"] == 2
    assert torch.ops.llmaccel.attention.default not in targets and torch.ops.aten.cat.default not in targets
    assert targets.count(torch.ops.llmaccel.offload_attention.default) == 1
    assert targets.count(torch.ops.llmaccel.kv_phantom.default) == 2
    pool = get_pool(parse_options(OPTIONS).offload)
    seq = pool.new_sequence()  # what a prefill graph's llmaccel::offload_sequence makes
    pool.prefill(seq.seq_id, 4, pk, pv)
    owner = torch.ops.llmaccel.offload_sequence(q, attention_offload.pool_handle(pool))
    assert sequence_of(owner) is not None and sequence_of(owner) != seq.seq_id
    phantom = torch.ops.llmaccel.kv_phantom
    seq_t = sequence_phantom(seq, pk)
    with pytest.raises(RuntimeError, match="got a real KV cache"):  # only the previous phantom is valid
        gm(q, kn, vn, pk, pv)
    with pytest.raises(RuntimeError, match="names no offload sequence"):  # a phantom of no sequence
        gm(q, kn, vn, phantom(None, pk), phantom(None, pv))
    out, k, v = gm(q, kn, vn, phantom(None, pk, seq_t), phantom(None, pv, seq_t))
    assert sequence_of(k) == sequence_of(v) == seq.seq_id  # the new phantoms name the same sequence
    expect = dense_attention(q, torch.cat([pk, kn], -2), torch.cat([pv, vn], -2), None, 0.5, False) * 2
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    assert k.shape == (1, 2, 6, 8) and is_phantom(k) and is_phantom(v)
    split = attention_offload.split_at_attention(gm)
    subs = [name for name, _ in split.named_children()]
    assert subs == ["submod_1", "submod_2"]  # nothing computes before the attention here
    assert [n.target for n in split.submod_1.graph.nodes if n.op == "call_function"] == \
        [torch.ops.llmaccel.offload_attention.default]
    pool.release(seq.seq_id)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_llama_greedy_generation_matches_local_and_kv_lives_in_workers():
    from helpers import record_compiles

    model = _llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend="llmaccel", options=OPTIONS)
    with torch.no_grad(), record_compiles() as compiled:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    records = [r for g in compiled for r in g["passes"] if r["pass"] == "attention_offload"]
    assert records and all(len(r["matched"]) == 2 and not r["skipped"] for r in records)
    assert any(not m["decode"] for r in records for m in r["matched"])  # the prefill graph
    assert any(m["decode"] for r in records for m in r["matched"])
    cache = out.past_key_values
    assert cache.get_seq_length() == 7 + 6 - 1
    for layer in cache.layers:  # the compute side keeps no KV: phantoms of the right shape
        assert layer.keys.shape == (2, 2, 12, 16) and is_phantom(layer.keys) and is_phantom(layer.values)
    pool = get_pool(parse_options(OPTIONS).offload)
    per_worker = 2 * 2 * 1 * 12 * 16 * 2 * 4  # layers * batch * 1 KV head each * tokens * D * (k, v) * fp32
    assert pool.kv_bytes() == [per_worker, per_worker]
